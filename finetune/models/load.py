"""Loading base models: the tiny test model (random init), the embedded GGUF default, local
directories and hub ids, optionally quantized to 4 or 8 bit with bitsandbytes; counting their
parameters."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import UserError, first_line
from finetune.models.gguf import converted_gguf
from finetune.models.paths import check_local, resolve_path


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str, device_type: str = "cpu"):
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``checkpoint``: whatever the weights are stored in
    (transformers' own "auto"; merging reads the base this way and adds ΔW in fp32 per tensor)."""
    import torch

    if name == "checkpoint":
        return "auto"
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, TORCH_DTYPES[name])


def quantization_config(cfg):
    if cfg.quantize in (None, "none"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=cfg.double_quant,
                                  bnb_4bit_compute_dtype=torch.float32)
    _warn_once("bitsandbytes.autograd._functions")  # "inputs will be cast ... to float16" on every matmul
    return BitsAndBytesConfig(load_in_8bit=True)


def _warn_once(logger_name: str) -> None:
    """Let each distinct message of a chatty logger through once per process."""
    import logging

    class Once(logging.Filter):
        seen: set = set()

        def filter(self, record):
            msg = record.getMessage()
            if msg in self.seen:
                return False
            self.seen.add(msg)
            return True

    logger = logging.getLogger(logger_name)
    if not any(type(f).__name__ == "Once" for f in logger.filters):
        logger.addFilter(Once())


def source_dir(cfg) -> str:
    """Where the base weights come from (GGUF conversions resolved to their cache)."""
    if cfg.gguf_file:
        return converted_gguf(cfg)
    return resolve_path(cfg.path)


def architecture(cfg):
    """The transformers config of a random-init model: ``model.arch`` alone, or the config found
    at ``model.path`` with ``model.arch`` on top."""
    from transformers import AutoConfig

    arch = dict(cfg.arch)
    if not cfg.path:
        return AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
    path = source_dir(cfg)
    check_local(path, None)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.path={cfg.path}: cannot read a model config ({first_line(e)}); give a local "
                        "Hugging Face directory or a hub id (network needed)") from None
    for k, v in arch.items():
        setattr(config, k, v)
    return config


def load_model(cfg, device_type: str = "cpu", base_dir: str | None = None, dtype: str | None = None,
               save_base: str | os.PathLike | None = None):
    """Build the base model of ``cfg``. ``base_dir`` overrides the weights' location (a run's saved
    random-init base); ``dtype`` overrides ``cfg.dtype``. Random init uses the current torch RNG
    state: seed before calling. ``save_base`` (random init only): write the freshly drawn
    full-precision weights there, before any quantization (a run's ``base/``)."""
    from transformers import AutoModelForCausalLM

    torch_type = torch_dtype(dtype or cfg.dtype, device_type)
    if cfg.init == "random" and base_dir is None:
        config = architecture(cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_type if torch_type != "auto" else None)
        if save_base is not None:
            model.save_pretrained(save_base, safe_serialization=True)
        if quantization_config(cfg) is None:
            return model
        # bitsandbytes quantizes while weights load: reload the fresh weights through the quantizer,
        # exactly as a saved base (``base_dir``) is loaded later for merging.
        import tempfile

        if save_base is not None:
            return load_model(cfg, device_type, base_dir=str(save_base), dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="finetune-base-") as tmp:
            # Written directly: transformers' save_pretrained writes on global rank 0 only.
            from safetensors.torch import save_model

            model.config.to_json_file(str(Path(tmp) / "config.json"))
            save_model(model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            return load_model(cfg, device_type, base_dir=tmp, dtype=dtype)
    dtype = torch_type
    path = base_dir or source_dir(cfg)
    check_local(path, None)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if base_dir is None and cfg.revision:
        kwargs["revision"] = cfg.revision
    quant = quantization_config(cfg)
    if quant is not None:
        # A run's saved base may already be a bitsandbytes checkpoint (a quantized run whose
        # task.train_modules changed the base): it carries its own quantization settings.
        if not (base_dir and '"quantization_config"' in _read_text(Path(base_dir) / "config.json")):
            kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0} if device_type == "cuda" else {"": "cpu"}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.path={cfg.path}: cannot load a model ({first_line(e)}); "
                        "give a local Hugging Face directory or a hub id (network needed)") from None
    if quant is not None:
        keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Pin every bitsandbytes 4-bit layer to its standard layout and exact compute path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place the first time
    it runs in eval mode without gradients, and from then on multiplies through a bf16 kernel that
    has no autograd backward: a training step after an evaluation then gets silently wrong
    gradients, eval logits drift from training ones, and the packed data no longer dequantizes
    with ``dequantize_4bit``. Switching the repacking off keeps one path everywhere:
    ``x @ dequant(W)ᵀ`` in the compute dtype (fp32), exactly what a merge reproduces."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_params(model) -> int:
    """Parameters of a model, each tensor once (tied weights), 4-bit packed matrices at full size."""
    import math

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: packed storage, count the matrix
            total += math.prod(state.shape) if getattr(state, "shape", None) is not None else p.numel()
    return total
