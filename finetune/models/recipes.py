"""Saved tensors kept as the recipe that recomputes them: the two halves of a pair of saved-tensor
hooks (``torch.autograd.graph.saved_tensors_hooks``) shared by the lean MLP and the lean layers,
and the lean subclasses through which those modules get their forward.

A recipe is any object whose ``value()`` returns the tensor it stands for (the whole storage the
saved tensor viewed); the saved view is taken again on unpacking.
"""

from __future__ import annotations

import torch


def as_recipe(recipe, t: torch.Tensor) -> tuple:
    """What a pack hook returns to keep ``t`` (a view of ``recipe``'s tensor) as ``recipe``."""
    return recipe, t.size(), t.stride(), t.storage_offset()


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
