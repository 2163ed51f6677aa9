"""Fast exact forward/backward paths for adapter layers (same math, fewer passes over activations).

An adapter step is cheap in FLOPs (LoRA r=8 adds ~3% to a decoder layer) but, written as plain
autograd ops, it is dominated by memory traffic and poor GEMM shapes on the CPU:

- ``(x Aᵀ) Bᵀ`` through autograd computes ``g·B`` and ``gᵀ·u`` for the backward, and the CPU BLAS
  is up to 8x slower on those skinny transposed products than on the equivalent ``(Bᵀ·gᵀ)ᵀ`` and
  ``(uᵀ·g)ᵀ``;
- ``result + branch`` allocates a fresh activation-sized tensor and reads two; the branch's input
  gradient is another activation-sized tensor that autograd then adds to the base layer's.

The autograd Functions here compute the very same quantities with explicit backward formulas,
choosing the fast GEMM layouts, adding the branch into the base output in place (``addmm_``) and,
when the base layer is a plain frozen ``nn.Linear``, accumulating the branch's input gradient into
the base layer's input gradient in place as well. Results equal the plain autograd path up to
floating-point summation order (fp32: ~1e-7 relative); the tests hold the two together.

They are used only where they are exact and safe: same dtype everywhere, no autocast, and for the
fused base path only an ``nn.Linear`` whose parameters are frozen and which carries no hooks and no
patched ``forward``; everything else (bitsandbytes bases, Conv1D, bf16 bases with fp32 adapters,
autocast) takes the generic path of :class:`finetune.adapters.base.AdapterLayer`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module


def autocast_on(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled()


def same_dtype(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return all(t.dtype == dtype for t in tensors)


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None)
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or getattr(_module, "_global_backward_pre_hooks", None))


def plain_linear(module: nn.Module) -> bool:
    """A frozen ``nn.Linear`` (exactly that class) whose forward we may compute ourselves."""
    if type(module) is not nn.Linear or "forward" in module.__dict__ or not _no_hooks(module):
        return False
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return False
    return True


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# --------------------------------------------------------------------------------------------
# Low-rank branch: y = base(x) + s · (h Aᵀ) Bᵀ   (LoRA; VB-LoRA with s = 1)
# --------------------------------------------------------------------------------------------


class _LinearLowRank(torch.autograd.Function):
    """``x Wᵀ + b + s·(h Aᵀ) Bᵀ`` for a frozen dense W; ``h`` is ``x`` itself when there is no
    dropout, and then the branch's input gradient is added into ``g·W`` in place."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, A, B, scale):
        x2 = _rows(x)
        same = h is x
        h2 = x2 if same else _rows(h)
        out = torch.mm(x2, weight.T) if bias is None else torch.addmm(bias, x2, weight.T)
        u = torch.mm(A, h2.T).T  # = h2 Aᵀ, (n, r)
        if scale != 1.0:
            u = u * scale
        out.addmm_(u, B.T)
        ctx.save_for_backward(h2, weight, A, B, u)
        ctx.scale, ctx.same, ctx.x_shape, ctx.h_shape = scale, same, x.shape, h.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h2, weight, A, B, u = ctx.saved_tensors
        g2 = _rows(g)
        need_x, need_h, _, _, need_A, need_B, _ = ctx.needs_input_grad
        grad_x = grad_h = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(u.T, g2).T  # = g2ᵀ u, (d, r)
        if need_x or need_h or need_A:
            gu = torch.mm(B.T, g2.T).T  # = g2 B, (n, r)
            if ctx.scale != 1.0:
                gu = gu * ctx.scale
            if need_A:
                grad_A = torch.mm(gu.T, h2)
            if need_x:
                grad_x = torch.mm(g2, weight)
                if ctx.same:
                    grad_x.addmm_(gu, A)
                grad_x = grad_x.view(ctx.x_shape)
            if need_h and not (ctx.same and need_x):
                grad_h = torch.mm(gu, A).view(ctx.h_shape)
        return grad_x, grad_h, None, None, grad_A, grad_B, None


class _AddLowRank(torch.autograd.Function):
    """``result + s·(h Aᵀ) Bᵀ`` for any base output ``result`` of the adapter dtype."""

    @staticmethod
    def forward(ctx, result, h, A, B, scale):
        h2 = _rows(h)
        u = torch.mm(A, h2.T).T
        if scale != 1.0:
            u = u * scale
        out = torch.addmm(_rows(result), u, B.T)
        ctx.save_for_backward(h2, A, B, u)
        ctx.scale, ctx.h_shape = scale, h.shape
        return out.view(result.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h2, A, B, u = ctx.saved_tensors
        g2 = _rows(g)
        need_r, need_h, need_A, need_B, _ = ctx.needs_input_grad
        grad_h = grad_A = grad_B = None
        if need_B:
            grad_B = torch.mm(u.T, g2).T
        if need_h or need_A:
            gu = torch.mm(B.T, g2.T).T
            if ctx.scale != 1.0:
                gu = gu * ctx.scale
            if need_A:
                grad_A = torch.mm(gu.T, h2)
            if need_h:
                grad_h = torch.mm(gu, A).view(ctx.h_shape)
        return (g if need_r else None), grad_h, grad_A, grad_B, None


def low_rank_forward(layer, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float):
    """``layer.base_layer(x) + scale·B·A·drop(x)`` (the adapter-layer contract, unmerged and
    enabled), through the fast Functions where they apply, else ``None`` (caller falls back)."""
    if not same_dtype(x, A, B) or autocast_on(x) or x.device != A.device:
        return None
    base = layer.base_layer
    h = layer.dropout(x)
    if plain_linear(base) and same_dtype(x, base.weight):
        return _LinearLowRank.apply(x, h, base.weight, base.bias, A, B, float(scale))
    result = base(x)
    if result.dtype != A.dtype or result.shape[:-1] != x.shape[:-1]:
        return result + (layer.branch(h).to(result.dtype))
    return _AddLowRank.apply(result, h, A, B, float(scale))
