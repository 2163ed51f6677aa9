"""``finetune data``: the rows training will see, with the loss mask visible.

The rows are the task's own ``train_examples()`` (tokenized, length-limited, packed as configured),
built exactly as ``finetune train`` builds them; only the tokenizer is loaded, never the model. A
token "has loss" when its label is not -100 and something precedes it in its row (labels are
shifted by one in the causal-LM loss, as in :func:`finetune.data.batching.count_loss_tokens`).
"""

from __future__ import annotations

import numpy as np

from finetune.data.examples import IGNORE, Examples
from finetune.errors import UserError
from finetune.models.tokenizer import load_tokenizer
from finetune.tasks import build_task

LEGEND = "+ tokens with loss (the model learns to predict them) · - context only (no loss)"


def _arrays(examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row offsets, labels, example starts) of all rows as flat arrays."""
    if not isinstance(examples, Examples):
        examples = Examples.from_rows(examples)
    labels = np.asarray(examples.arrays["labels"])
    positions = examples.arrays.get("position_ids")
    starts = (np.asarray(positions) == 0) if positions is not None else np.zeros(len(labels), dtype=bool)
    starts[examples.offsets[:-1][examples.lengths() > 0]] = True
    return examples.offsets, labels, starts


def has_loss(labels) -> np.ndarray:
    """Per token of one row: whether it contributes to the loss (never the row's first)."""
    out = np.asarray(labels) != IGNORE
    out[:1] = False
    return out


def summary(examples) -> dict:
    """Rows, tokens, loss tokens, examples and row lengths of the (non-empty list of) training rows."""
    offsets, labels, starts = _arrays(examples)
    lengths = np.diff(offsets)
    loss = (labels != IGNORE) & ~np.isin(np.arange(len(labels)), offsets[:-1])
    return {"rows": len(lengths), "tokens": len(labels), "loss_tokens": int(loss.sum()),
            "examples": int(starts.sum()),
            "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_max": int(lengths.max())}


def spans(row: dict) -> list[tuple[str, list[int]]]:
    """A row as consecutive runs of tokens: ("+", ids) with loss, ("-", ids) without, and
    ("example", []) where a packed row starts its next example."""
    ids = row["input_ids"]
    loss = has_loss(row["labels"])
    starts = {i for i, p in enumerate(row.get("position_ids") or []) if p == 0 and i > 0}
    out: list[tuple[str, list[int]]] = []
    for i, token in enumerate(ids):
        if i in starts:
            out.append(("example", []))
        kind = "+" if loss[i] else "-"
        if out and out[-1][0] == kind:
            out[-1][1].append(token)
        else:
            out.append((kind, [token]))
    return out


def render_row(tokenizer, row: dict, index: int) -> str:
    """One row as text: a header line, then one line per run, decoded with special tokens kept
    and newlines / whitespace made visible (Python string repr)."""
    n = len(row["input_ids"])
    loss = int(has_loss(row["labels"]).sum())
    examples = 1 + sum(1 for i, p in enumerate(row.get("position_ids") or []) if p == 0 and i > 0)
    lines = [f"row {index}: {n} tokens, {loss} with loss, {examples} example{'s' if examples > 1 else ''}"]
    for kind, ids in spans(row):
        if kind == "example":
            lines.append("  -- next example --")
        else:
            lines.append(f"  {kind} {tokenizer.decode(ids, skip_special_tokens=False)!r}")
    return "\n".join(lines)


def render(cfg, tokenizer, examples, rows: int) -> str:
    s = summary(examples)
    pct = 100.0 * s["loss_tokens"] / max(s["tokens"], 1)
    head = [f"task {cfg.task.name}: {s['rows']:,} training rows ({s['examples']:,} examples), "
            f"{s['tokens']:,} tokens, {s['loss_tokens']:,} with loss ({pct:.1f}%)",
            f"row length: min {s['length_min']}, median {s['length_median']:g}, max {s['length_max']} "
            f"(task.max_length={cfg.task.get('max_length')}, packing={cfg.task.get('packing', False)})",
            LEGEND, ""]
    body = [render_row(tokenizer, examples[i], i) for i in range(min(rows, len(examples)))]
    return "\n".join(head) + "\n\n".join(body) + "\n"


def preview(cfg, rows: int = 3) -> str:
    """The summary and the first ``rows`` training rows of ``cfg``'s task, as text."""
    if rows < 0:
        raise UserError(f"--rows {rows}: must be 0 or more")
    tokenizer = load_tokenizer(cfg.model)
    examples = build_task(cfg.task, tokenizer).train_examples()
    if not len(examples):
        raise UserError(f"task {cfg.task.name}: no training examples")
    return render(cfg, tokenizer, examples, rows)
