"""Pieces shared by the data tasks (gsm8k, instruct, cpt, pretrain): their data sources from the
config, the held-out split, and the last steps from tokenized rows to training rows (length limit,
rows without loss, packing)."""

from __future__ import annotations

import logging

import numpy as np

from finetune.data.examples import IGNORE
from finetune.data.packing import fit_to_length, pack
from finetune.data.sources import Source
from finetune.errors import UserError

log = logging.getLogger("finetune")


def data_source(cfg, default_path: str | None = None, default_name: str | None = None) -> Source:
    """``task.data`` as a :class:`Source`; a null path means the task's default hub dataset."""
    d = cfg.data
    if d.path is None and default_path is None:
        raise UserError("task.data.path is empty: give a local file or folder, or a hub dataset id")
    name = d.name if (d.path is not None or d.name is not None) else default_name
    return Source(d.path or default_path, name, d.split, d.revision, d.limit, key="task.data.path")


def eval_source(cfg, hub_names: dict | None = None) -> Source | None:
    """``task.eval_path`` as a :class:`Source` (split ``task.eval_split``), or None."""
    if not cfg.eval_path:
        return None
    return Source(cfg.eval_path, (hub_names or {}).get(cfg.eval_path), cfg.eval_split, key="task.eval_path")


def holdout_split(n: int, holdout: int, where: str) -> tuple[range, range]:
    """(training, held-out) index ranges: the last ``holdout`` of ``n`` rows are held out."""
    if holdout == 0:
        raise UserError("task.eval_holdout=0 and no task.eval_path: nothing is held out to evaluate on; set "
                        "task.eval_holdout to a number of records, or give held-out data with task.eval_path")
    if holdout >= n:
        raise UserError(f"task.eval_holdout={holdout} would hold out all {n} examples of {where}; lower "
                        "it, or give held-out data with task.eval_path")
    return range(0, n - holdout), range(n - holdout, n)


def first(examples, limit: int | None):
    """The first ``limit`` examples or items (all with None)."""
    if limit is None or limit >= len(examples):
        return examples
    return examples[:limit] if isinstance(examples, list) else examples.select(range(limit))


def rows_with_loss(examples) -> np.ndarray:
    """Whether each row has a predicted token (a label ≠ -100 after its first position)."""
    mask = np.asarray(examples.arrays["labels"]) != IGNORE
    starts = examples.offsets[:-1]
    mask[starts[examples.lengths() > 0]] = False
    counts = np.concatenate([[0], np.cumsum(mask)])
    return (counts[examples.offsets[1:]] - counts[starts]) > 0


def finish(examples, cfg, where: str, packing: bool = False):
    """Length limit (``task.on_overflow``), rows without any loss token left out (logged), then
    packing into rows of ``task.max_length`` when asked."""
    examples = fit_to_length(examples, cfg.max_length, cfg.on_overflow, where)
    useful = rows_with_loss(examples)
    if not useful.all():
        log.warning(f"{where}: {int((~useful).sum())} of {len(examples)} examples have no token to learn "
                    "(e.g. a prompt that fills task.max_length) and were left out")
        examples = examples.select(np.flatnonzero(useful))
    if len(examples) == 0:
        raise UserError(f"{where}: no example is left to train on; check task.max_length and the data")
    return pack(examples, cfg.max_length) if packing else examples
