"""LoRA (methods.md §1): the common tests of §6.1, the LoRA tests of §6.2, and parity with peft's
LoRA (logits and gradients with copied weights, ≤ 1e-5; peft is a test-only oracle)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from finetune.adapters import load_adapter, save_adapter
from finetune.adapters.base import ALL_LINEAR
from finetune.adapters.lora import attach
from finetune.errors import UserError

from conftest import ids, logits_of


def randomize(adapter, std=0.05, seed=0):
    """Non-zero B (and a fresh A) so that ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


class Box(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# §6.1 common tests
# --------------------------------------------------------------------------------------------


def test_only_adapter_parameters_train(tiny_model):
    adapter = attach(tiny_model, rank=4)
    randomize(adapter)
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()}
    tiny_model.train()
    tiny_model(ids(), labels=ids()).loss.backward()
    for name, p in tiny_model.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), name


def test_trainable_count_formula(tiny_model):
    adapter = attach(tiny_model, rank=8)
    per_layer = 8 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 384) * 2 + (384 + 128))
    assert adapter.num_trainable() == 2 * per_layer == adapter.lora_equivalent(8)
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) == 2 * per_layer


def test_merge_unmerge(tiny_model):
    adapter = attach(tiny_model, rank=4)
    randomize(adapter)
    x = ids()
    unmerged = logits_of(tiny_model, x)
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in adapter.layers.items()}
    adapter.merge()
    assert (logits_of(tiny_model, x) - unmerged).abs().max() <= 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        adapter.merge()
    assert (logits_of(tiny_model, x) - unmerged).abs().max() <= 1e-5
    adapter.unmerge()
    for n, l in adapter.layers.items():
        assert (l.base_layer.weight - w0[n]).abs().max() <= 1e-6


@pytest.mark.parametrize("rslora", [False, True])
def test_closed_form_equals_identity_push(tiny_model, rslora):
    adapter = attach(tiny_model, rank=4, rslora=rslora)
    randomize(adapter)
    tiny_model.double()
    for name, layer in adapter.layers.items():
        assert (layer.delta_weight() - layer.delta_by_identity()).abs().max() <= 1e-10, name


def test_disable_gives_base_output(tiny_model):
    x = ids()
    base = logits_of(tiny_model, x)
    adapter = attach(tiny_model, rank=4)
    randomize(adapter)
    adapter.set_enabled(False)
    assert torch.equal(logits_of(tiny_model, x), base)
    adapter.set_enabled(True)
    adapter.merge()
    adapter.set_enabled(False)
    assert (logits_of(tiny_model, x) - base).abs().max() <= 1e-6


def test_dropout_acts_on_branch_input_only(tiny_model):
    x = ids()
    base = logits_of(tiny_model.train(), x)
    adapter = attach(tiny_model, rank=4, dropout=0.5)  # B = 0: contribution exactly zero
    assert torch.equal(logits_of(tiny_model, x), base)
    randomize(adapter)
    tiny_model.eval()
    assert torch.equal(logits_of(tiny_model, x), logits_of(tiny_model, x))


def test_conv1d_equals_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    k, d = 48, 80
    conv = Conv1D(d, k)
    nn.init.normal_(conv.weight)
    linear = nn.Linear(k, d)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    box_c, box_l = Box(conv), Box(linear)
    ad_c, ad_l = attach(box_c, rank=4, targets=["proj"]), attach(box_l, rank=4, targets=["proj"])
    randomize(ad_c)
    ad_l.load_state_dict(ad_c.state_dict())
    x = torch.randn(5, k)
    with torch.no_grad():
        assert (box_c(x) - box_l(x)).abs().max() <= 1e-5
        ad_c.merge()
        ad_l.merge()
        assert (box_c(x) - box_l(x)).abs().max() <= 1e-5
        assert (conv.weight - linear.weight.T).abs().max() <= 1e-6


def test_arbitrary_leading_dims():
    torch.manual_seed(0)
    box = Box(nn.Linear(24, 40))
    randomize(attach(box, rank=4, targets=["proj"]))
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        y3 = box(x)
        y2 = box(x.reshape(6, 24)).reshape(2, 3, 40)
        y1 = torch.stack([box(v) for v in x.reshape(6, 24)]).reshape(2, 3, 40)
    assert (y3 - y2).abs().max() <= 1e-6 and (y3 - y1).abs().max() <= 1e-6


def test_bf16_base_with_fp32_adapter(tiny_model):
    tiny_model.to(torch.bfloat16)
    adapter = attach(tiny_model, rank=4)
    randomize(adapter)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    out = logits_of(tiny_model, ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_to_after_first_forward_moves_everything(tiny_model):
    adapter = attach(tiny_model, rank=4)
    randomize(adapter)
    x = ids()
    ref = logits_of(tiny_model, x)
    tiny_model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.parameters())
    assert (logits_of(tiny_model, x).float() - ref).abs().max() <= 1e-4


