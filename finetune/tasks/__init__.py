"""Task registry. A task turns its config and a tokenizer into training examples and evaluates a
model with its metric. Each task lives in ``finetune/tasks/<name>.py`` and defines ``Task``:

    task = Task(cfg.task, tokenizer)
    task.train_examples()       -> a sequence of {"input_ids": [...], "labels": [...]} (labels -100 =
                                   no loss; packed rows add "position_ids", restarting per example)
    task.evaluate(model, device) -> dict of metrics; task.metric names the primary one
    task.train_modules           (optional) base modules to train in full next to the adapter

Building a task is cheap; data is read and tokenized (and cached) when first asked for.
"""

from __future__ import annotations

import importlib

from finetune.errors import UserError

TASKS = ("memorize", "gsm8k", "instruct", "cpt", "pretrain")


def build_task(task_cfg, tokenizer):
    name = task_cfg.name
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    module = importlib.import_module(f"finetune.tasks.{name}")
    return module.Task(task_cfg, tokenizer)
