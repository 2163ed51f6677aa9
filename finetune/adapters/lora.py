"""LoRA (methods.md §1): a low-rank update ΔW = s · B · A.

    y = base_layer(x) + s · B · (A · drop(x)),    A ∈ R^{r×k}, B ∈ R^{d×r}

s = α / r, or α / √r with rsLoRA. A starts Kaiming-uniform (U(±1/√k)) or Gaussian N(0, 1/r²),
B starts at zero, so the adapted model equals the base model at step 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.adapters.base import ALL_LINEAR, Adapter, AdapterLayer, inject
from finetune.errors import UserError


class LoraLayer(AdapterLayer):
    method = "lora"
    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, rslora: bool = False,
                 dropout: float = 0.0, init: str = "kaiming"):
        super().__init__(base_layer, dropout)
        device = next(base_layer.parameters()).device
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str = "kaiming") -> None:
        """A random, B = 0 (also used by ReLoRA after each merge)."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # = U(-1/√k, 1/√k)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            raise UserError(f"method.init={init!r} is not a LoRA init; allowed: kaiming, gaussian")
        self.lora_B.zero_()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoraAdapter(Adapter):
    method = "lora"


def attach(model: nn.Module, rank: int = 8, alpha: float = 16.0, rslora: bool = False,
           dropout: float = 0.0, init: str = "kaiming", targets=tuple(ALL_LINEAR)) -> LoraAdapter:
    """Wrap every targeted layer of ``model`` with a LoRA layer; freeze everything else."""
    if rank <= 0:
        raise UserError(f"method.rank={rank} must be a positive integer")
    if init not in ("kaiming", "gaussian"):
        raise UserError(f"method.init={init!r} is not a LoRA init; allowed: kaiming, gaussian")
    targets = targets if isinstance(targets, str) else list(targets)
    layers = inject(model, targets, lambda name, m: LoraLayer(m, rank, alpha, rslora, dropout, init))
    settings = dict(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, init=init, targets=targets)
    return LoraAdapter(model, layers, settings)
