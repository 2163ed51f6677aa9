"""Full fine-tuning: every parameter of the model trains (the baseline)."""

from __future__ import annotations

from torch import nn

from finetune.adapters.base import Adapter
from finetune.errors import UserError

# Every weight moves at once: full fine-tuning trains at this multiple of trainer.lr unless
# method.lr is set (trainer.lr is sized for adapters, whose updates start from zero).
FULL_LR_RATIO = 0.025


class FullAdapter(Adapter):
    method = "full"

    def named_trainable(self):
        # named_parameters() lists tied weights (embeddings / lm_head) once.
        yield from self.model.named_parameters()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return super().param_groups(self.settings.get("lr") or FULL_LR_RATIO * lr, weight_decay)


def attach(model: nn.Module, lr: float | None = None) -> FullAdapter:
    if lr is not None and not lr > 0:
        raise UserError(f"method.lr={lr}: must be > 0")
    for p in model.parameters():
        p.requires_grad_(True)
    return FullAdapter(model, layers={}, settings={"lr": lr})
