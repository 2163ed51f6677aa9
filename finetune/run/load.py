"""Loading a finished run for what comes after training (merge, eval, export): its base model
with the trained adapter attached, its tokenizer and its config."""

from __future__ import annotations

from pathlib import Path

from finetune import adapters
from finetune.adapters.base import is_quantized
from finetune.errors import UserError
from finetune.models.load import architecture, load_model, source_dir
from finetune.models.tokenizer import load_tokenizer
from finetune.run.directory import RunDir, read_run


def load_run(run_dir: str | Path, device: str = "cpu", original_base: bool = False, stored_dtype: bool = False):
    """The run's base model (fp32) with its trained adapter attached, unmerged; plus tokenizer and
    config. Returns (model, adapter, tokenizer, cfg).

    ``stored_dtype`` (for merging): load a full-precision base in the dtype its checkpoint is stored
    in (a bf16 checkpoint stays bf16: half the memory of fp32, and no value changes, since bf16 ->
    fp32 is exact); the adapter stays fp32. Full fine-tuning runs always load in fp32.

    A quantized-base run loads its base quantized exactly as in training (bitsandbytes layers, the
    training dtype for the rest), unless ``original_base``: then the full-precision weights, without
    quantization (a UserError if the checkpoint itself is quantized)."""
    run = RunDir(run_dir)
    info = read_run(run.path)
    if not (run.path / adapters.WEIGHTS_FILE).is_file():
        raise UserError(f"{run.path}: the run has no trained weights yet (status: {info.get('status')})")
    run.check_files()
    cfg = run.config()
    base_dir = str(run.base) if run.base.is_dir() else None
    model_cfg = cfg.model.copy()
    dtype = "float32"
    if quantized_base(cfg) and original_base:
        model_cfg.quantize = None
    elif quantized_base(cfg) and model_cfg.dtype != "auto":
        dtype = model_cfg.dtype  # quantize from the same weights as training did
    elif stored_dtype and not quantized_base(cfg) and cfg.method.get("name") != "full":
        dtype = "checkpoint"
    model = load_model(model_cfg, device, base_dir=base_dir, dtype=dtype)
    if original_base and any(is_quantized(m) for m in model.modules()):
        raise UserError(f"--base original: the base checkpoint {cfg.model.path or base_dir} is itself "
                        "quantized, so no original full-precision weights are available; use --base dequantized")
    adapter = adapters.load_adapter(model, run.path)
    model.eval()
    return model, adapter, run_tokenizer(run), cfg


def run_tokenizer(run: RunDir):
    """The tokenizer the run trained with (saved in the run, else its model's)."""
    tokenizer_cfg = run.config().model.copy()
    if run.tokenizer.is_dir():
        tokenizer_cfg.tokenizer = str(run.tokenizer)
        tokenizer_cfg.gguf_file = None
    return load_tokenizer(tokenizer_cfg)


def run_model_config(run: RunDir):
    """The transformers config of the run's base model, without loading any weights."""
    from transformers import AutoConfig

    cfg = run.config()
    if run.base.is_dir():
        return AutoConfig.from_pretrained(str(run.base))
    if cfg.model.init == "random":
        return architecture(cfg.model)
    return AutoConfig.from_pretrained(source_dir(cfg.model), trust_remote_code=cfg.model.trust_remote_code)


def quantized_base(cfg) -> str | None:
    """``"4bit"`` / ``"8bit"`` when the run trained on a bitsandbytes-quantized base, else None."""
    q = cfg.model.get("quantize")
    return q if q in ("4bit", "8bit") else None
