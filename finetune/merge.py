"""Merged checkpoints: W0 + ΔW written as a plain Hugging Face model directory (config.json,
safetensors weights, tokenizer files, generation config) that ``AutoModelForCausalLM`` loads
without ``finetune``. ΔW is added in fp32 and rounded once to the output dtype."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from finetune.errors import UserError
from finetune.rundir import CONFIG_FILE, RunDir, read_run

MARKER = "finetune_merge.json"
DTYPES = ("float32", "bfloat16", "float16")


def run_config(run_dir: Path):
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a finetune run directory (no {CONFIG_FILE})")
    return OmegaConf.load(path)


def load_run(run_dir: str | Path, device: str = "cpu"):
    """The run's base model (fp32) with its trained adapter attached, unmerged; plus tokenizer and
    config. Returns (model, adapter, tokenizer, cfg)."""
    from finetune import adapters
    from finetune.models import load_model, load_tokenizer

    run = RunDir(run_dir)
    info = read_run(run.path)
    if not (run.path / adapters.WEIGHTS_FILE).is_file():
        raise UserError(f"{run.path}: the run has no trained weights yet (status: {info.get('status')})")
    cfg = run_config(run.path)
    base_dir = str(run.base) if run.base.is_dir() else None
    model = load_model(cfg.model, device, base_dir=base_dir, dtype="float32")
    adapter = adapters.load_adapter(model, run.path)
    model.eval()
    tokenizer_cfg = cfg.model.copy()
    if run.tokenizer.is_dir():
        tokenizer_cfg.tokenizer = str(run.tokenizer)
        tokenizer_cfg.gguf_file = None
    tokenizer = load_tokenizer(tokenizer_cfg)
    return model, adapter, tokenizer, cfg


def merge_run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "float32",
              quiet: bool = False) -> Path:
    """Merge the run's adapter into its base and write ``out`` (default ``RUN_DIR/merged``)."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    run = RunDir(run_dir)
    out = Path(out).expanduser().resolve() if out else run.merged
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: exists and is not a merged model written by finetune; choose another")
    model, adapter, tokenizer, cfg = load_run(run.path)
    with torch.no_grad():
        adapter.merge()
        adapter.unwrap()
    model.to(getattr(torch, dtype))
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = True
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"run": str(run.path), "method": adapter.method,
                                          "dtype": dtype, "base_quantized": cfg.model.quantize}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    if not quiet:
        print(f"merged {adapter.method} into {out}", flush=True)
    return out
