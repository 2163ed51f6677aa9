"""Full fine-tuning: every parameter of the model trains (the baseline)."""

from __future__ import annotations

from torch import nn

from finetune.adapters.base import Adapter


class FullAdapter(Adapter):
    method = "full"

    def named_trainable(self):
        # named_parameters() lists tied weights (embeddings / lm_head) once.
        yield from self.model.named_parameters()


def attach(model: nn.Module) -> FullAdapter:
    for p in model.parameters():
        p.requires_grad_(True)
    return FullAdapter(model, layers={}, settings={})
