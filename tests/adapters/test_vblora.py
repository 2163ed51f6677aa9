"""VB-LoRA (methods.md §4): the common tests of §6.1 and the VB-LoRA tests of §6.5.

Model-level tests use the tiny LLaMA of conftest.py (dims 128, 64, 384) with b = 32; standalone
layers sit in a one-module container so that ``attach`` can register the bank on it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from finetune.adapters import attach as attach_method
from finetune.adapters import load_adapter, lora, save_adapter
from finetune.adapters.vblora import (
    BANK_ATTR,
    VBLoraLayer,
    attach,
    check_topk,
    count_params,
    decode_topk,
    encode_topk,
    index_dtype,
    tkam,
)
from finetune.errors import UserError
from finetune.training.loop import recompute_layers

from conftest import ids, logits_of

B_LEN = 32  # divides 64, 128 and 384


def vb(model, **kw):
    kw.setdefault("vector_length", B_LEN)
    kw.setdefault("rank", 4)  # the paper's rank; the shapes below are written for it
    return attach(model, **kw)


class Box(nn.Module):
    """A container for one standalone layer (the bank is registered on it)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def n_subvectors(adapter) -> int:
    r, b = adapter.settings["rank"], adapter.settings["vector_length"]
    return sum(r * (l.in_features // b + l.out_features // b) for l in adapter.layers.values())


# --------------------------------------------------------------------------------------------
# §6.1 common tests
# --------------------------------------------------------------------------------------------


def test_only_adapter_parameters_train(tiny_model):
    adapter = vb(tiny_model)
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    tiny_model.train()
    tiny_model(ids(), labels=ids()).loss.backward()
    for name, p in tiny_model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_trainable_count_formula_and_bank_counted_once(tiny_model):
    adapter = vb(tiny_model, num_vectors=64, rank=3)
    h, b = 64, B_LEN
    n_sv = n_subvectors(adapter)
    assert n_sv == 2 * 3 * ((4 + 4) * 2 + (4 + 2) * 2 + (4 + 12) * 2 + (12 + 4))
    assert adapter.num_trainable() == h * b + n_sv * h
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) == h * b + n_sv * h
    assert adapter.param_counts()["trainable"] == h * b + n_sv * h
    assert adapter.num_stored() == h * b + n_sv * h  # full logits


def test_merge_unmerge(tiny_model):
    adapter = vb(tiny_model)
    x = ids()
    unmerged = logits_of(tiny_model, x)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in adapter.layers.items()}
    adapter.merge()
    assert (logits_of(tiny_model, x) - unmerged).abs().max() <= 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        adapter.merge()  # no double add
    assert (logits_of(tiny_model, x) - unmerged).abs().max() <= 1e-5
    adapter.unmerge()
    for n, l in adapter.layers.items():
        assert (l.base_layer.weight - w0[n]).abs().max() <= 1e-6
    assert (logits_of(tiny_model, x) - unmerged).abs().max() <= 1e-5


def test_closed_form_equals_identity_push(tiny_model):
    tiny_model.double()
    adapter = vb(tiny_model)
    tiny_model.double()
    for name, layer in adapter.layers.items():
        closed, pushed = layer.delta_weight(), layer.delta_by_identity()
        assert closed.dtype == torch.float64
        assert (closed - pushed).abs().max() <= 1e-10, name


def test_disable_gives_base_output(tiny_model):
    x = ids()
    base = logits_of(tiny_model, x)
    adapter = vb(tiny_model)
    assert not torch.equal(logits_of(tiny_model, x), base)
    adapter.set_enabled(False)
    assert torch.equal(logits_of(tiny_model, x), base)  # never merged: bit-identical
    adapter.set_enabled(True)
    adapter.merge()
    adapter.set_enabled(False)  # disabling unmerges
    assert (logits_of(tiny_model, x) - base).abs().max() <= 1e-6
    assert not any(l.merged for l in adapter.layers.values())


