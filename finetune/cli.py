"""The ``finetune`` command line: thin Typer commands over library functions.

Heavy modules (torch, transformers, accelerate) are imported inside the commands, so ``--help`` and
``finetune config`` answer fast. User mistakes (``UserError``) print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from finetune.errors import RunInterrupted, TrainingError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Config-driven fine-tuning of causal language models: LoRA, MoRA, VB-LoRA, full.")

OVERRIDES = typer.Argument(None, help="Hydra overrides: group=option (model=tiny, method=lora, task=memorize) "
                                      "and key=value (method.rank=16, trainer.max_steps=200).")
CONFIG_DIR = typer.Option(None, "--config-dir", help="An extra directory of config groups (searched first).")
OVERRIDE_CTX = {"allow_extra_args": True, "ignore_unknown_options": True}


def fail(message: str, code: int = 2):
    from finetune.environment import is_main_process

    if is_main_process():  # in a multi-process run every rank fails alike; one of them reports
        typer.echo(f"finetune: error: {message}", err=True)
    raise typer.Exit(code)


def quiet_library_loggers() -> None:
    """Library chatter that users cannot act on stays out of the output (errors still show)."""
    import logging
    import os

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported


def user_errors(fn):
    """Report UserError as one line on stderr with exit code 2; training failures with exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_library_loggers()
        try:
            return fn(*args, **kwargs)
        except (UserError, TrainingError, RunInterrupted) as e:  # RunInterrupted: checkpoint saved
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def train(overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
          multirun: bool = typer.Option(False, "--multirun", "-m", help=(
              "Sweep: run every combination of comma lists, range(...), choice(...), glob(...) one after "
              "another, each in its own run directory under multirun/<timestamp> (or output_dir).")),
          fail_fast: bool = typer.Option(False, "--fail-fast", help="Sweeps: stop at the first failed run.")):
    """Train: finetune train [model=...] [method=...] [task=...] [key=value ...]"""
    from finetune import progress
    from finetune.config.compose import absolute_paths, compose

    progress.set_quiet(quiet)
    overrides = absolute_paths(list(overrides or []))
    if multirun:
        from finetune.report.sweep import run_sweep

        summary = run_sweep(overrides, config_dir, quiet=quiet, fail_fast=fail_fast)
        if summary["failed"]:
            raise typer.Exit(1)
        return
    cfg = compose(overrides, config_dir)
    from finetune.environment import in_launched_process, is_main_process

    if cfg.launcher.name != "none" and not in_launched_process():
        from finetune.training.launch import launch_training  # re-run this command in N processes

        code = launch_training(cfg, overrides, config_dir, quiet)
        if code is not None:
            raise typer.Exit(code)
    from finetune.training.loop import train as run_training

    result = run_training(cfg, overrides, quiet=quiet, config_dir=config_dir)
    if quiet and is_main_process():
        typer.echo(json.dumps({"run_dir": result["run_dir"], "metric": result["metric"],
                               "metrics": result["metrics"]}))


