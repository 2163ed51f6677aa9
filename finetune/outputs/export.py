"""``finetune export RUN_DIR --format peft|gguf --out PATH``: the checks every format shares (a run
directory in, or for GGUF any model directory; an output that is not a run or checkpoint) and the
writer of each format:
:mod:`finetune.outputs.peft_format` (the adapter, for peft) and :mod:`finetune.outputs.gguf` (the
merged model, for llama.cpp and Ollama)."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.run.directory import CONFIG_FILE as RUN_CONFIG

FORMATS = ("peft", "gguf")
OUT_HELP = {"peft": "the directory to write the peft adapter to", "gguf": "the .gguf file to write"}


def export_run(run_dir: str | Path, format: str = "peft", out: str | Path | None = None, as_lora: bool = False,
               gguf_type: str | None = None) -> Path:
    if format not in FORMATS:
        raise UserError(f"--format {format}: allowed: {', '.join(FORMATS)}")
    if out is None:
        raise UserError(f"--out is required: {OUT_HELP[format]}")
    if format != "peft" and as_lora:
        raise UserError("--as-lora applies to --format peft only")
    if format != "gguf" and gguf_type is not None:
        raise UserError("--type applies to --format gguf only")
    model_dir = format == "gguf" and (Path(run_dir) / "config.json").is_file()
    if not (Path(run_dir) / RUN_CONFIG).is_file() and not model_dir:
        also = " (or, for --format gguf, a model directory)" if format == "gguf" else ""
        raise UserError(f"not a finetune run directory: {run_dir} (no {RUN_CONFIG}); "
                        f"`finetune export` takes the directory of a finished run{also}")
    target = Path(out).expanduser().resolve()
    if target == Path(run_dir).expanduser().resolve() or (target / "run.json").is_file() or (target / "COMPLETE").is_file():
        raise UserError(f"--out {out}: a run or checkpoint directory, which export never writes into; choose a new "
                        "path (e.g. RUN_DIR/peft or RUN_DIR/model.gguf)")
    if format == "peft":
        from finetune.outputs.peft_format import export_run_peft

        return export_run_peft(run_dir, out, as_lora=as_lora)
    from finetune.outputs.gguf import export_model_gguf, export_run_gguf

    if (Path(run_dir) / RUN_CONFIG).is_file():
        return export_run_gguf(run_dir, out, gguf_type or "f16")
    return export_model_gguf(run_dir, out, gguf_type or "f16")