def test_dropout_acts_on_branch_input_only(tiny_model):
    x = ids()
    adapter = vb(tiny_model, dropout=0.5)
    with torch.no_grad():
        adapter.bank.zero_()  # contribution exactly zero
    adapter.set_enabled(False)
    base = logits_of(tiny_model.train(), x)
    adapter.set_enabled(True)
    assert torch.equal(logits_of(tiny_model, x), base)
    with torch.no_grad():
        adapter.bank.uniform_(-0.5, 0.5)
    tiny_model.eval()
    assert torch.equal(logits_of(tiny_model, x), logits_of(tiny_model, x))  # deterministic in eval mode
    tiny_model.train()
    torch.manual_seed(3)
    a = logits_of(tiny_model, x)
    torch.manual_seed(4)
    assert not torch.equal(a, logits_of(tiny_model, x))  # dropout is active in train mode


def test_conv1d_equals_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    k, d = 64, 96
    conv = Conv1D(d, k)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(k, d)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    box_c, box_l = Box(conv), Box(linear)
    ad_c = attach(box_c, vector_length=32, targets=["proj"], init_logits_std=1.0)
    ad_l = attach(box_l, vector_length=32, targets=["proj"])
    ad_l.load_state_dict(ad_c.state_dict())
    assert ad_c.layers["proj"].fan_in_fan_out and not ad_l.layers["proj"].fan_in_fan_out
    x = torch.randn(5, k)
    with torch.no_grad():
        assert (box_c(x) - box_l(x)).abs().max() <= 1e-5
        dc, dl = ad_c.layers["proj"].delta_weight(), ad_l.layers["proj"].delta_weight()
        assert dc.shape == (k, d) and dl.shape == (d, k)
        assert (dc - dl.T).abs().max() <= 1e-7
        ad_c.merge()
        ad_l.merge()
        assert (box_c(x) - box_l(x)).abs().max() <= 1e-5
        assert (conv.weight - linear.weight.T).abs().max() <= 1e-6


def test_arbitrary_leading_dims():
    torch.manual_seed(0)
    box = Box(nn.Linear(64, 128))
    attach(box, vector_length=32, targets=["proj"], init_logits_std=1.0)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        y3 = box(x)
        y2 = box(x.reshape(6, 64)).reshape(2, 3, 128)
        y1 = torch.stack([box(v) for v in x.reshape(6, 64)]).reshape(2, 3, 128)
    assert y3.shape == (2, 3, 128)
    assert (y3 - y2).abs().max() <= 1e-6 and (y3 - y1).abs().max() <= 1e-6


def test_bf16_base_with_fp32_adapter(tiny_model):
    tiny_model.to(torch.bfloat16)
    adapter = vb(tiny_model)
    assert adapter.bank.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    out = logits_of(tiny_model, ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_to_after_first_forward_moves_everything(tiny_model):
    adapter = vb(tiny_model)
    x = ids()
    ref = logits_of(tiny_model, x)
    tiny_model.to(torch.float64)
    assert adapter.bank.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in adapter.parameters())
    assert all(l.bank is adapter.bank for l in adapter.layers.values())
    out = logits_of(tiny_model, x)
    assert out.dtype == torch.float64
    assert (out.float() - ref).abs().max() <= 1e-4


