"""MoRA and ReMoRA (methods.md §2, §3): the tests of §6.1 (common), §6.3 (MoRA) and §6.4 items 1-5.

Standalone layers use awkward sizes (primes, k ≪ d, k ≫ d); model-level tests use the tiny LLaMA
of conftest.py. Closed forms are checked against the identity push in fp64 (≤ 1e-10) and the
forward pass against a literal transcription of the reference algorithm (kept in this file only).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from finetune.adapters import attach as attach_method
from finetune.adapters import load_adapter, save_adapter
from finetune.adapters.base import find_targets
from finetune.adapters.mora import AUTO_TYPE1_MIN_RANK, MoraLayer, attach, mora_rank, num_blocks, operators
from finetune.errors import UserError
from finetune.training.schedule import WarmupDecay, apply_restart

TYPES = (1, 2, 3, 4, 6)


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the r̂ ≥ k warning silenced (expected for the awkward test shapes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def mora_layer(k, d, rank, mora_type, dtype=torch.float64, seed=0, bias=True, **kw):
    """A MoRA layer on a random nn.Linear(k, d) with a random (non-zero) M."""
    torch.manual_seed(seed)
    layer = quiet(MoraLayer, nn.Linear(k, d, bias=bias), rank, mora_type, **kw).to(dtype)
    with torch.no_grad():
        layer.mora_M.normal_()
    return layer


# --------------------------------------------------------------------------------------------
# A literal transcription of the reference forward pass (kongds/MoRA, peft-mora LoraLayer._apply_mora)
# --------------------------------------------------------------------------------------------


def reference_forward(x, M, in_f, out_f, r, mora_type):
    """The reference algorithm step by step: wrap padding by appending x[0:pad], reshape-and-sum,
    uneven contiguous groups, RoPE blocks, tile / repeat-interleave / concatenate-and-crop."""
    if mora_type in (1, 4):
        sum_inter = in_f // r
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r).sum(dim=-2)
    elif mora_type in (2, 3):
        mr, nr = in_f // r + 1, in_f // r
        m, n = in_f - r * nr, r * mr - in_f
        mm = m * mr
        if m > 0:
            x_m, x_n = x[..., :mm], x[..., mm:]
            x_m = x_m.view(*x.shape[:-1], m, mr).sum(dim=-1)
            x_n = x_n.view(*x.shape[:-1], n, nr).sum(dim=-1)
            in_x = torch.cat([x_m, x_n], dim=-1)
        else:
            in_x = x.view(*x.shape[:-1], n, nr).sum(dim=-1)
    elif mora_type == 6:
        sum_inter = in_f // r
        rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
        if in_f % r != 0:
            pad_size = r - in_f % r
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
            sum_inter += 1
        in_x = x.view(*x.shape[:-1], sum_inter, r)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
        t = torch.arange(rb1)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().unsqueeze(0).to(x.dtype)
        sin = emb.sin().unsqueeze(0).to(x.dtype)
        rh_in_x = torch.cat((-in_x[..., r // 2:], in_x[..., :r // 2]), dim=-1)
        in_x = in_x * cos + rh_in_x * sin
    else:
        raise ValueError(mora_type)

    out_x = in_x @ M.T  # lora_A(in_x), an nn.Linear(r, r) without bias holding M

    if mora_type in (1, 3):
        repeat_time = out_f // r
        if out_f % r != 0:
            repeat_time += 1
        out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    elif mora_type in (2, 4):
        mr, nr = out_f // r + 1, out_f // r
        m = out_f - r * nr
        if m > 0:
            out_x = torch.cat([torch.repeat_interleave(out_x[..., :m], mr, dim=-1),
                               torch.repeat_interleave(out_x[..., m:], nr, dim=-1)], dim=-1)
        else:
            out_x = torch.repeat_interleave(out_x, nr, dim=-1)
    elif mora_type == 6:
        out_x = out_x.view(*x.shape[:-1], -1)[..., :out_f]
        if out_x.shape[-1] < out_f:
            repeat_time = out_f // out_x.shape[-1]
            if out_f % out_x.shape[-1] != 0:
                repeat_time += 1
            out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    return out_x


# --------------------------------------------------------------------------------------------
# §6.3.1: the r̂ table of §2.1, and parameter counts
# --------------------------------------------------------------------------------------------

RHAT_TABLE = [  # k, d, r, r̂ type 1, r̂ type 6, N_in (type 1), pad (type 1)
    (4096, 4096, 8, 256, 256, 16, 0),
    (4096, 11008, 8, 348, 348, 12, 80),
    (11008, 4096, 8, 348, 348, 32, 128),
    (4096, 4096, 256, 1448, 1448, 3, 248),
    (4096, 11008, 256, 1966, 1966, 3, 1802),
    (11008, 4096, 256, 1966, 1966, 6, 788),
    (768, 768, 128, 443, 442, 2, 118),
    (768, 2560, 128, 653, 652, 2, 538),
    (2048, 2048, 128, 724, 724, 3, 124),
    (2048, 5461, 128, 980, 980, 3, 892),
    (5461, 2048, 128, 980, 980, 6, 419),
    (768, 2560, 256, 923, 922, 1, 155),
    (576, 576, 8, 96, 96, 6, 0),
    (576, 192, 8, 78, 78, 8, 48),
    (576, 1536, 8, 130, 130, 5, 74),
    (1536, 576, 8, 130, 130, 12, 24),
    (576, 1536, 256, 735, 734, 1, 159),
]


@pytest.mark.parametrize("k,d,r,r1,r6,n_in,pad", RHAT_TABLE)
def test_rhat_table(k, d, r, r1, r6, n_in, pad):
    assert mora_rank(k, d, r, 1) == r1
    assert all(mora_rank(k, d, r, t) == r1 for t in (2, 3, 4))
    assert mora_rank(k, d, r, 6) == r6
    assert num_blocks(k, r1) == n_in
    assert n_in * r1 - k == pad


LLAMA7B = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
SMOLLM2 = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("shapes,layers,r,expected", [
    (LLAMA7B, 32, 8, 20_014_592), (LLAMA7B, 32, 256, 639_433_088), (SMOLLM2, 30, 8, 2_439_000)])
def test_parameter_count_from_shapes(shapes, layers, r, expected):
    for t in (1, 6):
        assert layers * sum(mora_rank(k, d, r, t) ** 2 for k, d in shapes) == expected


class _Shell(nn.Module):
    """A LLaMA-shaped module tree on the meta device (no memory): model.layers.{i}.{attn,mlp}.*_proj."""

    def __init__(self, shapes, layers):
        super().__init__()
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        blocks = []
        for _ in range(layers):
            block = nn.Module()
            block.self_attn, block.mlp = nn.Module(), nn.Module()
            for name, (k, d) in zip(names, shapes):
                parent = block.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp
                setattr(parent, name, nn.Linear(k, d, bias=False, device="meta"))
            blocks.append(block)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(blocks)


def test_parameter_count_smollm2_shapes_attached():
    """Attach to SmolLM2-135M-shaped shells (meta device): Σ r̂² = 2,439,000 vs LoRA 2,442,240."""
    adapter = attach(_Shell(SMOLLM2, 30), rank=8, type=6)
    assert len(adapter.layers) == 210
    assert adapter.num_trainable() == sum(l.r_hat ** 2 for l in adapter.layers.values()) == 2_439_000
    assert adapter.lora_equivalent(8) == 2_442_240
    assert adapter.summary(1)["lora_same_rank_params"] == 2_442_240


# --------------------------------------------------------------------------------------------
# §6.3.2-3: every type on every shape class; closed form == identity push == reference
# --------------------------------------------------------------------------------------------

SHAPES = {  # k, d, r: the shape classes of §6.3 item 2
    "k=d no pad": (64, 64, 8),  # r̂ = 32, N_in = 2, pad = 0
    "k=d pad": (40, 40, 8),  # r̂ = 25 (type 6: 24), pad 10 (8)
    "k<d tile": (24, 100, 4),  # r̂ = 22, L = 44 < d
    "k>d truncate": (100, 24, 4),  # r̂ = 22, N_in = 5
    "N_in=1": (20, 60, 8),  # r̂ = 25 ≥ k (type 6: 24), pad 5 (4)
    "rhat>2k": (16, 512, 8),  # r̂ = 65 (type 6: 64), pad 49 (48) > k
    "rhat>d": (60, 5, 8),  # r̂ = 23 > d, N_in = 3
    "primes k>d": (37, 11, 3),  # r̂ = 12 > d, pad 11
    "primes k<d N_in=1": (13, 97, 2),  # r̂ = 15 (type 6: 14) > k
}


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_closed_form_equals_identity_push(shape, mora_type):
    k, d, r = SHAPES[shape]
    layer = mora_layer(k, d, r, mora_type)
    x = torch.randn(3, 5, k, dtype=torch.float64)
    g = layer.branch(x)
    assert g.shape == (3, 5, d)
    closed = layer.delta_weight()
    assert closed.shape == (d, k) and closed.dtype == torch.float64
    assert (closed - layer.delta_by_identity(chunk=7)).abs().max() <= 1e-10
    assert (x @ closed.T - g).abs().max() <= 1e-10


@pytest.mark.parametrize("mora_type", (1, 2, 3, 4))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_sharing_types_are_T_M_C(shape, mora_type):
    k, d, r = SHAPES[shape]
    layer = mora_layer(k, d, r, mora_type)
    T, C = operators(k, d, layer.r_hat, mora_type, dtype=torch.float64)
    assert (T @ layer.mora_M.detach() @ C - layer.delta_weight()).abs().max() <= 1e-10


def _reference_crashes(k, r_hat, mora_type):
    """The reference's wrap takes only k entries: its reshape fails when pad > k (types 1, 4, 6)."""
    return mora_type in (1, 4, 6) and num_blocks(k, r_hat) * r_hat - k > k


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_reference_transcription(shape, mora_type):
    k, d, r = SHAPES[shape]
    layer = mora_layer(k, d, r, mora_type)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    M = layer.mora_M.detach()
    if _reference_crashes(k, layer.r_hat, mora_type):
        with pytest.raises(RuntimeError):
            reference_forward(x, M, k, d, layer.r_hat, mora_type)
        return
    expected = reference_forward(x, M, k, d, layer.r_hat, mora_type)
    assert (layer.branch(x) - expected).abs().max() <= 1e-10


