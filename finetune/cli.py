"""The ``finetune`` command line: thin Typer commands over library functions.

Heavy modules (torch, transformers, accelerate) are imported inside the commands, so ``--help`` and
``finetune config`` answer fast. User mistakes (``UserError``) print one line and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from finetune.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Config-driven fine-tuning of causal language models: LoRA, MoRA, VB-LoRA, full.")

OVERRIDES = typer.Argument(None, help="Hydra overrides: group=option (model=tiny, method=lora, task=memorize) "
                                      "and key=value (method.rank=16, trainer.max_steps=200).")
CONFIG_DIR = typer.Option(None, "--config-dir", help="An extra directory of config groups (searched first).")
OVERRIDE_CTX = {"allow_extra_args": True, "ignore_unknown_options": True}


def fail(message: str, code: int = 2):
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
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:
            if type(e).__name__ == "TrainingError":
                fail(str(e), 1)
            raise

    return wrapper


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def train(overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages.")):
    """Train: finetune train [model=...] [method=...] [task=...] [key=value ...]"""
    from finetune.config import compose

    overrides = list(overrides or [])
    cfg = compose(overrides, config_dir)
    from finetune.train import train as run_training

    result = run_training(cfg, overrides, quiet=quiet, config_dir=config_dir)
    if quiet:
        typer.echo(json.dumps({"run_dir": result["run_dir"], "metric": result["metric"],
                               "metrics": result["metrics"]}))


@app.command()
@user_errors
def merge(run_dir: Path = typer.Argument(..., help="A finished run directory."),
          out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default RUN_DIR/merged)."),
          dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16")):
    """Merge a run's adapter into its base model and write a plain Hugging Face model directory."""
    from finetune.merge import merge_run

    merge_run(run_dir, out, dtype)


@app.command("eval", context_settings=OVERRIDE_CTX)
@user_errors
def evaluate(path: Path = typer.Argument(..., help="A run directory or a model directory."),
             overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR):
    """Evaluate the task metric on a run (adapted model) or on any model directory."""
    from finetune.evaluate import evaluate_path

    result = evaluate_path(path, list(overrides or []), config_dir)
    typer.echo(json.dumps(result, indent=2))


@app.command(context_settings=OVERRIDE_CTX)
@user_errors
def config(overrides: Optional[List[str]] = OVERRIDES, config_dir: Optional[str] = CONFIG_DIR):
    """Validate and print the resolved config (loads nothing heavy)."""
    from finetune.config import compose, to_yaml

    typer.echo(to_yaml(compose(list(overrides or []), config_dir)), nl=False)


@app.command()
@user_errors
def export(run_dir: Path = typer.Argument(..., help="A finished run directory."),
           format: str = typer.Option("peft", "--format", help="peft"),
           out: Path = typer.Option(..., "--out", help="Output directory.")):
    """Export a run's adapter in another format (peft adapter directory for LoRA and VB-LoRA)."""
    from finetune.export import export_run

    path = export_run(run_dir, format, out)
    typer.echo(f"exported {format} adapter to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
