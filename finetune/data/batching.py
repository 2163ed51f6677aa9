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

from finetune.data.examples import IGNORE


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
