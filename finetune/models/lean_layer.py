"""Decoder layers that keep less for the backward: their norms' inputs but not their outputs, and
attention's output once.

In a Llama-style decoder layer each RMSNorm's output feeds the projections after it (q, k, v after
the first, gate and up after the second), and their adapters keep it for their own gradients, while
the norm's backward keeps its input. Both are activation-sized; the output is a few element-wise
operations away from the input. Likewise o_proj keeps its input, attention's output, which the
attention kernel has already kept in its own layout (finetune.models.attention records how to
rebuild it). Here, while a layer runs its forward, a saved-tensor hook keeps a recipe instead of
any tensor saved from such an output, and the backward recomputes the output once, when its first
reader asks for it. Every result and gradient is bit-identical to the unpatched model; what
changes is one hidden-sized tensor per norm and one for attention, three per layer
(docs/benchmarks.md, "Where the memory goes").

``keep_less_in_layers(model)`` switches the blocks of the layer stack (the modules of an
``nn.ModuleList``) that have an RMSNorm child whose ``forward`` is exactly Llama's, except the
blocks gradient checkpointing recomputes whole (all of them, or every n-th). Not used with sharded
parameters (FSDP, DeepSpeed ZeRO-3), where the norm's weight may be gone when the backward reaches
the projections.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.models.recipes import Recomputed, as_recipe, in_checkpointed_layers, is_lean, lean_class, unpack


class _NormOutput(Recomputed):
    """A norm's output as (norm, input)."""

    def __init__(self, norm: nn.Module, x: torch.Tensor):
        super().__init__([x], f"the input of {type(norm).__name__}")
        self.norm, self.x = norm, x

    def compute(self) -> torch.Tensor:
        return _original_forward(self.norm)(self.norm, self.x)


class _Recipes:
    """Saved-tensor hooks for one layer's forward: a tensor saved from the storage of an output
    recorded here is kept as that output's recipe and its view; every other tensor as it is."""

    def __init__(self):
        self.outputs: dict[int, tuple] = {}  # storage address -> (recipe, output's version at record)
        self.alive: list[torch.Tensor] = []  # the outputs stay alive meanwhile, so addresses stay theirs

    def record(self, recipe, y: torch.Tensor) -> None:
        self.outputs[y.untyped_storage().data_ptr()] = (recipe, y._version)
        self.alive.append(y)

    def close(self) -> None:
        """At the end of the layer's forward (each saved tensor holds on to ``pack``, so the
        outputs are let go here)."""
        self.outputs.clear()
        self.alive.clear()

    def pack(self, t: torch.Tensor):
        recipe, version = self.outputs.get(t.untyped_storage().data_ptr(), (None, None))
        # a reader saving the output after an in-place change keeps it: the recipe gives the value from before
        return t if recipe is None or t._version != version else as_recipe(recipe, t)

    unpack = staticmethod(unpack)


_ACTIVE: list[_Recipes] = []  # the recipes of the layers whose forward is running (innermost last)


def keep_as_recipe(y: torch.Tensor, recipe) -> None:
    """Inside a lean layer's forward with gradients on, let readers that save ``y`` keep
    ``recipe`` (whose ``value()`` gives ``y``'s whole storage back) instead; otherwise nothing."""
    if _ACTIVE and torch.is_grad_enabled():
        _ACTIVE[-1].record(recipe, y)


def _original_forward(module: nn.Module):
    return type(module).__bases__[0].forward  # the class the lean one derives from


def lean_norm_forward(self, x):
    y = _original_forward(self)(self, x)
    keep_as_recipe(y, _NormOutput(self, x))
    return y


def lean_layer_forward(self, *args, **kwargs):
    forward = _original_forward(self)
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    recipes = _Recipes()
    _ACTIVE.append(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            return forward(self, *args, **kwargs)
    finally:
        _ACTIVE.pop()
        recipes.close()


def qualifies(norm: nn.Module) -> bool:
    """An RMSNorm whose forward is Llama's (the same bytecode), not patched on the instance."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    code = getattr(getattr(type(norm), "forward", None), "__code__", None)
    ref = LlamaRMSNorm.forward.__code__
    return (code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names
            and "forward" not in norm.__dict__)


def keep_less_in_layers(model: nn.Module) -> int:
    """Switch every block of ``model``'s layer stacks that has a qualifying norm child (classes become
    subclasses with only ``forward`` replaced; parameters and state-dict keys unchanged); returns
    how many blocks."""
    count, checkpointed = 0, in_checkpointed_layers(model)
    for stack in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for layer in stack:
            norms = [child for child in layer.children() if qualifies(child)]
            if not norms or is_lean(layer) or "forward" in layer.__dict__ or id(layer) in checkpointed:
                continue
            for norm in norms:
                norm.__class__ = lean_class(type(norm), lean_norm_forward)
            layer.__class__ = lean_class(type(layer), lean_layer_forward)
            count += 1
    return count
