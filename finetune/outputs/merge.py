"""Merged checkpoints: W0 + ΔW written as a plain Hugging Face model directory (config.json,
safetensors weights, tokenizer files, generation config) that ``AutoModelForCausalLM`` loads
without ``finetune``. ΔW is added in fp32 and rounded once to the output dtype.

Quantized bases (``model.quantize=4bit|8bit``, methods.md §2.10): the adapter was trained against
the *dequantized* base, dequant(Q(W0)), not against W0. By default the merge therefore loads the
base quantized exactly as in training (same weights, same bitsandbytes settings: quantization is
deterministic), dequantizes every bitsandbytes layer to an fp32 ``nn.Linear`` (adapted or not),
adds ΔW in fp32 and writes a dense model: its weights equal dequant(Q(W0)) + ΔW, the function the
adapter was trained with, and nothing is re-quantized. ``base="original"`` (``finetune merge
--base original``) instead adds ΔW to the original full-precision W0 when those weights are
available (a hub/local/GGUF checkpoint, or the ``base/`` of a random-init run): the result is
closer to the original model but differs from the trained one by the quantization error.
``finetune_merge.json`` records the training quantization and the base that was merged into."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from finetune import progress
from finetune.errors import UserError
from finetune.run.directory import CONFIG_FILE, RunDir, read_run

MARKER = "finetune_merge.json"
DTYPES = ("float32", "bfloat16", "float16")


def run_config(run_dir: Path):
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a finetune run directory (no {CONFIG_FILE})")
    return OmegaConf.load(path)


def load_run(run_dir: str | Path, device: str = "cpu", original_base: bool = False, stored_dtype: bool = False):
    """The run's base model (fp32) with its trained adapter attached, unmerged; plus tokenizer and
    config. Returns (model, adapter, tokenizer, cfg).

    ``stored_dtype`` (for merging): load a full-precision base in the dtype its checkpoint is stored
    in (a bf16 checkpoint stays bf16: half the memory of fp32, and no value changes, since bf16 ->
    fp32 is exact); the adapter stays fp32. Full fine-tuning runs always load in fp32.

    A quantized-base run loads its base quantized exactly as in training (bitsandbytes layers, the
    training dtype for the rest), unless ``original_base``: then the full-precision weights, without
    quantization (a UserError if the checkpoint itself is quantized)."""
    from finetune import adapters
    from finetune.adapters.base import is_quantized
    from finetune.models.load import load_model
    from finetune.models.tokenizer import load_tokenizer

    run = RunDir(run_dir)
    info = read_run(run.path)
    if not (run.path / adapters.WEIGHTS_FILE).is_file():
        raise UserError(f"{run.path}: the run has no trained weights yet (status: {info.get('status')})")
    cfg = run_config(run.path)
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
    tokenizer_cfg = cfg.model.copy()
    if run.tokenizer.is_dir():
        tokenizer_cfg.tokenizer = str(run.tokenizer)
        tokenizer_cfg.gguf_file = None
    tokenizer = load_tokenizer(tokenizer_cfg)
    return model, adapter, tokenizer, cfg


def quantized_base(cfg) -> str | None:
    """``"4bit"`` / ``"8bit"`` when the run trained on a bitsandbytes-quantized base, else None."""
    q = cfg.model.get("quantize")
    return q if q in ("4bit", "8bit") else None


def dequantize_model(model) -> int:
    """Replace every bitsandbytes 4/8-bit linear layer of ``model`` (inside adapter layers too) by an
    fp32 ``nn.Linear`` holding its dequantized weight (``dense_weight``: exactly the matrix the
    quantized forward multiplies by) and its bias; drop the model's quantizer. Returns the count."""
    import torch
    from torch import nn

    from finetune.adapters.base import dense_weight, is_quantized, replace_module

    names = [name for name, module in model.named_modules() if is_quantized(module)]
    for name in names:
        q = model.get_submodule(name)
        weight = dense_weight(q)
        dense = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device,
                          dtype=torch.float32)
        with torch.no_grad():
            dense.weight.copy_(weight.reshape(q.out_features, q.in_features))
            if q.bias is not None:
                dense.bias.copy_(q.bias.detach().float())
        dense.requires_grad_(False)
        replace_module(model, name, dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if names or quantizer is not None:  # transformers' markers of a quantized model, all of them
        if hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(model)
        model.hf_quantizer = None
        for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
            if getattr(model, attr, None):
                setattr(model, attr, False if attr.startswith("is_") else None)
        for module in model.modules():
            config = getattr(module, "config", None)
            if getattr(config, "quantization_config", None) is not None:
                del config.quantization_config
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
        # A base loaded from a bitsandbytes checkpoint (a quantized run's saved RUN_DIR/base) carries
        # the loader's deserialization steps, which cannot be reverted when saving dense weights.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if _reversible(c)]
    return len(names)


def _reversible(conversion) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


MERGE_BASES = ("dequantized", "original")


def merge_run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "float32",
              quiet: bool = False, base: str | None = None) -> Path:
    """Merge the run's adapter into its base and write ``out`` (default ``RUN_DIR/merged``).

    ``base`` (quantized-base runs): ``"dequantized"`` (default) merges into the dequantized weights
    the adapter was trained against; ``"original"`` into the original full-precision weights. For
    a full-precision run both are the same weights."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    if base is not None and base not in MERGE_BASES:
        raise UserError(f"--base {base}: allowed: {', '.join(MERGE_BASES)}")
    run = RunDir(run_dir)
    out = Path(out).expanduser().resolve() if out else run.merged
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: exists and is not a merged model written by finetune; choose another")
    cfg = run_config(run.path)
    quant = quantized_base(cfg)
    base = "original" if not quant else (base or "dequantized")
    stages = progress.bar(total=3, desc="merge", unit="stage", disable=quiet)
    stages.set_postfix_str("load")
    model, adapter, tokenizer, cfg = load_run(run.path, original_base=base == "original", stored_dtype=True)
    stages.update(1)
    stages.set_postfix_str("merge")
    with torch.no_grad():
        dequantized = dequantize_model(model)
        # ΔW is added while writing (finetune.outputs.streaming.save_merged, below): each tensor is merged,
        # converted to `dtype` and written on its own, so the peak stays near one copy of the model.
    stages.update(1)
    stages.set_postfix_str("save")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = True
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from finetune.outputs.streaming import save_merged

    save_merged(model, adapter, tmp, dtype)
    tokenizer.save_pretrained(tmp)
    marker = {"run": str(run.path), "method": adapter.method, "dtype": dtype, "base_quantized": quant,
              "merged_into": base}
    if quant:
        marker["quantization"] = {"bits": quant, "backend": "bitsandbytes",
                                  **({"quant_type": "nf4", "double_quant": bool(cfg.model.double_quant)}
                                     if quant == "4bit" else {"scheme": "LLM.int8 row-wise absmax"}),
                                  "dequantized_layers": dequantized}
        marker["note"] = ("weights = dequantized quantized base + ΔW: the model the adapter was trained with"
                          if base == "dequantized" else
                          "weights = original full-precision base + ΔW; the adapter was trained on the "
                          f"{quant} base, so this differs from the trained model by the quantization error")
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    stages.update(1)
    stages.close()
    if not quiet:
        into = f" ({base} {quant} base)" if quant else ""
        print(f"merged {adapter.method}{into} into {out}", flush=True)
    return out
