"""Held-out loss and perplexity: the mean negative log-likelihood per target token (labels ≠ -100)
over a set of examples, and its exponential. Used by the instruct, cpt and pretrain tasks."""

from __future__ import annotations

import math

import torch

from finetune import progress
from finetune.data.batching import collate, count_loss_tokens
from finetune.models.loss import causal_lm_loss_sum


@torch.no_grad()
def perplexity(model, examples, pad_id: int, device, batch_size: int = 8) -> dict:
    """``{"perplexity", "loss", "tokens", "n"}`` of ``model`` on ``examples`` (a sequence of
    ``{"input_ids", "labels"[, "position_ids"]}``). Batches group examples of similar length; the
    sum over tokens does not depend on the batching."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, tokens = 0.0, 0
    with progress.bar(total=len(order), desc="eval", unit="example", leave=False) as bar:  # closed before any message
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(causal_lm_loss_sum(model, batch))
            tokens += count_loss_tokens(batch)
            bar.update(min(batch_size, len(order) - start))
    loss = total / tokens if tokens else float("nan")
    return {"perplexity": math.exp(loss) if tokens else float("nan"), "loss": loss, "tokens": tokens,
            "n": len(examples)}
