"""``finetune eval``: a task's metric on a finished run (base + adapter, unmerged) or on any model
directory (e.g. a merged one)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.config.compose import compose
from finetune.errors import UserError
from finetune.models.device import device_type
from finetune.models.load import load_model
from finetune.models.tokenizer import load_tokenizer
from finetune.run.directory import is_run, read_run, write_atomic
from finetune.run.load import load_run
from finetune.tasks import build_task

MODEL_DIR_OVERRIDES = ["model.init=pretrained", "model.gguf_file=null", "model.tokenizer=null",
                       "model.arch={}", "model.name=custom"]


def evaluate_path(path: str | Path, overrides: list[str] = (), config_dir: str | None = None) -> dict:
    path = Path(path).expanduser().resolve()
    if is_run(path):
        info = read_run(path)
        changes = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in ("model", "method")]
        if changes:
            raise UserError(f"{changes[0]}: `finetune eval RUN` evaluates the model the run trained (model and method "
                            "as it recorded them); overrides may choose the task and its settings, trainer.device, ...; "
                            "to evaluate another model, pass its directory")
        cfg = compose(list(info.get("overrides", [])) + list(overrides),
                      config_dir or info.get("config_dir"))
        device = device_type(cfg.trainer)
        model, _, tokenizer, _ = load_run(path, device)
    elif (path / "config.json").is_file():
        cfg = compose(list(overrides) + [f"model.path={path}", *MODEL_DIR_OVERRIDES], config_dir)
        device = device_type(cfg.trainer)
        model, tokenizer = load_model(cfg.model, device, dtype="float32"), load_tokenizer(cfg.model)
    else:
        raise UserError(f"{path}: neither a finetune run directory nor a model directory (config.json)")
    model.to(device).eval()
    task = build_task(cfg.task, tokenizer)
    metrics = task.evaluate(model, device)
    result = {"task": cfg.task.name, "metric": task.metric, "metrics": metrics, "path": str(path)}
    if is_run(path):
        write_atomic(path / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