def test_reference_equivalence_on_published_shape():
    """One real shape (SmolLM2 k_proj 576→192, r = 8, r̂ = 78, pad 48), fp32, every type."""
    for t in TYPES:
        layer = mora_layer(576, 192, 8, t, dtype=torch.float32)
        x = torch.randn(4, 576)
        assert torch.allclose(layer.branch(x), reference_forward(x, layer.mora_M.detach(), 576, 192,
                                                                 layer.r_hat, t), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# §6.3.4-7: worked example, C_mod column sums, type-6 structure, ranks
# --------------------------------------------------------------------------------------------


def test_worked_example_2_4():
    """k = 5, d = 3, r̂ = 2, type 1: x̃ = (x0..x4, x0), c0 = x0+x2+x4, c1 = x1+x3+x0, y = (h0, h1, h0)."""
    T, C = operators(5, 3, 2, 1)
    assert C.tolist() == [[1, 0, 1, 0, 1], [1, 1, 0, 1, 0]]
    assert T.tolist() == [[1, 0], [0, 1], [1, 0]]
    layer = quiet(MoraLayer, nn.Linear(5, 3, bias=False), 1, 1, r_hat=2)
    assert (layer.n_blocks, layer.r_hat) == (3, 2)
    with torch.no_grad():
        layer.mora_M.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # c = (1+3+5, 2+4+1) = (9, 7); h = M·c = (9+14, 27+28) = (23, 55)
    assert layer.branch(x).tolist() == [23.0, 55.0, 23.0]
    # ΔW = T·M·C: M·C = [[3,2,1,2,1],[7,4,3,4,3]], rows (h0, h1, h0)
    assert layer.delta_weight().tolist() == [[3, 2, 1, 2, 1], [7, 4, 3, 4, 3], [3, 2, 1, 2, 1]]


def test_cmod_column_sums():
    """Type 1, r̂ < k: the first `pad` columns of C_mod sum to 2 (in two different rows), the rest to 1."""
    k, d, r = SHAPES["k=d pad"]
    r_hat = mora_rank(k, d, r, 1)
    pad = num_blocks(k, r_hat) * r_hat - k
    assert (r_hat, pad) == (25, 10)
    _, C = operators(k, d, r_hat, 1)
    sums = C.sum(dim=0)
    assert sums[:pad].tolist() == [2] * pad and sums[pad:].tolist() == [1] * (k - pad)
    assert C.max() == 1  # the two 1s of a padded column lie in different rows


def test_type6_unused_columns_when_k_gt_d():
    """Reduced variant of 11008→4096 (only the first ⌈d/r̂⌉·r̂ input columns reach the output)."""
    k, d, r = 300, 100, 8
    layer = mora_layer(k, d, r, 6)
    assert layer.r_hat == 56
    used = math.ceil(d / layer.r_hat) * layer.r_hat
    assert used == 112
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[:, used:]) == 0
    assert bool((delta[:, :used].abs().sum(dim=0) > 0).all())
    assert (delta - layer.delta_by_identity()).abs().max() <= 1e-10


