"""Where models run and in what precision: the device (``trainer.device``), autocast
(``trainer.precision``) and the dtype a frozen base is loaded in. One policy for training,
evaluation and merging."""

from __future__ import annotations

from finetune.errors import UserError


def device_type(trainer_cfg) -> str:
    import torch

    if trainer_cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if trainer_cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu")
    return trainer_cfg.device


def mixed_precision(trainer_cfg, device: str) -> str:
    p = trainer_cfg.precision
    if p == "auto":
        return "bf16" if device == "cuda" else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def base_dtype(cfg, device: str) -> str:
    """Frozen bases may be 16-bit on GPU; trained weights (method=full) stay fp32 masters."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if device == "cuda" and cfg.method.name != "full" and not cfg.model.quantize:
        return "bfloat16"
    return "float32"
