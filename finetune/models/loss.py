"""The causal-LM loss as a *sum* over target tokens (the caller divides by the token count of the
whole accumulation window, so micro-batching never changes the loss; field.md pain point 3).

Two ways to compute it, with the same value and gradients:

* plain: the model's full ``(batch, sequence, vocabulary)`` logits, then cross-entropy;
* chunked (``chunk > 0``, ``trainer.loss_chunk``): the decoder's hidden states once, then the
  output projection and cross-entropy over chunks of ``chunk`` target tokens, so the logits of the
  whole sequence (tokens × 49k vocabulary for SmolLM2) never exist at once — neither in the
  forward nor in the backward. Each chunk's gradients (for the hidden states and, if it trains,
  the output projection) are computed right after its loss, while its logits are at hand, so the
  backward pass only scales them: no logits are recomputed and none are kept. Only target tokens
  (labels ≠ -100) are projected at all, so padding and prompt tokens cost nothing in the head.

The chunked path is used for Hugging Face causal LMs whose logits are exactly
``lm_head(decoder(...))`` (LLaMA, Mistral, Qwen, SmolLM, ...); it checks that once per model
against the model's own last-position logits and falls back to the plain path, with a warning, for
anything else (logit soft-capping or scaling, an adapted or quantized ``lm_head``, FSDP /
DeepSpeed-sharded weights). The model is always called through its wrapper (DDP, Accelerate's
mixed-precision forward), with ``logits_to_keep=1`` and a forward hook on the decoder that captures
its output: the wrapper's forward runs as usual, so DDP still prepares the gradient all-reduce,
and the head runs under the autocast state the model's own forward had. The loss tensor supports
one backward pass (its gradients are precomputed; ``retain_graph`` reuse is not supported).
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.examples import IGNORE


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments. Packed rows (``position_ids``, finetune.data.packing.pack) go without
    the padding mask: given position ids, no mask and no KV cache (``use_cache=False``), the
    attention keeps the examples apart: per example (finetune.models.attention, for sdpa models in
    training), with the block-diagonal causal mask transformers builds from the position restarts
    (eager), or by variable-length attention (flash)."""
    drop = ("labels", "attention_mask") if "position_ids" in batch else ("labels",)
    return {k: v for k, v in batch.items() if k not in drop}


