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
from finetune.adapters.base import dense_weight, is_quantized, replace_module
from finetune.errors import UserError
from finetune.outputs.streaming import save_merged
from finetune.run.directory import RunDir
from finetune.run.load import load_run, quantized_base

MARKER = "finetune_merge.json"
DTYPES = ("float32", "bfloat16", "float16")


def dequantize_model(model) -> int:
    """Replace every bitsandbytes 4/8-bit linear layer of ``model`` (inside adapter layers too) by an
    fp32 ``nn.Linear`` holding its dequantized weight (``dense_weight``: exactly the matrix the
    quantized forward multiplies by) and its bias; drop the model's quantizer. Returns the count."""
    import torch
    from torch import nn

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


def load_for_merge(run: RunDir, base: str | None = None):
    """The run's base with its adapter attached, as merging needs it: ``(model, adapter, tokenizer,
    cfg, quant, base)``. ``base`` as in :func:`merge_run` (which checks it); returned resolved ("original" for a
    full-precision run). The model is still quantized: :func:`dequantize_model` comes next."""
    quant = quantized_base(run.config())
    base = "original" if not quant else (base or "dequantized")
    model, adapter, tokenizer, cfg = load_run(run.path, original_base=base == "original", stored_dtype=True)
    return model, adapter, tokenizer, cfg, quant, base


def merge_run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "float32",
              quiet: bool = False, base: str | None = None) -> Path:
    """Merge the run's adapter into its base and write ``out`` (default ``RUN_DIR/merged``).

    ``base`` (quantized-base runs): ``"dequantized"`` (default) merges into the dequantized weights
    the adapter was trained against; ``"original"`` into the original full-precision weights. For
    a full-precision run both are the same weights."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    if base is not None and base not in MERGE_BASES:
        raise UserError(f"--base {base}: allowed: {', '.join(MERGE_BASES)}")
    run = RunDir(run_dir)
    out = Path(out).expanduser().resolve() if out else run.merged
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; choose another")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out}: exists and is not a merged model written by finetune; choose another")
    run.config()  # not a run: one line before any progress bar
    with progress.bar(total=3, desc="merge", unit="stage", disable=quiet) as stages:  # closed before any message
        stages.set_postfix_str("load")
        model, adapter, tokenizer, cfg, quant, base = load_for_merge(run, base)
        stages.update(1)
        stages.set_postfix_str("merge")
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
        try:
            _write_merged(tmp, model, adapter, tokenizer, dtype, run, cfg, quant, base, dequantized)
        except BaseException:  # a failure or a signal leaves no half-written model behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # the earlier merge steps aside only once the new one is complete
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        stages.update(1)
    if not quiet:
        into = f" ({base} {quant} base)" if quant else ""
        print(f"merged {adapter.method}{into} into {out}", flush=True)
    return out


def _write_merged(tmp: Path, model, adapter, tokenizer, dtype: str, run, cfg, quant, base: str, dequantized: int) -> None:
    """The merged model's files in ``tmp``: weights (streamed), tokenizer, and finetune_merge.json."""
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
