"""The causal-LM loss as a *sum* over target tokens (the caller divides by the token count of the
whole accumulation window, so micro-batching never changes the loss; field.md pain point 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data import IGNORE


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_lm_loss_sum(model, batch: dict) -> torch.Tensor:
    """Σ over target tokens of −log p(token | prefix), in fp32."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