def causal_lm_loss_sum(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Σ over target tokens of −log p(token | prefix), in fp32. ``chunk > 0``: computed over chunks
    of that many target tokens without materialising the full logits (same value and gradients)."""
    if chunk and chunk > 0:
        loss = chunked_loss_sum(model, batch, chunk)
        if loss is not None:
            return loss
    logits = model(**model_inputs(batch), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# --------------------------------------------------------------------------------------------
# The chunked path
# --------------------------------------------------------------------------------------------

# Configuration attributes of models whose logits are not plain lm_head(hidden): soft-capping
# (Gemma 2/3), scaling (Cohere, Granite), muP-style output multipliers.
_UNUSUAL_CONFIG = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                   "output_logits_scaling", "lm_head_multiplier", "mup_width_scale")

_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (others are left alone, so
    FSDP- and DeepSpeed-wrapped models use the plain path)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif "_orig_mod" in model.__dict__.get("_modules", {}):
            model = model._orig_mod
        else:
            return model


def _plain_head(lm) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) when ``lm``'s logits can be computed as ``lm_head(decoder(...))``."""
    get_out = getattr(lm, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    if type(head) is not nn.Linear:  # adapter-wrapped, quantized (bnb) or tied in odd ways
        return None
    w = head.weight
    if type(w) is not nn.Parameter or type(w.data) is not torch.Tensor or w.dim() != 2 or w.numel() == 0:
        return None  # DTensor (FSDP2), DeepSpeed ZeRO-3 placeholders, ...
    config = getattr(lm, "config", None)
    for name in _UNUSUAL_CONFIG:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, False):
            return None
    try:
        if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
            return None
    except (TypeError, ValueError):
        return None
    decoder = None
    try:
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    except Exception:  # transformers raises for models without a standard decoder
        decoder = None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
    if not isinstance(decoder, nn.Module) or decoder is lm:
        return None
    return decoder, head


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def chunked_loss_sum(model, batch: dict, chunk: int) -> torch.Tensor | None:
    """The chunked loss, or None when this model needs the plain path."""
    lm = unwrap(model)
    parts = _plain_head(lm)
    if parts is None or _checked.get(lm) is False:
        return None
    decoder, head = parts
    captured = {}

    def grab(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        captured["hidden"] = hidden
        captured["autocast"] = _autocast_state(hidden.device.type)

    handle = decoder.register_forward_hook(grab)
    try:
        out = model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured.get("hidden")
    if hidden is None or hidden.dim() != 3:
        _checked[lm] = False
        warnings.warn("loss_chunk: the decoder's hidden states could not be captured; using the plain "
                      "cross-entropy for this model", stacklevel=3)
        return None
    enabled, amp_dtype = captured["autocast"]
    device_type = hidden.device.type
    if lm not in _checked:
        with torch.no_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
            ours = head(hidden[:, -1:]).float()
        theirs = out.logits[:, -1:].detach().float()
        tol = 1e-4 if ours.dtype == hidden.dtype == torch.float32 and not enabled else 2e-2
        same = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=tol, atol=tol)
        _checked[lm] = bool(same)
        if not same:
            warnings.warn(f"loss_chunk: {type(lm).__name__}'s logits are not lm_head(hidden states) "
                          "(soft-capping or scaling?); using the plain cross-entropy", stacklevel=3)
            return None
    del out
    labels = batch["labels"][:, 1:].to(hidden.device)
    keep = labels != IGNORE
    h = hidden[:, :-1][keep]  # (targets, hidden): only positions with a loss
    targets = labels[keep]
    weight, bias = head.weight, head.bias
    with torch.autocast(device_type, dtype=amp_dtype, enabled=enabled):
        return ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, int(chunk), enabled)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i · Wᵀ + b, t_i) over chunks of rows of ``h``, with the gradients for ``h``,
    ``W`` and ``b`` computed chunk by chunk in the forward pass (logits never kept)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, autocast_on):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        device_type = h.device.type
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        with torch.autocast(device_type, enabled=autocast_on):
            total = torch.zeros((), dtype=acc, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
            cdtype = torch.get_autocast_dtype(device_type) if autocast_on else h.dtype
            w_c = weight.to(cdtype) if need_h else None
            for start in range(0, h.shape[0], chunk):
                hc = h[start:start + chunk]
                tc = targets[start:start + chunk]
                # The chunk's logits as (vocabulary, tokens): W·hcᵀ ran faster than hc·Wᵀ on the CPU
                # measured, so a small chunk (a low peak) costs little (docs/benchmarks.md).
                logits = weight @ hc.T if bias is None else torch.addmm(bias[:, None], weight, hc.T)
                logits = logits.to(torch.promote_types(logits.dtype, acc))
                columns = torch.arange(logits.shape[1], device=logits.device)
                picked = logits[tc, columns]
                # log-sum-exp and softmax in place, in one pass of exp over the chunk's logits
                top = logits.amax(dim=0, keepdim=True)
                p = logits.sub_(top).exp_()
                z = p.sum(dim=0, keepdim=True)
                total += (top + z.log() - picked[None, :]).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d loss / d logits = softmax(logits) − onehot(target)
                g = p.div_(z)
                g[tc, columns] -= 1.0
                if need_b:
                    grad_b += g.sum(1)
                g = g.to(cdtype)
                if need_h:
                    grad_h[start:start + chunk] = g.T @ w_c
                if need_w:
                    grad_w += (g @ hc.to(cdtype)).to(acc)
                del logits, p, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None
