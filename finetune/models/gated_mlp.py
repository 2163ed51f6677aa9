"""The gated MLP keeping two tensors for its backward instead of four.

Llama's MLP, and the many models whose MLP is the same code, compute ``down(silu(gate(x)) · up(x))``.
Autograd keeps four intermediate-sized tensors of it per layer until the backward: gate's output
``g`` (for SiLU's gradient), ``silu(g)`` and up's output ``u`` (for the product's) and the product
``p`` (for the gradient of down_proj's adapter or weight). ``g`` and ``u`` suffice: ``silu(g)`` and
``p`` are two elementwise operations away. Here the product is one autograd Function that keeps
``g`` and ``u``, and when down_proj saves ``p`` for its backward a saved-tensor hook keeps the
recipe instead and recomputes ``p`` when the backward asks for it. Every result and gradient is
bit-identical to the unpatched model (the same operations on the same inputs); what changes is
about half the MLP's activation memory, for a few elementwise passes in the backward
(docs/benchmarks.md, "Where the memory goes").

``keep_less_for_training(model)`` switches the MLPs that qualify: their ``forward`` is exactly
Llama's (the same bytecode) and their activation SiLU. Outside training (no gradient needed) the
patched forward is the original computation. Not used inside the decoder layers that gradient
checkpointing recomputes whole: it has saved-tensor hooks of its own there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from finetune.models.recipes import as_recipe, in_checkpointed_layers, lean_class, unpack


class _SiluProduct(torch.autograd.Function):
    """``silu(g) · u``, keeping only ``g`` and ``u``; the same gradients as autograd's own ops."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)  # in place: one intermediate-sized tensor in flight, not two

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if need_g else None
        grad_u = F.silu(g).mul_(grad) if need_u else None
        return grad_g, grad_u


class _Recipe:
    """Saved-tensor hooks under which a tensor saved from ``p``'s storage is kept as ``(g, u)`` and
    its view, and recomputed on unpacking; every other tensor is kept as it is."""

    def __init__(self, p: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
        self.storage, self.g, self.u = p.untyped_storage().data_ptr(), g, u

    def pack(self, t: torch.Tensor):
        return t if t.untyped_storage().data_ptr() != self.storage else as_recipe(self, t)

    def value(self) -> torch.Tensor:
        with torch.no_grad():
            return F.silu(self.g).mul_(self.u)

    unpack = staticmethod(unpack)


def lean_forward(self, x):
    g, u = self.gate_proj(x), self.up_proj(x)
    if not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad)):
        return self.down_proj(self.act_fn(g) * u)
    p = _SiluProduct.apply(g, u)
    recipe = _Recipe(p, g, u)
    with torch.autograd.graph.saved_tensors_hooks(recipe.pack, recipe.unpack):
        return self.down_proj(p)


def _llama_forward_code():
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP.forward.__code__


def qualifies(module: nn.Module) -> bool:
    """An MLP whose forward is Llama's, with a SiLU activation nobody has patched."""
    from transformers.activations import SiLUActivation

    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), _llama_forward_code()
    if code is None or code.co_code != ref.co_code or code.co_names != ref.co_names:
        return False
    act = getattr(module, "act_fn", None)
    return type(act) in (SiLUActivation, nn.SiLU) and "forward" not in act.__dict__ and "forward" not in module.__dict__


def keep_less_for_training(model: nn.Module) -> int:
    """Give every qualifying MLP of ``model`` the lean forward (its class becomes a subclass with
    only ``forward`` replaced; parameters and state-dict keys unchanged); returns how many."""
    count, checkpointed = 0, in_checkpointed_layers(model)
    for module in model.modules():
        if qualifies(module) and id(module) not in checkpointed:  # (a lean class no longer has Llama's forward)
            module.__class__ = lean_class(type(module), lean_forward)
            count += 1
    return count