def test_save_load_round_trip(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    adapter = vb(tiny_model, init_logits_std=0.5)
    x = ids()
    ref = logits_of(tiny_model, x)
    save_adapter(adapter, tmp_path)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.method == "vblora" and not loaded.inference_only
    assert torch.equal(logits_of(fresh, x), ref)


def test_target_matching(tiny_model):
    model = copy.deepcopy(tiny_model)
    assert sorted(vb(model, targets=["self_attn.q_proj"]).layers) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model = copy.deepcopy(tiny_model)
    adapter = vb(model, targets=r"model\.layers\.0\.mlp\.(gate|up)_proj")
    assert sorted(adapter.layers) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    model = copy.deepcopy(tiny_model)
    adapter = vb(model, targets="all-linear")  # lm_head (128→259) would fail the divisibility check
    assert len(adapter.layers) == 14 and not any("lm_head" in n for n in adapter.layers)
    with pytest.raises(UserError, match="matches no module"):
        vb(tiny_model, targets=["nope_proj"])


# --------------------------------------------------------------------------------------------
# §6.5 VB-LoRA
# --------------------------------------------------------------------------------------------


def test_shapes(tiny_model):
    adapter = vb(tiny_model, rank=3, num_vectors=50)
    assert tuple(adapter.bank.shape) == (50, B_LEN)
    for layer in adapter.layers.values():
        k, d = layer.in_features, layer.out_features
        assert tuple(layer.vblora_logits_A.shape) == (3, k // B_LEN, 50)
        assert tuple(layer.vblora_logits_B.shape) == (d // B_LEN, 3, 50)
        A, B = layer.factors()
        assert tuple(A.shape) == (3, k) and tuple(B.shape) == (d, 3)
    k_proj = adapter.layers["model.layers.0.self_attn.k_proj"]
    assert (k_proj.in_features, k_proj.out_features) == (128, 64)


def test_divisibility_error_names_module_dims_and_b(tiny_model):
    with pytest.raises(UserError) as e:
        vb(tiny_model, vector_length=48)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(128, 128)" in msg and "48" in msg
    assert "1, 2, 4, 8, 16, 32, 64" in msg and "\n" not in msg
    assert not hasattr(tiny_model, BANK_ATTR)  # nothing attached
    assert type(tiny_model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(UserError, match=r"vector_length=96 .*model.layers.0.mlp.down_proj.*\(384, 128\)"
                       r".*: 1, 2, 4, 8, 16, 32, 64, 128$"):
        vb(tiny_model, vector_length=96, targets=["down_proj"])


@pytest.mark.parametrize("bad", [dict(rank=0), dict(topk=0), dict(topk=257), dict(num_vectors=0),
                                 dict(init_bank_bound=0.0), dict(dropout=1.0), dict(lr_bank=0.0)])
def test_invalid_settings_rejected(tiny_model, bad):
    with pytest.raises(UserError):
        vb(tiny_model, **bad)


def test_tkam_equals_masked_softmax():
    torch.manual_seed(0)
    h, b, kappa = 16, 8, 3
    bank = torch.randn(h, b, dtype=torch.float64)
    logits = torch.randn(5, 4, h, dtype=torch.float64)
    top = logits.topk(kappa, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    assert torch.allclose(p.sum(-1), torch.ones(5, 4, dtype=torch.float64))
    assert ((p > 0) == mask).all()
    assert (tkam(logits, bank, kappa) - p @ bank).abs().max() <= 1e-12
    # the stored weights are softmax(top-κ logits) without the last one, and sum to 1 with it
    indices, weights = encode_topk(logits, kappa)
    assert torch.allclose(torch.gather(p, -1, indices.long())[..., :-1], weights)


def test_gradients_reach_only_topk_logits_and_selected_bank_rows(tiny_model):
    h = 1024  # q and v: 2 · 2 · 4 · (4 + 4 or 2) = 112 sub-vectors select at most 224 of the h rows
    adapter = vb(tiny_model, num_vectors=h, init_logits_std=1.0, targets=["q_proj", "v_proj"])
    tiny_model.train()
    tiny_model(ids(), labels=ids()).loss.backward()
    selected = torch.zeros(h, dtype=torch.bool)
    for name, layer in adapter.layers.items():
        for p in (layer.vblora_logits_A, layer.vblora_logits_B):
            top = p.topk(2, dim=-1).indices
            mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
            assert (p.grad[~mask] == 0).all(), name
            assert (p.grad[mask] != 0).any(), name
            selected[top.flatten()] = True
    grad_rows = adapter.bank.grad.abs().sum(-1) != 0
    assert grad_rows.any() and not (grad_rows & ~selected).any()
    assert not selected.all()  # some bank rows are not selected anywhere, and got no gradient


def test_bank_is_one_shared_tensor(tiny_model):
    adapter = vb(tiny_model)
    banks = [l.bank for l in adapter.layers.values()]
    assert all(b is adapter.bank for b in banks)
    assert len({b.data_ptr() for b in banks}) == 1
    names = [n for n, p in tiny_model.named_parameters() if p is adapter.bank]
    assert names == [BANK_ATTR]  # registered exactly once (on the root), not per layer
    assert not any(BANK_ATTR in n for n, _ in next(iter(adapter.layers.values())).named_parameters())
    assert list(adapter.state_dict()).count(BANK_ATTR) == 1


def test_output_at_init_differs_from_base(tiny_model):
    x = ids()
    base = logits_of(tiny_model, x)
    adapter = vb(tiny_model)
    out = logits_of(tiny_model, x)
    assert (out - base).abs().max() > 0
    assert all(l.delta_weight().norm() > 0 for l in adapter.layers.values())


def test_equals_lora_with_copied_factors_and_alpha_r(tiny_model):
    other = copy.deepcopy(tiny_model)
    adapter = vb(tiny_model, rank=4, init_logits_std=1.0)
    lora_adapter = lora.attach(other, rank=4, alpha=4.0)
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            A, B = layer.factors()
            lora_adapter.layers[name].lora_A.copy_(A)
            lora_adapter.layers[name].lora_B.copy_(B)
    x = ids()
    assert (logits_of(tiny_model, x) - logits_of(other, x)).abs().max() <= 1e-6


def test_optimizer_groups(tiny_model):
    adapter = vb(tiny_model, lr_bank=2e-3, lr_logits=3e-2)
    groups = adapter.param_groups(lr=1e-4, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vblora_bank", "vblora_logits"}
    assert by_name["vblora_bank"]["params"] == [adapter.bank]
    assert by_name["vblora_bank"]["lr"] == 2e-3 and by_name["vblora_logits"]["lr"] == 3e-2
    assert all(g["weight_decay"] == 0.0 for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in adapter.parameters())
    assert len(by_name["vblora_logits"]["params"]) == 2 * len(adapter.layers)
    torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])


def test_unset_rates_follow_the_trainer_rate(tiny_model):
    """Unset, the bank trains at 7.5 and the logits at 100 times trainer.lr, so a sweep of trainer.lr
    moves them too (docs/methods.md)."""
    adapter = vb(tiny_model)
    for lr in (1e-4, 4e-3):
        rates = {g["name"]: g["lr"] for g in adapter.param_groups(lr=lr, weight_decay=0.1)}
        assert rates == {"vblora_bank": pytest.approx(7.5 * lr), "vblora_logits": pytest.approx(100 * lr)}


def test_index_dtype_by_h():
    assert index_dtype(90) == torch.uint8 and index_dtype(255) == torch.uint8
    assert index_dtype(256) == torch.int16 and index_dtype(2048) == torch.int16
    assert index_dtype(2 ** 15) == torch.int32 and index_dtype(2 ** 31) == torch.int64


@pytest.mark.parametrize("h", [90, 300])
def test_topk_encoding_round_trip(tiny_model, tmp_path, h):
    fresh = copy.deepcopy(tiny_model)
    adapter = vb(tiny_model, num_vectors=h, topk=3, init_logits_std=1.0, save_only_topk=True)
    state = adapter.state_dict()
    key = "model.layers.0.self_attn.k_proj.vblora_logits_A"
    assert key not in state and BANK_ATTR in state
    assert state[key + "_topk_indices"].dtype == index_dtype(h)
    assert tuple(state[key + "_topk_indices"].shape) == (4, 128 // B_LEN, 3)
    assert tuple(state[key + "_topk_weights"].shape) == (4, 128 // B_LEN, 2)
    assert len(state) == 1 + 4 * len(adapter.layers)
    x = ids()
    ref = logits_of(tiny_model, x)
    save_adapter(adapter, tmp_path)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.inference_only
    for name, layer in adapter.layers.items():
        A0, B0 = layer.factors()
        A1, B1 = loaded.layers[name].factors()
        assert (A0 - A1).abs().max() <= 1e-6 and (B0 - B1).abs().max() <= 1e-6
    assert (logits_of(fresh, x) - ref).abs().max() <= 1e-5
    # merging works; training does not
    loaded.merge()
    assert (logits_of(fresh, x) - ref).abs().max() <= 1e-5
    loaded.unmerge()
    fresh.train()
    with pytest.raises(UserError, match="top-k"):
        fresh(x)
    with pytest.raises(UserError, match="top-k"):
        loaded.param_groups(1e-3, 0.0)
    # a full-logits checkpoint can be loaded into it again and trains
    loaded.load_state_dict(adapter.training_state_dict())
    assert not loaded.inference_only
    fresh(x, labels=x).loss.backward()


def test_topk_decode_puts_log_weights_at_indices():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0]])
    indices, weights = encode_topk(logits, 2)
    assert indices.tolist() == [[1, 3]] and indices.dtype == torch.uint8
    w = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    assert torch.allclose(weights, w[:1].unsqueeze(0))
    decoded = decode_topk(indices, weights, 4)
    assert torch.isinf(decoded[0, [0, 2]]).all()
    assert torch.allclose(decoded[0, [1, 3]], w.log())


@pytest.mark.parametrize("kappa", [2, 3])
def test_topk_encoding_survives_large_logit_gaps(kappa):
    """A trained logit gap > ~17 rounds the last fp32 weight to 0; the encoding keeps it > 0, also
    for a loader that sums the stored weights in fp32 (as peft does)."""
    logits = torch.tensor([[40.0, 0.0, -1.0, 3.0, 2.0], [1.0, 0.9, 0.8, 0.0, 0.0]])
    indices, weights = encode_topk(logits, kappa)
    assert weights.dtype == torch.float32
    check_topk(indices, weights, 5)
    assert (1 - weights.sum(-1) > 0).all()
    bank = torch.randn(5, 4)
    assert (tkam(decode_topk(indices, weights, 5), bank, kappa) - tkam(logits, bank, kappa)).abs().max() <= 1e-5


def test_invalid_topk_encodings_rejected():
    ok_w = torch.tensor([[0.7]])
    check_topk(torch.tensor([[1, 3]]), ok_w, 4)
    with pytest.raises(UserError, match="repeated"):
        check_topk(torch.tensor([[1, 1]]), ok_w, 4)
    with pytest.raises(UserError, match="outside"):
        check_topk(torch.tensor([[1, 4]]), ok_w, 4)
    with pytest.raises(UserError, match="> 0"):
        check_topk(torch.tensor([[1, 3]]), torch.tensor([[1.0]]), 4)


def test_counting_conventions():
    roberta_large = [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]
    c = count_params(roberta_large * 24, rank=4, num_vectors=90, vector_length=256, topk=2)
    assert c["n_subvectors"] == 6912
    assert c["stored_peft_topk"] == 33408 and c["stored_paper"] == 33408
    assert c["stored_authors"] == 90 * 256 + 3 * 6912
    llama2 = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    c = count_params(llama2 * 32, rank=4, num_vectors=2048, vector_length=256, topk=2)
    assert c["n_subvectors"] == 39040 and c["trainable"] == 80_478_208
    mistral = [(4096, 4096)] * 2 + [(4096, 1024)] * 2 + [(4096, 14336)] * 2 + [(14336, 4096)]
    c = count_params(mistral * 32, rank=4, num_vectors=2048, vector_length=256, topk=2)
    assert c["n_subvectors"] == 40960 and c["stored_authors"] == 647_168


def test_num_stored_follows_save_only_topk(tiny_model):
    adapter = vb(tiny_model, num_vectors=90, save_only_topk=True)
    n_sv, bank = n_subvectors(adapter), 90 * B_LEN
    assert adapter.num_stored() == bank + n_sv * 1 + int(n_sv * 2 * 0.25)
    summary = adapter.summary(base_params=10 ** 6)
    assert summary["stored_params"] == adapter.num_stored() and "top-k" in summary["stored_convention"]
    assert summary["vblora_counts"]["stored_paper"] == bank + 1.5 * n_sv


def test_init_statistics(tiny_model):
    adapter = vb(tiny_model, init_logits_std=0.01, init_bank_bound=0.02)
    bank = adapter.bank.detach()
    assert bank.abs().max() <= 0.02 and bank.min() < -0.018 and bank.max() > 0.018
    logits = torch.cat([p.detach().flatten() for n, p in adapter.named_trainable() if n != BANK_ATTR])
    assert logits.numel() > 100_000
    assert abs(logits.std().item() - 0.01) < 0.0003 and abs(logits.mean().item()) < 0.0003


# --------------------------------------------------------------------------------------------
# Implementation details: batched TKAM, checkpointing, config, unwrap
# --------------------------------------------------------------------------------------------


def _grads(model, adapter, x):
    model.zero_grad(set_to_none=True)
    model(x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in adapter.named_trainable()}


def test_batched_tkam_equals_per_layer(tiny_model):
    adapter = vb(tiny_model, init_logits_std=1.0, dropout=0.0)
    tiny_model.train()
    x = ids()
    batched = _grads(tiny_model, adapter, x)
    out_b = logits_of(tiny_model, x)
    adapter.batched = False
    per_layer = _grads(tiny_model, adapter, x)
    assert torch.equal(out_b, logits_of(tiny_model, x))
    for n in batched:
        assert (batched[n] - per_layer[n]).abs().max() <= 1e-7, n
    assert all(l._factors is None for l in adapter.layers.values())  # nothing kept after a forward


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(tiny_model, reentrant):
    adapter = vb(tiny_model, init_logits_std=1.0)
    tiny_model.train()
    x = ids()
    ref = _grads(tiny_model, adapter, x)
    if reentrant:
        tiny_model.enable_input_require_grads()
    recompute_layers(tiny_model, reentrant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _grads(tiny_model, adapter, x)
    for n in ref:
        assert (ref[n] - got[n]).abs().max() <= 1e-6, n


def test_attach_from_config_group(tiny_model):
    from finetune.config.compose import compose, method_settings

    cfg = compose(["model=tiny", "method=vblora", "task=memorize", "method.vector_length=32"])
    settings = method_settings(cfg)
    assert settings["init_logits_std"] == 0.01 and settings["topk"] == 2 and settings["rank"] == 8
    adapter = attach_method(tiny_model, "vblora", settings)
    assert len(adapter.layers) == 14 and adapter.settings == settings


def test_unwrap_leaves_a_plain_model(tiny_model):
    x = ids()
    adapter = vb(tiny_model)
    ref = logits_of(tiny_model, x)
    adapter.merge()
    adapter.unwrap()
    assert not hasattr(tiny_model, BANK_ATTR)
    assert not any(isinstance(m, VBLoraLayer) for m in tiny_model.modules())
    assert not any("vblora" in k for k in tiny_model.state_dict())
    assert (logits_of(tiny_model, x) - ref).abs().max() <= 1e-5


def test_second_attach_rejected(tiny_model):
    vb(tiny_model, targets=["q_proj"])
    with pytest.raises(UserError, match="already has a VB-LoRA"):
        vb(tiny_model, targets=["v_proj"])
