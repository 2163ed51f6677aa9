"""``finetune eval``: a task's metric on a finished run (base + adapter, unmerged) or on any model
directory (e.g. a merged one)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.inference.load import open_model
from finetune.run.directory import write_atomic
from finetune.tasks import build_task


def evaluate_path(path: str | Path, overrides: list[str] = (), config_dir: str | None = None) -> dict:
    """The task's metrics of the model at ``path`` (the run's own task unless overridden); a run
    keeps them in RUN_DIR/eval.json."""
    opened = open_model(str(path), list(overrides), config_dir, dtype="float32")
    task = build_task(opened.cfg.task, opened.tokenizer)
    metrics = task.evaluate(opened.model, opened.device)
    result = {"task": opened.cfg.task.name, "metric": task.metric, "metrics": metrics, "path": opened.path}
    if opened.is_run:
        write_atomic(Path(opened.path) / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