def test_save_load_round_trip(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    adapter = attach(tiny_model, rank=4, alpha=8, rslora=True)
    randomize(adapter)
    x = ids()
    ref = logits_of(tiny_model, x)
    save_adapter(adapter, tmp_path)
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits_of(fresh, x), ref)


def test_target_matching(tiny_model):
    model = copy.deepcopy(tiny_model)
    assert sorted(attach(model, targets=["mlp.down_proj"]).layers) == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = copy.deepcopy(tiny_model)
    assert sorted(attach(model, targets=r".*\.1\.self_attn\.[qk]_proj").layers) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    model = copy.deepcopy(tiny_model)
    layers = attach(model, targets="all-linear").layers
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    with pytest.raises(UserError, match="matches no module"):
        attach(tiny_model, targets=["nope"])


# --------------------------------------------------------------------------------------------
# §6.2 LoRA
# --------------------------------------------------------------------------------------------


def test_shapes_and_init(tiny_model):
    x = ids()
    base = logits_of(tiny_model, x)
    adapter = attach(tiny_model, rank=4)
    for layer in adapter.layers.values():
        k, d = layer.in_features, layer.out_features
        assert tuple(layer.lora_A.shape) == (4, k) and tuple(layer.lora_B.shape) == (d, 4)
        assert (layer.lora_B == 0).all()
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(k)
        assert layer.lora_A.abs().max() > 0.9 / math.sqrt(k)
    assert torch.equal(logits_of(tiny_model, x), base)


def test_scaling(tiny_model):
    adapter = attach(copy.deepcopy(tiny_model), rank=4, alpha=8)
    assert all(l.scaling == 2.0 for l in adapter.layers.values())
    adapter = attach(tiny_model, rank=4, alpha=8, rslora=True)
    assert all(l.scaling == 4.0 for l in adapter.layers.values())


def test_gaussian_init_std(tiny_model):
    adapter = attach(tiny_model, rank=4, init="gaussian")
    a = torch.cat([l.lora_A.detach().flatten() for l in adapter.layers.values()])
    assert abs(a.std().item() - 1 / 4) < 0.01


def test_gradient_at_init(tiny_model):
    adapter = attach(tiny_model, rank=4)
    tiny_model.train()
    tiny_model(ids(), labels=ids()).loss.backward()
    for layer in adapter.layers.values():
        assert layer.lora_B.grad.abs().sum() > 0
        assert (layer.lora_A.grad == 0).all()


def test_invalid_settings(tiny_model):
    with pytest.raises(UserError):
        attach(tiny_model, rank=0)
    with pytest.raises(UserError):
        attach(tiny_model, init="orthogonal")


# --------------------------------------------------------------------------------------------
# Parity with peft's LoRA (oracle)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft_lora_logits_and_gradients(tiny_model, rslora):
    import peft
    other = copy.deepcopy(tiny_model)
    adapter = attach(tiny_model, rank=4, alpha=8, rslora=rslora)
    randomize(adapter, std=0.1)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=list(ALL_LINEAR),
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(other, config)
    theirs = {}
    for name, module in pm.base_model.model.named_modules():
        if name in adapter.layers:
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(adapter.layers[name].lora_A)
                module.lora_B["default"].weight.copy_(adapter.layers[name].lora_B)
            theirs[name] = module
    assert set(theirs) == set(adapter.layers)
    tiny_model.train()
    pm.train()
    x = ids()
    out_ours = tiny_model(x, labels=x)
    out_theirs = pm(input_ids=x, labels=x)
    assert (out_ours.logits - out_theirs.logits).abs().max() <= 1e-5
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in adapter.layers.items():
        ga, gb = layer.lora_A.grad, layer.lora_B.grad
        assert (ga - theirs[name].lora_A["default"].weight.grad).abs().max() <= 1e-5, name
        assert (gb - theirs[name].lora_B["default"].weight.grad).abs().max() <= 1e-5, name
        assert gb.abs().max() > 0 and ga.abs().max() > 0


def test_a_rank_wider_than_some_layers_is_warned_about_and_than_all_refused(capsys):
    model = nn.Sequential()
    model.add_module("narrow", nn.Linear(8, 64))
    model.add_module("wide", nn.Linear(64, 64))
    attach(model, rank=16, targets=["narrow", "wide"])
    assert "finetune: warning: method.rank=16 exceeds min(in, out) of 1 of 2 adapted layers (e.g. narrow: 8)" in \
        capsys.readouterr().err
    with pytest.raises(UserError, match=r"method.rank=65 is wider than every adapted layer .* use method.rank <= 64"):
        attach(nn.Sequential(nn.Linear(64, 64)), rank=65, targets=["0"])
