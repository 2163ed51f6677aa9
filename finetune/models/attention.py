"""Attention for packed rows, one example at a time.

A packed row (``task.packing=true``, finetune.data.packing) holds several examples one after
another, with position ids that restart at each. transformers' ``sdpa`` attention keeps them
apart with a block-diagonal mask, but the fused kernels still visit the whole row × row square
(on the CPU a masked 512-token row costs more than a causal one). Here the row is cut where its
position ids restart and each example attends causally within itself only, with the same
``scaled_dot_product_attention`` call: the same result (to float rounding), a fraction of the work
(Σ lᵢ² instead of L²), and no mask at all.

It is registered with transformers' attention interface as ``PACKED`` and set on a model for
training (``use_for_training``); it is not saved with a model (transformers leaves the attention
implementation out of config.json). Only a module in training mode whose row and keys are the
position ids' row is cut; everything else (one example per row, evaluation and generation, whose
left-padded prompts also have irregular position ids, a KV cache, soft-capping or attention sinks,
an example longer than a sliding window) goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.models.lean_layer import keep_as_recipe
from finetune.models.recipes import Recomputed

PACKED = "finetune_packed_sdpa"
# attention-interface arguments under which attention is not plain causal softmax attention
# (logit soft-capping, attention sinks, relative position bias, head masks): transformers' path
CHANGE_THE_MATH = ("softcap", "s_aux", "position_bias", "head_mask")


def example_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a packed row's example begins: the row's first position, and wherever the
    position id does not follow its predecessor."""
    pos = position_ids.detach()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def segments(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row, the lengths of its examples (:func:`example_starts`); None when no row holds more
    than one."""
    starts = example_starts(position_ids)
    if not bool(starts[:, 1:].any()):
        return None
    lengths = []
    for row in starts.cpu():
        begin = row.nonzero().flatten().tolist() + [row.numel()]
        lengths.append([b - a for a, b in zip(begin, begin[1:])])
    return lengths


class _Segments:
    """The last position-ids tensor seen and its segments: every layer of one forward gets the
    same tensor object, so the cut is computed once per forward (and synchronised once on a GPU).
    The tensor is held, so its identity cannot pass to another while it is the key."""

    tensor: torch.Tensor | None = None
    version: int = -1
    value: list[list[int]] | None = None

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> list[list[int]] | None:
        if position_ids is not cls.tensor or position_ids._version != cls.version:
            cls.tensor, cls.version, cls.value = position_ids, position_ids._version, segments(position_ids)
        return cls.value


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature: query (b, heads, L, d), key/value (b, kv_heads,
    L, d) → ((b, L, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    lengths = None
    if (module.training and position_ids is not None and position_ids.dim() == 2 and query.shape[2] > 1
            and query.shape[2] == key.shape[2] == position_ids.shape[1] and getattr(module, "is_causal", True)
            and all(kwargs.get(k) is None for k in CHANGE_THE_MATH)):
        lengths = _Segments.of(position_ids)
        window = kwargs.get("sliding_window")
        if lengths is not None and window and max(max(cut) for cut in lengths) > window:
            lengths = None  # an example longer than the window: the mask says what each token sees
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = [[F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout, is_causal=True,
                                            scale=scaling, enable_gqa=gqa)[0]
             for qs, ks, vs in zip(q.split(cut, 1), k.split(cut, 1), v.split(cut, 1))]
            for q, k, v, cut in zip(query.unbind(0), key.unbind(0), value.unbind(0), lengths)]
    out = _Output(rows)
    y = out.compute()
    keep_as_recipe(y, out)  # o_proj, keeping its input, keeps this recipe instead (in a lean layer)
    return y, None


class _Output(Recomputed):
    """The attention output, (b, L, heads, d), from its per-example parts (which the attention
    kernel keeps for its own backward anyway): assembled in the forward, and again on first use in
    the backward where a lean layer (finetune.models.lean_layer) kept this recipe for it."""

    def __init__(self, rows: list[list[torch.Tensor]]):
        super().__init__([p for row in rows for p in row], "a part of attention's output")
        self.rows = rows

    def compute(self) -> torch.Tensor:
        return torch.stack([torch.cat(parts, 1) for parts in self.rows]).transpose(1, 2).contiguous()


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED, packed_sdpa)
    AttentionMaskInterface.register(PACKED, sdpa_mask)  # the mask the fallback calls use


def use_for_training(model) -> bool:
    """Switch a model that uses ``sdpa`` to the per-example attention; True when switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    can_set = getattr(model, "_can_set_attn_implementation", None)  # models with their own attention code
    if can_set is not None and not can_set():
        return False
    _register()
    model.set_attn_implementation(PACKED)
    return model.config._attn_implementation == PACKED