def test_type6_periodic_rows_when_k_lt_d():
    k, d, r = SHAPES["k<d tile"]
    layer = mora_layer(k, d, r, 6)
    L = layer.n_blocks * layer.r_hat
    assert L < d
    delta = layer.delta_weight()
    rows = torch.arange(d)
    assert torch.equal(delta, delta[rows % L])


@pytest.mark.parametrize("mora_type", TYPES)
def test_ranks(mora_type):
    for k, d, r in [(64, 64, 8), (100, 24, 4), (24, 100, 4)]:
        layer = mora_layer(k, d, r, mora_type)
        rank = int(torch.linalg.matrix_rank(layer.delta_weight()))
        if mora_type == 6:
            assert rank == min(k, d)
        else:
            assert rank <= layer.r_hat
    assert int(torch.linalg.matrix_rank(mora_layer(64, 64, 8, 1).delta_weight())) == 32  # r̂ < min(k, d)


# --------------------------------------------------------------------------------------------
# §6.3.8-12: init, no alpha, N_in = 1 merge, RoPE tables, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mora_type", TYPES)
def test_zero_init_equals_base_and_gradient_is_nonzero(mora_type):
    torch.manual_seed(1)
    base = nn.Linear(40, 56).requires_grad_(False)  # as `attach` leaves it
    layer = MoraLayer(base, 8, mora_type)
    assert torch.count_nonzero(layer.mora_M) == 0 and layer.mora_M.dtype == torch.float32
    x = torch.randn(4, 40)
    y = layer(x)
    assert torch.equal(y, base(x))
    y.pow(2).sum().backward()
    assert layer.mora_M.grad is not None and layer.mora_M.grad.abs().sum() > 0
    assert base.weight.grad is None and base.bias.grad is None


