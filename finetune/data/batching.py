"""Batching: a deterministic example stream and collation with right padding.

The stream is a function of the optimizer step: step ``s`` consumes the global batch
``order[s·G : (s+1)·G]`` of an endless sequence of seeded per-epoch permutations, with
G = batch_size × grad_accum × processes. Each process takes its own micro-batches of that global
batch. Because the position in the data is just the step number, resuming is exact, and 1 process
× accumulation 8 sees the same examples per step as 8 processes × accumulation 1.
"""

from __future__ import annotations

import random

import torch

IGNORE = -100


class ExampleStream:
    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError("no training examples")
        self.n = num_examples
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """``count`` example indices starting at stream position ``start``."""
        out = []
        for pos in range(start, start + count):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def micro_batches(self, step: int, batch_size: int, grad_accum: int, rank: int = 0,
                      world: int = 1) -> list[list[int]]:
        """Index lists of this process's ``grad_accum`` micro-batches for optimizer step ``step``."""
        g = batch_size * grad_accum * world
        idx = self.indices(step * g, g)
        mine = idx[rank * batch_size * grad_accum:(rank + 1) * batch_size * grad_accum]
        return [mine[i * batch_size:(i + 1) * batch_size] for i in range(grad_accum)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``labels`` to the longest example; padding gets label -100.
    Packed rows (with ``position_ids``) keep them; the padding after a row is one more segment
    with positions 0, 1, … (finetune.models.loss then lets the model mask by segments)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = "position_ids" in examples[0]
    positions = torch.arange(width).repeat(len(examples), 1) if packed else None
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(e["position_ids"], dtype=torch.long)
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = positions
    return batch


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the causal-LM loss (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# --------------------------------------------------------------------------------------------
# Length limit (task.max_length, task.on_overflow) and packing (task.packing)
# --------------------------------------------------------------------------------------------


def fit_to_length(examples, max_length: int, on_overflow: str, where: str):
    """Apply ``task.on_overflow`` to the examples (a :class:`finetune.data.examples.Examples`) longer
    than ``max_length`` tokens: ``truncate`` keeps their first ``max_length`` tokens, ``drop``
    leaves them out (both say how many in the log), ``error`` stops naming the first one."""
    import logging

    import numpy as np

    lengths = examples.lengths()
    long = np.flatnonzero(lengths > max_length)
    if len(long) == 0:
        return examples
    policy = getattr(on_overflow, "value", on_overflow)
    if policy == "error":
        from finetune.errors import UserError

        raise UserError(f"{where}: example {long[0]} has {lengths[long[0]]} tokens, more than "
                        f"task.max_length={max_length} ({len(long)} of {len(examples)} examples are); raise "
                        "task.max_length, or set task.on_overflow=truncate or drop")
    done = "left out" if policy == "drop" else f"truncated to {max_length} tokens"
    logging.getLogger("finetune").warning(
        f"{where}: {len(long)} of {len(examples)} examples are longer than task.max_length={max_length} "
        f"tokens and were {done} (task.on_overflow={policy})")
    if policy == "drop":
        return examples.select(np.flatnonzero(lengths <= max_length))
    return examples.truncated(max_length)


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens, best-fit decreasing: each
    example, longest first, goes into the row with the least room that still fits it. Deterministic;
    rows are typically > 95 % full."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> rows with exactly that much room
    rooms: list[int] = []  # the keys of by_room, sorted
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row's {capacity}")
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        room -= n
        if room > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            by_room[room].append(row)
    return rows


def segment_positions(lengths):
    """Positions 0, 1, … restarting at every segment of the given lengths, as one flat array."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def pack(examples, capacity: int):
    """Packed rows of at most ``capacity`` tokens (an :class:`finetune.data.examples.Examples`). A row
    concatenates its examples; ``position_ids`` restart at 0 for each one, so the model attends only
    within an example (block-diagonal causal attention; see ``finetune.models.loss.model_inputs``), and the
    label of each example's first token becomes -100, since nothing predicts it unpacked either.
    Rows are ordered by the packing; the training stream shuffles them."""
    import numpy as np

    from finetune.data.examples import Examples

    examples = examples.select(np.flatnonzero(examples.lengths() > 0))
    groups = pack_rows(examples.lengths(), capacity)
    flat = examples.select([i for g in groups for i in g])
    labels = np.array(flat.arrays["labels"], copy=True)
    labels[flat.offsets[:-1]] = IGNORE
    row_lengths = [int(examples.lengths()[g].sum()) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(row_lengths, dtype=np.int64)])
    return Examples(offsets, input_ids=flat.arrays["input_ids"], labels=labels,
                    position_ids=segment_positions(flat.lengths()))
