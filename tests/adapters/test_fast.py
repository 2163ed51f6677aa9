"""The fast autograd paths (finetune.adapters.fast) compute exactly what the generic adapter-layer
path computes: outputs, input gradients and adapter gradients, for LoRA, VB-LoRA and MoRA types 1
and 6, on every shape class MoRA distinguishes, with and without dropout, with a dense base that is
fused into the Function and with a base that runs outside it (Conv1D)."""

import math

import pytest
import torch
from torch import nn

from finetune.adapters import fast
from finetune.adapters.base import AdapterLayer
from finetune.adapters.lora import LoraLayer
from finetune.adapters.mora import MoraLayer

DT = torch.float64  # compare the two paths free of fp32 rounding: ≤ 1e-10


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer (weight (k, d)), as transformers defines it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=DT) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf, dtype=DT) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def base_layer(k, d, kind="linear", bias=True):
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(d, k)
    else:
        layer = nn.Linear(k, d, bias=bias, dtype=DT)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def run(layer: AdapterLayer, x: torch.Tensor, fast_path: bool, seed: int = 1, extra=()):
    """Output and gradients (x, adapter tensors, ``extra`` tensors) of one forward/backward."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    original = type(layer).fast_forward
    if not fast_path:
        type(layer).fast_forward = AdapterLayer.fast_forward
    try:
        torch.manual_seed(seed)  # the same dropout mask on both paths
        y = layer(x)
    finally:
        type(layer).fast_forward = original
    w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    params = layer.adapter_tensors() + list(extra)
    grads = torch.autograd.grad((y * w).sum(), ([x] if x.requires_grad else []) + params)
    return y.detach(), grads


def assert_paths_agree(layer, x, tol=1e-10):
    y0, g0 = run(layer, x, fast_path=False)
    y1, g1 = run(layer, x, fast_path=True)
    assert (y0 - y1).abs().max().item() <= tol * max(1.0, y0.abs().max().item())
    for a, b in zip(g0, g1):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


def _used_fast(layer, x) -> bool:
    with torch.no_grad():
        return layer.fast_forward(x.detach()) is not None


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("x_grad", [True, False])
def test_lora_fast_equals_generic(kind, dropout, x_grad):
    base = base_layer(24, 40, "conv1d" if kind == "conv1d" else "linear", bias=kind != "linear-nobias")
    layer = LoraLayer(base, rank=4, alpha=12.0, dropout=dropout).to(DT).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24, dtype=DT, requires_grad=x_grad)
    assert _used_fast(layer, x)
    assert_paths_agree(layer, x)


def test_lora_fast_path_skipped_where_it_does_not_apply():
    base = base_layer(16, 16).to(torch.bfloat16)
    layer = LoraLayer(base, rank=2, alpha=2.0)  # fp32 adapter on a bf16 base: the dtype rule
    assert layer.fast_forward(torch.randn(2, 16, dtype=torch.bfloat16)) is None
    hooked = LoraLayer(base_layer(16, 16), rank=2, alpha=2.0).to(DT)
    hooked.base_layer.register_forward_hook(lambda m, i, o: o * 2)  # hooks must run: not fused
    x = torch.randn(2, 16, dtype=DT)
    assert not fast.plain_linear(hooked.base_layer)
    y = hooked(x)  # B = 0: the hooked base output, doubled by the hook
    assert torch.equal(y, 2 * torch.nn.functional.linear(x, hooked.base_layer.weight, hooked.base_layer.bias))


def test_lora_fast_path_in_fp32_matches_generic_to_rounding():
    base = base_layer(64, 96).float()
    layer = LoraLayer(base, rank=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 7, 64, requires_grad=True)
    y0, g0 = run(layer, x, fast_path=False)
    y1, g1 = run(layer, x, fast_path=True)
    assert (y0 - y1).abs().max().item() <= 1e-5
    for a, b in zip(g0, g1):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


# --------------------------------------------------------------------------------------------
# MoRA: every shape class of methods.md §6.3 item 2
# --------------------------------------------------------------------------------------------

SHAPES = {
    "k=d no padding": (64, 64, 8, None),        # r̂ = 32, two blocks
    "k=d padding": (60, 60, 8, None),           # r̂ = 31 (type 6: 30)
    "k<d tile": (24, 100, 8, None),
    "k>d truncate": (100, 24, 8, None),
    "single block": (16, 40, 8, 20),            # r̂ ≥ k: N_in = 1
    "r_hat > 2k": (16, 512, 8, None),           # the reference crashes here
    "r_hat > d": (64, 8, 8, 20),
    "prime sizes": (37, 53, 3, None),
    "k<d tile, whole blocks": (96, 300, 8, None),   # r̂ = 56: one whole block, one wrapped, tiled output
    "k>d crop, whole blocks": (200, 90, 4, None),   # r̂ = 34: two whole blocks, the third cropped
}


@pytest.mark.filterwarnings("ignore:MoRA on a")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("rows", [6, fast.MERGED_MIN_ROWS])  # type 6 without dropout: beside W, then W + ΔW
def test_mora_fast_equals_generic(shape, mora_type, dropout, rows):
    k, d, rank, r_hat = SHAPES[shape]
    if r_hat is not None and mora_type == 6:
        r_hat += r_hat % 2
    layer = MoraLayer(base_layer(k, d), rank=rank, mora_type=mora_type, dropout=dropout, r_hat=r_hat)
    layer = layer.to(DT).train()
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(2, rows // 2, k, dtype=DT, requires_grad=True)
    assert _used_fast(layer, x)
    assert_paths_agree(layer, x)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_fast_with_base_outside_and_no_input_grad(mora_type):
    layer = MoraLayer(base_layer(30, 50, "conv1d"), rank=4, mora_type=mora_type).to(DT)
    with torch.no_grad():
        layer.mora_M.normal_()
    for grad in (True, False):
        x = torch.randn(5, 30, dtype=DT, requires_grad=grad)
        assert_paths_agree(layer, x)


@pytest.mark.filterwarnings("ignore:MoRA on a")
@pytest.mark.parametrize("shape", ["k=d no padding", "k=d padding", "k<d tile, whole blocks", "k>d crop, whole blocks",
                                   "prime sizes"])
def test_mora_type6_trains_on_exactly_the_merged_weight(shape):
    """Over a frozen dense base without dropout, type 6 runs one GEMM with W + ΔW: in fp32 its
    output is bit for bit that of the layer merged the way `merge` merges (W + delta_weight())."""
    k, d, rank, _ = SHAPES[shape]
    layer = MoraLayer(base_layer(k, d).float(), rank=rank, mora_type=6).train()
    with torch.no_grad():
        layer.mora_M.normal_(0, 0.1)
    x = torch.randn(4, fast.MERGED_MIN_ROWS // 4, k, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None and "_Mora" in type(y.grad_fn).__name__
    base = layer.base_layer
    merged = nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
    assert torch.equal(y, merged)
    few = x[:, :2]  # decoding: fewer rows than that, the branch runs beside the base GEMM
    assert not torch.equal(layer(few), nn.functional.linear(few, base.weight + layer.delta_weight(), base.bias))


def test_mora_other_types_and_dtypes_take_the_generic_path():
    layer = MoraLayer(base_layer(32, 32), rank=4, mora_type=2).to(DT)
    assert layer.fast_forward(torch.randn(2, 32, dtype=DT)) is None
    layer = MoraLayer(base_layer(32, 32).to(torch.bfloat16), rank=4, mora_type=6)
    assert layer.fast_forward(torch.randn(2, 32, dtype=torch.bfloat16)) is None


def test_mora_plan_runs_cover_the_cyclic_padding():
    for k, r_hat in [(10, 4), (10, 25), (7, 7), (12, 5)]:
        n_blocks = math.ceil(k / r_hat)
        plan = fast.MoraPlan(1, k, 3, r_hat, n_blocks)
        flat = []
        for runs in plan.blocks:
            offs = []
            for src, length, off in runs:
                flat += list(range(src, src + length))
                offs += list(range(off, off + length))
            assert offs == list(range(r_hat))
        assert flat == [t % k for t in range(n_blocks * r_hat)]


# --------------------------------------------------------------------------------------------
# VB-LoRA (through a tiny model: its layers read the bank from the root module)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_vblora_fast_equals_generic(tiny_model, dropout):
    from finetune.adapters import attach

    model = tiny_model.train()
    adapter = attach(model, "vblora", dict(rank=2, num_vectors=16, vector_length=32, topk=2, dropout=dropout,
                                           init_logits_std=1.0))
    model.to(DT)  # the bank is created in fp32; the whole model in fp64 for the comparison
    layer = adapter.layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 3, layer.in_features, dtype=DT, requires_grad=True)
    assert _used_fast(layer, x)
    y0, g0 = run(layer, x, fast_path=False, extra=[adapter.bank])  # bank gradient included
    y1, g1 = run(layer, x, fast_path=True, extra=[adapter.bank])
    assert (y0 - y1).abs().max().item() <= 1e-10
    for a, b in zip(g0, g1):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, a.abs().max().item())


def test_whole_model_step_identical_on_both_paths(tiny_model):
    """One fp64 training step of the tiny model per method: loss and every adapter gradient agree."""
    import copy

    from finetune.adapters import attach

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    settings = {"lora": dict(rank=4), "mora": dict(rank=4, type=6), "vblora": dict(vector_length=32)}
    base = tiny_model.to(DT)
    for method, s in settings.items():
        results = []
        for fast_path in (False, True):
            model = copy.deepcopy(base)
            torch.manual_seed(4)  # the same initial adapter on both paths
            adapter = attach(model, method, s)
            model.to(DT)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3)) * 0.05)
            classes = {type(layer) for layer in adapter.layers.values()}
            saved = {c: c.fast_forward for c in classes}
            if not fast_path:
                for c in classes:
                    c.fast_forward = AdapterLayer.fast_forward
            try:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            finally:
                for c, f in saved.items():
                    c.fast_forward = f
            results.append((loss.item(), [p.grad.clone() for p in adapter.parameters()]))
        (l0, g0), (l1, g1) = results
        assert abs(l0 - l1) <= 1e-12, method
        for a, b in zip(g0, g1):
            assert (a - b).abs().max().item() <= 1e-10 * max(1.0, a.abs().max().item()), method