def test_no_alpha_no_scaling():
    from finetune.config.compose import compose

    layer = MoraLayer(nn.Linear(16, 16), 4, 1)
    assert not hasattr(layer, "scaling")
    for override in ["method.alpha=16", "+method.lora_alpha=16", "+method.use_dora=true"]:
        with pytest.raises(UserError, match="unknown config key"):
            compose(["model=tiny", "method=mora", "task=memorize", override])


def test_single_block_type6_merge():
    """576→1536 at r = 256: r̂ = 734 ≥ k, N_in = 1 (the reference's merge raises here)."""
    torch.manual_seed(0)
    base = nn.Linear(576, 1536)
    with pytest.warns(UserWarning, match="r̂=734 ≥ k=576"):
        layer = MoraLayer(base, 256, 6)
    assert (layer.r_hat, layer.n_blocks) == (734, 1)
    with torch.no_grad():
        layer.mora_M.normal_(std=0.02)
    x = torch.randn(3, 576)
    unmerged = layer(x)
    layer.merge()
    assert (layer(x) - unmerged).abs().max() <= 1e-5


def test_rope_tables_follow_to():
    torch.manual_seed(0)
    layer = MoraLayer(nn.Linear(48, 80), 4, 6)
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(2, 48)
    y32 = layer(x)  # first forward in fp32
    assert {n for n, _ in layer.named_buffers()} == {"rope_cos", "rope_sin"}
    assert "rope_cos" not in layer.state_dict() and "rope_sin" not in layer.state_dict()
    layer.to(torch.float64)
    assert layer.rope_cos.dtype == layer.rope_sin.dtype == layer.mora_M.dtype == torch.float64
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    assert (y64 - y32.double()).abs().max() <= 1e-4
    assert (layer.delta_weight() - layer.delta_by_identity()).abs().max() <= 1e-10


def test_two_stacked_type6_adapters_with_different_rhat():
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    inner = MoraLayer(base, 4, 6)
    outer = MoraLayer(inner, 8, 6)
    assert inner.r_hat != outer.r_hat and outer.root_layer() is base
    with torch.no_grad():
        inner.mora_M.normal_(std=0.05)
        outer.mora_M.normal_(std=0.05)
    x = torch.randn(5, 64)
    y = outer(x)
    expected = base(x) + inner.branch(x) + outer.branch(x)
    assert (y - expected).abs().max() <= 1e-6
    assert inner.rope_cos.shape != outer.rope_cos.shape
    inner.merge()
    outer.merge()
    assert (outer(x) - y).abs().max() <= 1e-5


