"""Saved tensors kept as the recipe that recomputes them: the two halves of a pair of saved-tensor
hooks (``torch.autograd.graph.saved_tensors_hooks``) shared by the lean MLP and the lean layers,
the lean subclasses through which those modules get their forward, and the layers they stay out of
(those gradient checkpointing recomputes whole).

A recipe is any object whose ``value()`` returns the tensor it stands for (the whole storage the
saved tensor viewed); the saved view is taken again on unpacking. ``Recomputed`` is the common
kind: computed once in the backward from inputs checked unchanged, and shared by its readers.
"""

from __future__ import annotations

import torch
from torch import nn


def as_recipe(recipe, t: torch.Tensor) -> tuple:
    """What a pack hook returns to keep ``t`` (a view of ``recipe``'s tensor) as ``recipe``."""
    return recipe, t.size(), t.stride(), t.storage_offset()


class Recomputed:
    """A recipe computed again on first use from ``inputs`` (checked not to have been changed in
    place since the forward), then shared by all its readers. Subclasses give ``compute()``."""

    def __init__(self, inputs: list[torch.Tensor], what: str):
        self.inputs, self.versions, self.what, self.y = inputs, [t._version for t in inputs], what, None

    def compute(self) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        if self.y is None:
            if [t._version for t in self.inputs] != self.versions:
                raise RuntimeError(f"{self.what} was modified in place after the forward; "
                                   "it cannot be recomputed for the backward")
            with torch.no_grad():
                self.y = self.compute()
        return self.y


def unpack(packed) -> torch.Tensor:
    """The unpack hook: a tensor kept as it is, or the view of its recipe's recomputed value."""
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, size, stride, offset = packed
    return recipe.value().as_strided(size, stride, offset)


_LEAN: dict[type, type] = {}  # original module class -> its lean subclass


def lean_class(cls: type, forward) -> type:
    """``cls`` with only ``forward`` replaced, under the same name (made once per class); the
    original forward stays reachable as ``cls.forward``."""
    if cls not in _LEAN:
        _LEAN[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})
    return _LEAN[cls]


def is_lean(module) -> bool:
    return type(module) in _LEAN.values()


def in_checkpointed_layers(model: nn.Module) -> set[int]:
    """``id``s of the modules inside the blocks of ``model``'s layer stacks that gradient
    checkpointing recomputes whole (transformers' per-layer ``gradient_checkpointing`` flag on).
    Lean forwards stay off there: checkpointing's own saved-tensor hooks decide what is kept."""
    return {id(m) for stack in model.modules() if isinstance(stack, nn.ModuleList)
            for layer in stack if getattr(layer, "gradient_checkpointing", False) is True
            for m in layer.modules()}
