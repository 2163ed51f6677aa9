"""LoRA (methods.md §1): a low-rank update ΔW = s · B · A.

    y = base_layer(x) + s · B · (A · drop(x)),    A ∈ R^{r×k}, B ∈ R^{d×r}

s = α / r, or α / √r with rsLoRA. A starts Kaiming-uniform (U(±1/√k)) or Gaussian N(0, 1/r²),
B starts at zero, so the adapted model equals the base model at step 0.

ReLoRA (methods.md §3, the LoRA baseline of ReMoRA) lives in :meth:`LoraAdapter.on_optimizer_step`:
every ``relora_every`` optimizer steps s·B·A is merged into W0 (fp32 sum, rounded once), A is
re-initialised Kaiming-uniform and B set to 0 (the model's function is unchanged), the optimizer
state of A and B is dropped and the LR schedule restarts with a linear re-warmup — the same
:class:`Restart` as ReMoRA, applied by the training loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.adapters.base import Adapter, AdapterLayer, Restart, find_targets, inject, is_quantized
from finetune.adapters.fast import low_rank_forward
from finetune.config.schema import ALL_LINEAR
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

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return low_rank_forward(self, x, self.lora_A, self.lora_B, self.scaling)

    def _delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def branch_flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)  # x·Aᵀ, then ·Bᵀ

    @torch.no_grad()
    def absorb(self) -> None:
        """ReLoRA: W0 ← W0 + s·B·A, then A re-initialised Kaiming-uniform and B = 0 (methods.md §3
        step 2). The layer stays unmerged; the function it computes is unchanged."""
        if self.merged:  # ΔW is already in W0
            self.merged = False
        else:
            self._add_to_base(+1.0)
        self.reset("kaiming")


class LoraAdapter(Adapter):
    method = "lora"

    def merges_into_base(self) -> bool:
        return int(self.settings.get("relora_every") or 0) > 0

    def on_optimizer_step(self, step: int) -> Restart | None:
        """ReLoRA trigger: after the optimizer step that makes ``step`` a positive multiple of
        ``relora_every`` (optimizer steps, not micro-batches)."""
        every = int(self.settings.get("relora_every") or 0)
        if every > 0 and step > 0 and step % every == 0:
            return self.relora_trigger(step)
        return None

    @torch.no_grad()
    def relora_trigger(self, step: int) -> Restart:
        """Merge and re-initialise every layer; the returned restart resets A's and B's optimizer
        state and restarts the LR."""
        for layer in self.layers.values():
            layer.absorb()
        reset = self.parameters() if self.settings.get("relora_reset_optimizer", True) else []
        return Restart(step, int(self.settings.get("relora_warmup", 50)), reset)


def attach(model: nn.Module, rank: int = 8, alpha: float = 16.0, rslora: bool = False,
           dropout: float = 0.0, init: str = "kaiming", targets=tuple(ALL_LINEAR), relora_every: int = 0,
           relora_warmup: int = 50, relora_reset_optimizer: bool = True) -> LoraAdapter:
    """Wrap every targeted layer of ``model`` with a LoRA layer; freeze everything else.
    ``relora_every`` > 0 turns on ReLoRA, which merges in place and so needs a dense base."""
    if rank <= 0:
        raise UserError(f"method.rank={rank} must be a positive integer")
    if init not in ("kaiming", "gaussian"):
        raise UserError(f"method.init={init!r} is not a LoRA init; allowed: kaiming, gaussian")
    if isinstance(relora_every, bool) or not isinstance(relora_every, int) or relora_every < 0:
        raise UserError(f"method.relora_every={relora_every!r}: must be an integer >= 0 (0: ReLoRA off)")
    if relora_warmup < 0:
        raise UserError(f"method.relora_warmup={relora_warmup}: must be >= 0")
    targets = targets if isinstance(targets, str) else list(targets)
    if relora_every > 0:
        for name in find_targets(model, targets):
            if is_quantized(model.get_submodule(name)):
                raise UserError(f"ReLoRA merges into the base weights every {relora_every} steps, which the "
                                f"quantized layer {name} cannot hold; load the model unquantized or set "
                                "method.relora_every=0")
    layers = inject(model, targets, lambda name, m: LoraLayer(m, rank, alpha, rslora, dropout, init), rank)
    settings = dict(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, init=init, targets=targets,
                    relora_every=relora_every, relora_warmup=relora_warmup,
                    relora_reset_optimizer=relora_reset_optimizer)
    return LoraAdapter(model, layers, settings)