def _quantized(linear: nn.Linear, bits: str) -> nn.Module:
    """``linear`` as a bitsandbytes 4-bit (NF4, fp32 compute) or 8-bit layer on the CPU."""
    import bitsandbytes as bnb  # a dependency; bitsandbytes >= 0.45 runs 4/8-bit layers on the CPU

    k, d = linear.in_features, linear.out_features
    w = linear.weight.detach().clone()
    if bits == "4bit":
        q = bnb.nn.Linear4bit(k, d, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(k, d, bias=True, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
@pytest.mark.parametrize("mora_type", [1, 6])
def test_quantized_base(bits, mora_type):
    """§6.3.13 on the CPU build of bitsandbytes: the branch does not depend on the base layer type,
    so a 4/8-bit base gives the forward of its dequantized dense twin; in-place merging and ReMoRA
    are refused (a merged export dequantizes instead, §2.10)."""
    from finetune.adapters.base import dense_weight

    torch.manual_seed(0)
    q = _quantized(nn.Linear(64, 96), bits)
    dense = nn.Linear(64, 96)
    with torch.no_grad():
        dense.weight.copy_(dense_weight(q))
        dense.bias.copy_(q.bias)
    a, b = MoraLayer(q, 8, mora_type), MoraLayer(dense, 8, mora_type)
    with torch.no_grad():
        a.mora_M.normal_(std=0.1)
        b.mora_M.copy_(a.mora_M)
    x = torch.randn(2, 5, 64)
    assert (a(x) - b(x)).abs().max() <= 1e-4
    assert torch.equal(a.delta_weight(), b.delta_weight())
    with pytest.raises(UserError, match="quantized"):
        a.merge()
    model = nn.Module()
    model.q_proj = q
    with pytest.raises(UserError, match="ReMoRA merges into the base weights"):
        attach(model, rank=8, type=1, remora_every=10, targets=["q_proj"])


class QuantLinear(nn.Module):  # GPTQ-like: packed integer weights, no nn.Linear
    def __init__(self):
        super().__init__()
        self.infeatures, self.outfeatures = 16, 16
        self.register_buffer("qweight", torch.zeros(2, 16, dtype=torch.int32))


@pytest.mark.parametrize("module,name", [(nn.Embedding(10, 8), "Embedding"), (nn.Conv2d(3, 4, 3), "Conv2d"),
                                         (QuantLinear(), "QuantLinear")])
def test_unsupported_base_layers(module, name):
    with pytest.raises(UserError, match=f"MoRA does not support {name}"):
        MoraLayer(module, 4, 1)
    model = nn.Sequential()
    model.add_module("proj", module)
    with pytest.raises(UserError, match=f"MoRA does not support {name}"):
        attach(model, rank=4, type=1, targets=["proj"])


@pytest.mark.parametrize("bad", [5, 7, 0, "x", "5", True, 1.5])
def test_invalid_types_rejected(tiny_model, bad):
    with pytest.raises(UserError, match=r"not a MoRA type; allowed: 1, 2, 3, 4, 6 or auto"):
        attach(tiny_model, rank=8, type=bad)


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_invalid_rank_rejected(tiny_model, rank):
    with pytest.raises(UserError, match="positive integer"):
        attach(tiny_model, rank=rank)


def test_types_from_config_strings(tiny_model):
    adapter = attach_method(tiny_model, "mora", {"rank": 8, "type": "1"})
    assert {l.mora_type for l in adapter.layers.values()} == {1}


def test_auto_type():
    assert AUTO_TYPE1_MIN_RANK == 64
    small = attach(_linear_model(), rank=8, type="auto")
    large = quiet(attach, _linear_model(), rank=64, type="auto")
    remora = attach(_linear_model(), rank=8, type="auto", remora_every=10)
    assert {l.mora_type for l in small.layers.values()} == {6}
    assert {l.mora_type for l in large.layers.values()} == {1}
    assert {l.mora_type for l in remora.layers.values()} == {1}
    assert small.settings["type"] == "auto" and set(small.settings["layer_types"].values()) == {6}


def test_warns_when_rhat_at_least_k():
    with pytest.warns(UserWarning, match=r"r̂=65 ≥ k=16"):
        MoraLayer(nn.Linear(16, 512), 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoraLayer(nn.Linear(128, 128), 8, 1)  # r̂ = 32 < k: no warning


# --------------------------------------------------------------------------------------------
# §6.1 (common) on the tiny LLaMA
# --------------------------------------------------------------------------------------------


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def _randomize(adapter, std=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mora_type", [1, 6])
def test_only_M_trains_and_count_matches(tiny_model, mora_type):
    adapter = attach(tiny_model, rank=8, type=mora_type)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(adapter.state_dict())
    assert all(n.endswith(".mora_M") for n in trainable) and len(trainable) == 14
    assert adapter.num_trainable() == sum(l.r_hat ** 2 for l in adapter.layers.values())
    # 2 × (q 45² + k 39² + v 39² + o 45² + gate 64² + up 64² + down 64²), type 6: 44, 38, 38, 44, 64, …
    expected = 2 * ((45 ** 2 + 39 ** 2) * 2 + 3 * 64 ** 2) if mora_type == 1 else \
        2 * ((44 ** 2 + 38 ** 2) * 2 + 3 * 64 ** 2)
    assert adapter.num_trainable() == expected
    _randomize(adapter)
    tiny_model(_ids()).logits.sum().backward()
    for n, p in tiny_model.named_parameters():
        assert (p.grad is not None) == n.endswith(".mora_M"), n
    assert all(p.grad.abs().sum() > 0 for p in adapter.parameters())


@pytest.mark.parametrize("mora_type", [1, 6])
def test_merge_unmerge_disable(tiny_model, mora_type):
    ids = _ids()
    base_logits = _logits(tiny_model, ids)
    adapter = attach(tiny_model, rank=8, type=mora_type)
    _randomize(adapter)
    w0 = {n: l.root_layer().weight.detach().clone() for n, l in adapter.layers.items()}
    unmerged = _logits(tiny_model, ids)
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter does something

    adapter.set_enabled(False)  # never merged: bit-identical base output
    assert torch.equal(_logits(tiny_model, ids), base_logits)
    adapter.set_enabled(True)

    adapter.merge()
    merged = _logits(tiny_model, ids)
    assert (merged - unmerged).abs().max() <= 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        adapter.merge()  # no double add
    assert (_logits(tiny_model, ids) - merged).abs().max() == 0

    adapter.set_enabled(False)  # disabling unmerges
    assert (_logits(tiny_model, ids) - base_logits).abs().max() <= 1e-6
    assert not any(l.merged for l in adapter.layers.values())
    for n, l in adapter.layers.items():
        assert (l.root_layer().weight - w0[n]).abs().max() <= 1e-6
    adapter.set_enabled(True)
    adapter.merge()
    adapter.unmerge()
    for n, l in adapter.layers.items():
        assert (l.root_layer().weight - w0[n]).abs().max() <= 1e-6
    assert (_logits(tiny_model, ids) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("mora_type", [1, 6])
def test_closed_form_equals_identity_push_on_model(tiny_model, mora_type):
    adapter = attach(tiny_model, rank=8, type=mora_type)
    tiny_model.double()
    _randomize(adapter, std=1.0)
    for layer in adapter.layers.values():
        assert (layer.delta_weight() - layer.delta_by_identity()).abs().max() <= 1e-10


@pytest.mark.parametrize("mora_type", TYPES)
def test_dropout_acts_on_branch_only(mora_type):
    torch.manual_seed(0)
    base = nn.Linear(40, 72)
    layer = MoraLayer(base, 8, mora_type, dropout=0.3).train()
    x = torch.randn(6, 40)
    assert torch.equal(layer(x), base(x))  # M = 0: dropout never reaches the base path
    with torch.no_grad():
        layer.mora_M.normal_()
    assert not torch.equal(layer(x), layer(x))  # train mode: random masks on the branch
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert (layer(x) - base(x) - x @ layer.delta_weight().T).abs().max() <= 1e-4


@pytest.mark.parametrize("mora_type", TYPES)
def test_conv1d_equals_linear(mora_type):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    k, d = 30, 52
    linear = nn.Linear(k, d)
    conv = Conv1D(d, k)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a = MoraLayer(linear, 4, mora_type)
    b = MoraLayer(conv, 4, mora_type)
    assert b.fan_in_fan_out and (b.in_features, b.out_features, b.r_hat) == (k, d, a.r_hat)
    with torch.no_grad():
        a.mora_M.normal_(std=0.1)
        b.mora_M.copy_(a.mora_M)
    x = torch.randn(2, 7, k)
    y = a(x)
    assert (b(x) - y).abs().max() <= 1e-5
    assert torch.equal(b.delta_weight(), a.delta_weight().T)
    a.merge()
    b.merge()
    assert (a(x) - y).abs().max() <= 1e-5 and (b(x) - y).abs().max() <= 1e-5
    assert (conv.weight - linear.weight.T).abs().max() <= 1e-6


@pytest.mark.parametrize("mora_type", TYPES)
def test_arbitrary_leading_dims(mora_type):
    layer = mora_layer(33, 47, 4, mora_type, dtype=torch.float32)
    x = torch.randn(2, 3, 33)
    y = layer(x)
    assert y.shape == (2, 3, 47)
    assert torch.allclose(layer(x.reshape(6, 33)), y.reshape(6, 47), atol=1e-6)
    assert torch.allclose(layer(x[1, 2]), y[1, 2], atol=1e-6)


def test_bf16_base_fp32_adapter(tiny_model):
    tiny_model.to(torch.bfloat16)
    adapter = attach(tiny_model, rank=8, type=6)
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    _randomize(adapter)
    layer = adapter.layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 384, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert _logits(tiny_model, _ids()).dtype == torch.bfloat16


def test_to_float64_after_first_forward(tiny_model):
    ids = _ids()
    adapter = attach(tiny_model, rank=8, type=6)
    _randomize(adapter)
    logits32 = _logits(tiny_model, ids)
    tiny_model.to(torch.float64)
    for layer in adapter.layers.values():
        assert layer.rope_cos.dtype == layer.mora_M.dtype == torch.float64
    logits64 = _logits(tiny_model, ids)
    assert logits64.dtype == torch.float64
    assert (logits64 - logits32.double()).abs().max() <= 1e-4


@pytest.mark.parametrize("mora_type", [1, 6])
def test_save_load_round_trip(tiny_model, tiny_model_cfg, tmp_path, mora_type):
    from finetune.models.load import load_model

    ids = _ids()
    adapter = attach_method(tiny_model, "mora", {"rank": 8, "type": mora_type, "dropout": 0.05})
    _randomize(adapter)
    expected = _logits(tiny_model, ids)
    save_adapter(adapter, tmp_path)
    torch.manual_seed(0)
    fresh = load_model(tiny_model_cfg).eval()
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.settings == adapter.settings
    assert torch.equal(_logits(fresh, ids), expected)
    # M is stored once per layer (the reference saved it twice)
    from safetensors.torch import load_file
    assert sorted(load_file(str(tmp_path / "adapter.safetensors"))) == sorted(adapter.state_dict())


def test_target_matching(tiny_model):
    assert find_targets(tiny_model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj",
                                                    "model.layers.1.self_attn.q_proj"]
    assert len(find_targets(tiny_model, r"model\.layers\.0\.mlp\..*_proj")) == 3
    all_linear = find_targets(tiny_model, "all-linear")
    assert len(all_linear) == 14 and not any("lm_head" in n for n in all_linear)
    with pytest.raises(UserError, match="matches no module"):
        attach(tiny_model, rank=8, targets=["nope_proj"])
    adapter = attach(tiny_model, rank=8, type=1, targets="all-linear")
    assert len(adapter.layers) == 14


# --------------------------------------------------------------------------------------------
# §6.4: ReMoRA (items 1-5; resume is tested with the train loop)
# --------------------------------------------------------------------------------------------


def _linear_model():
    """A minimal model: a trainable-by-choice embedding, two projections and a norm."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(20, 24)
    model.q_proj = nn.Linear(24, 40)
    model.down_proj = nn.Linear(40, 24)
    model.norm = nn.LayerNorm(24)
    model.forward = lambda ids: model.norm(model.down_proj(torch.relu(model.q_proj(model.embed(ids)))))
    return model


def test_remora_trigger_keeps_function_and_cycles_types(tiny_model):
    ids = _ids()
    adapter = attach(tiny_model, rank=8, type=1, remora_every=5)
    names = list(adapter.layers)
    seen = []
    for trigger in range(1, 6):
        _randomize(adapter, seed=trigger)
        seen.append({l.mora_type for l in adapter.layers.values()})
        before = _logits(tiny_model, ids)
        w0 = {n: l.root_layer().weight.detach().clone() for n, l in adapter.layers.items()}
        delta = {n: l.delta_weight() for n, l in adapter.layers.items()}
        adapter.on_optimizer_step(5 * trigger - 1)  # not a multiple: nothing happens
        assert all(torch.count_nonzero(l.mora_M) > 0 for l in adapter.layers.values())
        adapter.on_optimizer_step(5 * trigger)
        after = _logits(tiny_model, ids)
        assert (after - before).abs().max() <= 1e-5  # §6.4.1
        for n, l in adapter.layers.items():  # §6.4.3
            assert torch.count_nonzero(l.mora_M) == 0 and not l.merged
            assert torch.equal(l.root_layer().weight, (w0[n] + delta[n]).to(w0[n].dtype))
        assert adapter.settings["layer_types"] == {n: adapter.layers[n].mora_type for n in names}
    assert seen == [{1}, {2}, {3}, {4}, {1}]  # §6.4.2: 1 → 2 → 3 → 4 → 1


def test_remora_two_cycle_and_start_type():
    adapter = attach(_linear_model(), rank=4, type=1, remora_every=3, remora_cycle=2)
    types = []
    for step in range(1, 13):
        adapter.on_optimizer_step(step)
        types.append(adapter.layers["q_proj"].mora_type)
    assert types == [1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2, 1]
    with pytest.raises(UserError, match="must start from type 1"):
        attach(_linear_model(), rank=4, type=6, remora_every=3)
    with pytest.raises(UserError, match="must start from type 1"):
        attach(_linear_model(), rank=4, type=3, remora_every=3)
    with pytest.raises(UserError, match="remora_cycle"):
        attach(_linear_model(), rank=4, type=1, remora_every=3, remora_cycle=3)
    with pytest.raises(UserError, match=r"layer_types\[q_proj\]=3"):
        attach(_linear_model(), rank=4, type=1, remora_every=3, remora_cycle=2, layer_types={"q_proj": 3})


def test_remora_refuses_quantized_base():
    class Linear4bit(nn.Linear):  # stands in for bitsandbytes' class (matched by name)
        pass

    model = nn.Module()
    model.q_proj = Linear4bit(16, 16)
    with pytest.raises(UserError, match="ReMoRA merges into the base weights.*quantized Linear4bit"):
        attach(model, rank=4, type=1, remora_every=10, targets=["q_proj"])


@pytest.mark.parametrize("reset", [True, False])
def test_remora_optimizer_reset_drops_M_state_only(reset):
    model = _linear_model()
    adapter = attach(model, rank=4, type=1, remora_every=2, remora_reset_optimizer=reset)
    model.embed.weight.requires_grad_(True)  # fully trained, as in the pretraining runs
    model.norm.weight.requires_grad_(True)
    others = [model.embed.weight, model.norm.weight]
    opt = torch.optim.AdamW(adapter.parameters() + others, lr=1e-2)
    ids = torch.arange(10)
    for step in (1, 2):
        model.forward(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        apply_restart(adapter.on_optimizer_step(step), opt, None)
        if step == 1:
            assert all(p in opt.state for p in adapter.parameters() + others)
    assert all((p in opt.state) == (not reset) for p in adapter.parameters())
    assert all(p in opt.state and int(opt.state[p]["step"]) == 2 for p in others)
    # with only M trainable (fine-tuning), the reset clears the whole state
    model2 = _linear_model()
    adapter2 = attach(model2, rank=4, type=1, remora_every=1)
    opt2 = torch.optim.AdamW(adapter2.parameters(), lr=1e-2)
    model2.forward(ids).pow(2).mean().backward()
    opt2.step()
    apply_restart(adapter2.on_optimizer_step(1), opt2, None)
    assert len(opt2.state) == 0


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_remora_lr_trace(scheduler_first):
    """Linear schedule, warmup 10, 200 steps, trigger after step 100: the LR re-warms linearly over 50
    steps to the LR at the trigger, then decays linearly to 0 at max_steps."""
    from torch.optim.lr_scheduler import LambdaLR

    model = _linear_model()
    adapter = attach(model, rank=4, type=1, remora_every=100, remora_warmup=50)
    base_lr, total = 1e-3, 200
    opt = torch.optim.AdamW(adapter.parameters(), lr=base_lr)
    sched = LambdaLR(opt, WarmupDecay("linear", 10, total))
    ids = torch.arange(4)
    lrs = []
    for i in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        model.forward(ids).sum().backward()
        opt.step()
        opt.zero_grad()
        if scheduler_first:
            sched.step()
            apply_restart(adapter.on_optimizer_step(i + 1), opt, sched)
        else:
            apply_restart(adapter.on_optimizer_step(i + 1), opt, sched)
            sched.step()
    old = WarmupDecay("linear", 10, total)
    assert lrs[:100] == pytest.approx([base_lr * old(i) for i in range(100)], rel=1e-12)
    peak = base_lr * old(100)  # the LR the step after the trigger would have had
    assert abs(peak - lrs[99]) <= base_lr / 190 + 1e-15
    assert lrs[100:150] == pytest.approx([peak * j / 50 for j in range(1, 51)], rel=1e-9)
    assert lrs[149] == pytest.approx(peak)
    assert lrs[150:] == pytest.approx([peak * (1 - j / 50) for j in range(1, 51)], rel=1e-9, abs=1e-15)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15)
    assert adapter.layers["q_proj"].mora_type == 3  # triggers after steps 100 and 200


def test_remora_off_is_a_no_op():
    model = _linear_model()
    adapter = attach(model, rank=4, type=6)
    _randomize(adapter)
    layer = adapter.layers["q_proj"]
    w, M = layer.base_layer.weight.clone(), layer.mora_M.clone()
    for step in range(1, 20):
        adapter.on_optimizer_step(step)
    assert torch.equal(layer.base_layer.weight, w) and torch.equal(layer.mora_M, M)
    assert layer.mora_type == 6


def test_remora_layer_types_reload(tiny_model, tiny_model_cfg, tmp_path):
    """After a trigger, the saved adapter re-attaches with each layer's new type (the modified base
    weights travel with the checkpoint, not the adapter file)."""
    from finetune.models.load import load_model

    ids = _ids()
    adapter = attach_method(tiny_model, "mora", {"rank": 8, "type": 1, "remora_every": 3})
    _randomize(adapter)
    adapter.on_optimizer_step(3)
    _randomize(adapter, seed=7)
    expected = _logits(tiny_model, ids)
    save_adapter(adapter, tmp_path)
    fresh = load_model(tiny_model_cfg).eval()
    base_state = {k.replace(".base_layer", ""): v for k, v in tiny_model.state_dict().items()
                  if "mora_M" not in k}
    fresh.load_state_dict(base_state)
    loaded = load_adapter(fresh, tmp_path)
    assert {l.mora_type for l in loaded.layers.values()} == {2}
    assert loaded.settings["layer_types"] == adapter.settings["layer_types"]
    assert torch.equal(_logits(fresh, ids), expected)
