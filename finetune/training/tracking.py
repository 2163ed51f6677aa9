"""Experiment trackers through Accelerate: TensorBoard event files in ``RUN_DIR/tensorboard``
(always, unless ``logger=none``), plus Weights & Biases with ``logger=wandb`` (only when the
``wandb`` package is installed; never required). ``metrics.jsonl`` is written by the run directory
whatever the logger.

    accelerator = Accelerator(..., log_with=log_with(cfg, run.path))
    start(accelerator, cfg, run.path)             # after the run directory exists
    run.observers.append(Recorder(accelerator))   # every metrics.jsonl record also goes here
    finish(accelerator)                           # flush and close (also after a failure)
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config.compose import flatten, to_container

TENSORBOARD_DIR = "tensorboard"
DEFAULT_PROJECT = "finetune"


def log_with(cfg, run_path: Path) -> list | None:
    """The trackers for ``Accelerator(log_with=...)``: a TensorBoard tracker writing into the run
    directory, and "wandb" when asked for; None for ``logger=none`` (an empty list makes Accelerate
    warn that no tracker is installed)."""
    logger = cfg.get("logger", "tensorboard")
    if logger == "none":
        return None
    from accelerate.tracking import TensorBoardTracker

    trackers = [TensorBoardTracker(TENSORBOARD_DIR, str(run_path))]
    if logger == "wandb":
        trackers.append("wandb")
    return trackers


def flat_hparams(cfg) -> dict:
    """The resolved config as flat ``section.key`` scalars (TensorBoard's hparams accept no lists
    or nulls: those become strings)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flatten(to_container(cfg)).items()}


def start(accelerator, cfg, run_path: Path) -> None:
    """Start the trackers (main process only) with the run's config as hyperparameters."""
    if not accelerator.log_with:
        return
    wandb = {"name": Path(run_path).name, "dir": str(run_path), "config": to_container(cfg),
             "tags": [cfg.method.name, cfg.task.name, cfg.model.name]}
    accelerator.init_trackers(os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), config=flat_hparams(cfg),
                              init_kwargs={"wandb": wandb})


def scalars(record: dict) -> dict:
    """A metrics.jsonl record as tracker scalars: train/loss, train/lr, ..., eval/<metric>."""
    out = {}
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if key == "eval" and isinstance(value, dict):
            out.update({f"eval/{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"train/{key}"] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Recorder:
    """A run-directory observer that forwards each logged record to the accelerator's trackers."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, record: dict) -> None:
        values = scalars(record)
        if values and self.accelerator.trackers:
            self.accelerator.log(values, step=record.get("step"))


def finish(accelerator) -> None:
    """Flush and close the trackers (without ending the process group, unlike end_training)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
