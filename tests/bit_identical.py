"""Shared by the tests of the memory-saving model patches (finetune.models.gated_mlp, lean_layer):
a trained-looking model with an adapter, and the check that a patched copy computes the same logits
and gradients bit for bit."""

import torch

from finetune.adapters import attach

SETTINGS = {"lora": dict(rank=4, alpha=8, dropout=0.0), "mora": dict(rank=4, dropout=0.0),
            "vblora": dict(vector_length=32), "full": {}}


def batch(model, n=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=g)


def with_adapter(model, method):
    """``model`` in training mode with ``method`` attached, its trained tensors moved off their
    initial values so that every branch carries a gradient."""
    model.train()
    attach(model, method, SETTINGS[method])
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    return model


def packed_positions(ids, cut=(9, 15)):
    """Position ids of rows holding two examples each (as packing makes them)."""
    return torch.cat([torch.arange(n) for n in cut]).expand(ids.shape[0], -1)


def grads_of(model, ids, weights, position_ids=None):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bit_identical(plain, patched, packed=False):
    """``packed``: rows of two examples each, for models attending one example at a time."""
    ids = batch(plain)
    pos = packed_positions(ids) if packed else None
    weights = torch.randn(*ids.shape, plain.config.vocab_size, generator=torch.Generator().manual_seed(1))
    out_plain, g_plain = grads_of(plain, ids, weights, pos)
    out_patched, g_patched = grads_of(patched, ids, weights, pos)
    assert torch.equal(out_plain, out_patched)
    assert g_plain.keys() == g_patched.keys() and g_plain
    for name in g_plain:
        assert torch.equal(g_plain[name], g_patched[name]), name
