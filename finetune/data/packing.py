"""The last steps from tokenized rows to training rows: the length limit (``task.max_length``,
``task.on_overflow``) and packing several examples into one row (``task.packing``), with position
ids that restart per example so that packed examples never attend to each other."""

from __future__ import annotations

from finetune.data.examples import IGNORE, Examples
from finetune.errors import UserError


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

    examples = examples.select(np.flatnonzero(examples.lengths() > 0))
    groups = pack_rows(examples.lengths(), capacity)
    flat = examples.select([i for g in groups for i in g])
    labels = np.array(flat.arrays["labels"], copy=True)
    labels[flat.offsets[:-1]] = IGNORE
    row_lengths = [int(examples.lengths()[g].sum()) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(row_lengths, dtype=np.int64)])
    return Examples(offsets, input_ids=flat.arrays["input_ids"], labels=labels,
                    position_ids=segment_positions(flat.lengths()))