@app.command()
@user_errors
def merge(run_dir: Path = typer.Argument(..., help="A finished run directory."),
          out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default RUN_DIR/merged)."),
          dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
          base: Optional[str] = typer.Option(
              None, "--base", help="Quantized-base runs: dequantized (default: the 4/8-bit weights the "
              "adapter was trained against, dequantized) | original (the full-precision weights)."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages.")):
    """Merge a run's adapter into its base model and write a plain Hugging Face model directory."""
    from finetune import progress
    from finetune.outputs.merge import merge_run

    progress.set_quiet(quiet)
    merge_run(run_dir, out, dtype, base=base, quiet=quiet)


@app.command("eval", context_settings=OVERRIDE_CTX)
@user_errors
def evaluate(path: Path = typer.Argument(..., help="A run directory or a model directory."),
             overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (the JSON result only).")):
    """Evaluate the task metric on a run (adapted model) or on any model directory."""
    from finetune import progress
    from finetune.inference.evaluate import evaluate_path

    progress.set_quiet(quiet)
    result = evaluate_path(path, list(overrides or []), config_dir)
    typer.echo(json.dumps(result, indent=2))


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def config(overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR):
    """Validate and print the resolved config (loads nothing heavy)."""
    from finetune.config.compose import compose, to_yaml

    typer.echo(to_yaml(compose(list(overrides or []), config_dir)), nl=False)


@app.command("data", context_settings=OVERRIDE_CTX)
@user_errors
def data(overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
         rows: int = typer.Option(3, "--rows", "-n", help="How many training rows to show.")):
    """Preview the training data: the rows training will see (tokenized, length-limited, packed),
    with the loss mask visible. Loads the tokenizer and the data, not the model."""
    from finetune.config.compose import absolute_paths, compose
    from finetune.tasks.preview import preview

    cfg = compose(absolute_paths(list(overrides or [])), config_dir)
    typer.echo(preview(cfg, rows), nl=False)


DEVICE = typer.Option("auto", "--device", help="auto (CUDA when there is one) | cpu | cuda")
DTYPE = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on the CPU) | float32 | bfloat16 | float16")
FORMAT = typer.Option("auto", "--format", help="How prompts are laid out: auto (as the run's task trained), raw, "
                                               "alpaca, chat (the chat template), tags (<|role|> lines)")
MAX_NEW = typer.Option(256, "--max-new-tokens", help="The most tokens generated per prompt.")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sampling at this temperature.")
TOP_P = typer.Option(1.0, "--top-p", help="Sampling: the smallest set of tokens with this probability.")
TOP_K = typer.Option(0, "--top-k", help="Sampling: the k most likely tokens only (0: all).")
SEED = typer.Option(0, "--seed", help="Sampling: the random seed.")
SYSTEM = typer.Option(None, "--system", help="A system message (chat and tags formats).")


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def generate(path: str = typer.Argument(..., help="A run directory (merged or not), a model directory or a hub id."),
             overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
             prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
             file: Optional[str] = typer.Option(None, "--file", "-f", help="Prompts: .txt (one a line) or .jsonl."),
             out: Optional[str] = typer.Option(None, "--out", help="Write one JSON line per prompt here."),
             fmt: str = FORMAT, max_new_tokens: int = MAX_NEW, temperature: float = TEMPERATURE,
             top_p: float = TOP_P, top_k: int = TOP_K, seed: int = SEED, system: Optional[str] = SYSTEM,
             batch_size: int = typer.Option(8, "--batch-size", help="Prompts generated together."),
             device: str = DEVICE, dtype: str = DTYPE,
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")):
    """Generate completions: greedy unless --temperature, stopping at EOS; one prompt on a terminal
    streams as it is generated."""
    from finetune import progress
    from finetune.inference.generate import generate_prompts
    from finetune.models.generate import Sampling

    progress.set_quiet(quiet)
    generate_prompts(path, list(prompt or []), file, out, fmt, max_new_tokens,
                     Sampling(temperature, top_p, top_k, seed), batch_size, device, dtype, system,
                     list(overrides or []), config_dir, quiet)


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def chat(path: str = typer.Argument(..., help="A run directory (merged or not), a model directory or a hub id."),
         overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
         system: Optional[str] = SYSTEM, fmt: str = FORMAT,
         max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="The most tokens per answer."),
         temperature: float = TEMPERATURE, top_p: float = TOP_P, top_k: int = TOP_K, seed: int = SEED,
         device: str = DEVICE, dtype: str = DTYPE,
         transcript: Optional[str] = typer.Option(None, "--transcript", help="Append every turn here as a JSON line "
                                                                              "(messages, token ids, answer).")):
    """Talk to a model in the terminal: /reset, /system TEXT, /exit; Ctrl-C stops an answer."""
    from finetune import progress
    from finetune.inference.chat import chat as run_chat
    from finetune.models.generate import Sampling

    progress.set_quiet(True)
    run_chat(path, system, fmt, max_new_tokens, Sampling(temperature, top_p, top_k, seed), device, dtype, transcript,
             list(overrides or []), config_dir)


@app.command()
@user_errors
def export(run_dir: Path = typer.Argument(..., help="A finished run directory (gguf: or any model directory)."),
           format: str = typer.Option("peft", "--format", help="peft (the adapter) or gguf (the merged model, "
                                                              "for llama.cpp and Ollama)."),
           out: Path = typer.Option(..., "--out", help="peft: the output directory; gguf: the .gguf file."),
           gguf_type: Optional[str] = typer.Option(None, "--type", help="gguf: f32, f16 (default), bf16, q8_0, "
                                                                        "q4_0, q4_1, q5_0, q5_1."),
           as_lora: bool = typer.Option(False, "--as-lora", help="peft: write the adapter as the exact LoRA "
                                                                "it equals (VB-LoRA; MoRA types 1-4)."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="No messages.")):
    """Export a run: its adapter as a peft adapter directory (LoRA, VB-LoRA; MoRA types 1-4 with
    --as-lora), or its merged model as one GGUF file for llama.cpp and Ollama."""
    from finetune import progress
    from finetune.outputs.export import export_run

    progress.set_quiet(quiet)
    path = export_run(run_dir, format, out, as_lora=as_lora, gguf_type=gguf_type)
    if not quiet:
        what = "adapter" if format == "peft" else f"{gguf_type or 'f16'} model"
        typer.echo(f"exported {format} {what} to {path}")


@app.command()
@user_errors
def report(dirs: List[Path] = typer.Argument(..., help="Run directories, or folders with runs below them "
                                                        "(a sweep directory, outputs/)."),
           out: Optional[Path] = typer.Option(None, "--out", help="Where report.csv, report.md and the PNG "
                                                                  "plots go (default DIR/report, or ./report "
                                                                  "for several DIRs)."),
           no_plots: bool = typer.Option(False, "--no-plots", help="Tables only."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Write the files, print nothing.")):
    """Compare runs: one table as text, CSV and Markdown, plus PNG plots.

    Columns: method, rank / bank size, trainable and stored parameters, steps, tokens/s, peak memory,
    final loss, the task metric. Plots: loss curves, metric vs rank / bank size, metric vs stored
    parameters."""
    from finetune.report.report import table, write_report
    from finetune.report.table import text_table
    from finetune.run.listing import display_path

    result = write_report(dirs, out, plots=not no_plots)
    if not quiet:
        typer.echo(text_table(*table(result["rows"])))
        typer.echo(f"\nwrote {', '.join(display_path(f) for f in result['files'])}")


@app.command("runs")
@user_errors
def list_runs(dirs: Optional[List[Path]] = typer.Argument(None, help="Folders to search (default: .)."),
              as_json: bool = typer.Option(False, "--json", help="One JSON object per run, one per line."),
              quiet: bool = typer.Option(False, "--quiet", "-q", help="Run directories only, one per line.")):
    """List runs: status, method, task, progress, metric.

    Status: finished, running, resumable (has a checkpoint), stale (its process died), failed,
    interrupted."""
    from finetune.report.table import text_table
    from finetune.run.listing import describe, find_runs, runs_table

    records = [describe(path) for path in find_runs(dirs or [Path(".")])]
    if as_json:
        for record in records:
            typer.echo(json.dumps(record))
    elif quiet:
        for record in records:
            typer.echo(record["run"])
    elif not records:
        typer.echo("no runs found")
    else:
        typer.echo(text_table(*runs_table(records)))


COMMANDS = ("train", "merge", "eval", "generate", "chat", "config", "data", "export", "report", "runs")


def _config_fast_path(args: List[str]) -> Optional[int]:
    """``finetune config [--config-dir DIR] [overrides]`` without Typer's argument coercion (which
    imports pydantic: ≈ 0.1 s of the ≤ 0.5 s start-up budget). Anything else starting with ``-``
    (``--help``, a typo) goes through Typer as usual: returns None."""
    overrides, config_dir = [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config-dir" and i + 1 < len(args):
            config_dir, i = args[i + 1], i + 2
            continue
        if a.startswith("--config-dir="):
            config_dir = a.split("=", 1)[1]
        elif a.startswith("-"):
            return None
        else:
            overrides.append(a)
        i += 1
    try:
        config(overrides, config_dir)
    except typer.Exit as e:
        return e.exit_code
    return 0


def main() -> None:
    args = sys.argv[1:]
    # A hub id that cannot be fetched is reported in one line by the command; the hub client's own
    # retry warnings would only repeat it.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    # transformers imports DeepSpeed whenever it is installed; on a machine without GPUs DeepSpeed
    # then warns on every command that it found none. Telling it so up front keeps that quiet.
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args[:1] == ["train"]:
        from finetune.allocator import restart_with_jemalloc

        try:
            restart_with_jemalloc()  # returns only where the process keeps its malloc
        except UserError as e:
            typer.echo(f"finetune: error: {e}", err=True)
            sys.exit(e.exit_code)
    if args[:1] == ["config"]:
        code = _config_fast_path(args[1:])
        if code is not None:
            sys.exit(code)
    # click's usage errors (typer's BadParameter derives from them, whether typer vendors click or not)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as e:  # an unknown command or option, a missing argument: one line too
        command = f"finetune {sys.argv[1]} --help" if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else "finetune --help"
        typer.echo(f"finetune: error: {e.format_message()} (see {command})", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("finetune: error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
