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


# --------------------------------------------------------------------------------------------
# MoRA types 1 and 6 (methods.md §2.3) without materialising padded, rotated or tiled copies
# --------------------------------------------------------------------------------------------


class MoraPlan:
    """Index bookkeeping of one MoRA layer, computed once per (type, k, d, r̂).

    ``blocks[b]`` lists the contiguous runs ``(src, length, offset)`` of input block b of the
    cyclically padded input: x̃[b·r̂ + offset + i] = x[src + i] (a block straddling the wrap, or
    r̂ > k, has several runs). Type 6 uses the first ``ceil(d / r̂)`` blocks (at most N_in), type 1
    all N_in blocks. ``period`` is the output period: L = (used blocks)·r̂ for type 6, r̂ for type 1.
    """

    def __init__(self, mora_type: int, k: int, d: int, r_hat: int, n_blocks: int):
        self.mora_type, self.k, self.d, self.r_hat = mora_type, k, d, r_hat
        used = min(n_blocks, -(-d // r_hat)) if mora_type == 6 else n_blocks
        self.blocks = [self._runs(b) for b in range(used)]
        self.period = used * r_hat if mora_type == 6 else r_hat
        # Leading blocks that are plain slices of x (no wrap) and, when outputs do not repeat,
        # reach the output uncropped: type 6 handles them in one batched GEMM.
        limit = k if self.period < d else min(k, d)
        self.whole = min(used, limit // r_hat)

    def _runs(self, b: int) -> list[tuple[int, int, int]]:
        runs, t, end = [], b * self.r_hat, (b + 1) * self.r_hat
        while t < end:
            src = t % self.k
            length = min(end - t, self.k - src)
            runs.append((src, length, t - b * self.r_hat))
            t += length
        return runs

    def tiles(self):
        """(start, length) of the output tiles: y[start + i] = u[i] for i < length."""
        return [(s, min(self.period, self.d - s)) for s in range(0, self.d, self.period)]


def _blocks(t: torch.Tensor, count: int, r: int) -> torch.Tensor:
    """The first ``count`` blocks of r columns of a (n, ·) matrix as a (count, n, r) strided view."""
    return t[:, :count * r].unflatten(1, (count, r)).transpose(0, 1)


def _fold(g2: torch.Tensor, plan: MoraPlan) -> torch.Tensor:
    """Σ over output tiles of g (the adjoint of tiling/cropping), (n, min(period, d))."""
    tiles = plan.tiles()
    if len(tiles) == 1:
        return g2
    folded = g2[:, :plan.period].clone()
    for start, length in tiles[1:]:
        folded[:, :length].add_(g2[:, start:start + length])
    return folded


# Below this many rows (decoding a few sequences a token at a time) the copy of W costs more than
# the branch's own r̂-sized products, which then run beside the base GEMM.
MERGED_MIN_ROWS = 64


def _merged_weight(weight: torch.Tensor, T: torch.Tensor, plan: MoraPlan) -> torch.Tensor:
    """W + ΔW for MoRA type 6, (d, k): in every output tile, the rows of block b get P_b on the
    columns of block b's runs (one batched add over the diagonal of the leading whole blocks).
    Each entry of W gets at most one addition (two runs of one block share columns only when
    r̂ > k), so this is the merged weight of ``MoraLayer.delta_weight`` entry for entry."""
    merged, r, k = weight.clone(), plan.r_hat, plan.k
    for start, length in plan.tiles():
        w = min(plan.whole, length // r)
        if w:
            merged.as_strided((w, r, r), (r * k + r, k, 1), start * k).add_(T[:w])
        for b in range(w, len(plan.blocks)):
            rows = min(r, length - b * r)
            if rows <= 0:
                break
            for src, run, off in plan.blocks[b]:
                merged[start + b * r:start + b * r + rows, src:src + run].add_(T[b, :rows, off:off + run])
    return merged


class _Mora(torch.autograd.Function):
    """``base(x) + g(h)`` for MoRA type 6 (``T`` = the per-block products P_b = M·R_b, shape
    (blocks, r̂, r̂)) or type 1 (``T`` = M). With ``weight`` given, the base is the frozen dense
    ``x Wᵀ + b`` computed here; otherwise ``result`` is the base output.

    Type 6 over a frozen dense base with no dropout (``h`` is ``x``), on at least
    ``MERGED_MIN_ROWS`` rows, runs as one GEMM with W + ΔW
    and its input gradient as one GEMM with it too (the merged weight is built again in the
    backward rather than kept): of its three r̂-sized GEMMs per block only the one for P_b's
    gradient is left, for a copy of W and a few block additions."""

    @staticmethod
    def forward(ctx, x, h, result, weight, bias, T, plan):
        x2 = _rows(x)
        same = h is x
        h2 = x2 if same else _rows(h)
        n, r = h2.shape[0], plan.r_hat
        saved_c = None
        ctx.merged = plan.mora_type == 6 and weight is not None and same and n >= MERGED_MIN_ROWS
        dense = _merged_weight(weight, T, plan) if ctx.merged else weight
        if dense is not None:
            out = torch.mm(x2, dense.T) if bias is None else torch.addmm(bias, x2, dense.T)
        else:
            out = _rows(result).clone()
        if plan.mora_type == 6 and not ctx.merged:
            w = plan.whole
            tiled = plan.period < plan.d  # outputs repeat with period L: compute u once, add per tile
            u = h2.new_empty(n, plan.period) if tiled else out
            if w:  # u_b = P_b·x_b for the leading whole blocks in one batched GEMM, in place
                _blocks(u, w, r).baddbmm_(_blocks(h2, w, r), T[:w].transpose(1, 2), beta=0 if tiled else 1)
            for b in range(w, len(plan.blocks)):
                rows = r if tiled else min(r, plan.d - b * r)
                ub = u[:, b * r:b * r + rows]
                for i, (src, length, off) in enumerate(plan.blocks[b]):
                    ub.addmm_(h2[:, src:src + length], T[b, :rows, off:off + length].T,
                              beta=0 if (tiled and i == 0) else 1)
            if tiled:
                for start, length in plan.tiles():
                    out[:, start:start + length].add_(u[:, :length])
        elif plan.mora_type == 1:  # c = Σ_b x̃_b, then M·c, tiled with period r̂
            c = h2.new_zeros(n, r)
            for runs in plan.blocks:
                for src, length, off in runs:
                    c[:, off:off + length].add_(h2[:, src:src + length])
            hm = torch.mm(c, T.T)
            for start, length in plan.tiles():
                out[:, start:start + length].add_(hm[:, :length])
            saved_c = c
        ctx.save_for_backward(h2, weight, T, saved_c)
        ctx.plan, ctx.same, ctx.x_shape, ctx.h_shape = plan, same, x.shape, h.shape
        ctx.has_weight = weight is not None
        return out.view(*x.shape[:-1], plan.d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h2, weight, T, c = ctx.saved_tensors
        plan, r = ctx.plan, ctx.plan.r_hat
        g2 = _rows(g)
        need_x, need_h, need_result, _, _, need_T, _ = ctx.needs_input_grad
        grad_x = grad_h = grad_result = grad_T = None
        if need_result:
            grad_result = g
        if ctx.has_weight and need_x:
            grad_x = torch.mm(g2, _merged_weight(weight, T, plan) if ctx.merged else weight)
        # Where the branch's input gradient goes: into the base's g·W in place when the branch input
        # is x itself; otherwise a tensor of its own for h (autograd adds it to x's gradient when
        # h is x and the base ran outside, as ``result``).
        fused_into_x = ctx.same and grad_x is not None
        if ctx.merged:  # grad_x holds the branch's input gradient already
            gin = None
        else:
            gin = grad_x if fused_into_x else (h2.new_zeros(h2.shape) if need_h else None)
        folded = _fold(g2, plan)
        if plan.mora_type == 6:
            w = plan.whole
            if need_T:
                grad_T = torch.zeros_like(T)
            if w:
                gw = _blocks(folded, w, r)
                if need_T:
                    torch.bmm(gw.transpose(1, 2), _blocks(h2, w, r), out=grad_T[:w])
                if gin is not None:
                    _blocks(gin, w, r).baddbmm_(gw, T[:w])
            for b in range(w, len(plan.blocks)):
                rows = min(r, plan.d - b * r) if plan.period >= plan.d else r
                gb = folded[:, b * r:b * r + rows]
                for src, length, off in plan.blocks[b]:
                    if need_T:
                        grad_T[b, :rows, off:off + length] = torch.mm(gb.T, h2[:, src:src + length])
                    if gin is not None:
                        gin[:, src:src + length].addmm_(gb, T[b, :rows, off:off + length])
        else:
            # d < r̂: the outputs beyond d do not exist, their gradient is 0
            gh = folded if folded.shape[1] == r else torch.nn.functional.pad(folded, (0, r - folded.shape[1]))
            if need_T:
                grad_T = torch.mm(gh.T, c)
            if gin is not None:
                gc = torch.mm(gh, T)
                for runs in plan.blocks:
                    for src, length, off in runs:
                        gin[:, src:src + length].add_(gc[:, off:off + length])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if gin is not None and not fused_into_x:
            grad_h = gin.view(ctx.h_shape)
        return grad_x, grad_h, grad_result, None, None, grad_T, None


def mora_forward(layer, x: torch.Tensor):
    """``layer.base_layer(x) + g(drop(x))`` for a MoRA layer of type 1 or 6 through :class:`_Mora`,
    or ``None`` where the fast path does not apply (the caller then takes the generic path)."""
    M = layer.mora_M
    if layer.mora_type not in (1, 6) or not same_dtype(x, M) or autocast_on(x) or x.device != M.device:
        return None
    key = (layer.mora_type, layer.in_features, layer.out_features, layer.r_hat, layer.n_blocks)
    plan = layer.__dict__.get("_fast_plan")
    if plan is None or plan[0] != key:
        plan = (key, MoraPlan(*key))
        layer.__dict__["_fast_plan"] = plan
    plan = plan[1]
    T = layer.rope_products(len(plan.blocks)) if layer.mora_type == 6 else M
    base = layer.base_layer
    h = layer.dropout(x)
    if plain_linear(base) and same_dtype(x, base.weight):
        return _Mora.apply(x, h, None, base.weight, base.bias, T, plan)
    result = base(x)
    if result.dtype != M.dtype or result.shape[:-1] != x.shape[:-1]:
        return result + layer.branch(h).to(result.dtype)
    return _Mora.apply(x, h, result, None, None, T, plan)
