"""The FLOPs behind MFU, against torch's own FLOP counter (torch.utils.flop_counter), which counts
the matrix products a forward or backward really runs. On the CPU the counter does not see the
attention kernel, so the counts compared here leave attention out on both sides."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from finetune import adapters
from finetune.config.compose import method_settings
from finetune.data.examples import IGNORE
from finetune.models.attention import segments
from finetune.models.load import load_model
from finetune.models.loss import causal_lm_loss_sum
from finetune.training import flops
from finetune.training.flops import Cost, context_lengths, peak_flops

from conftest import tiny_config

TOKENS = (2, 40)


def attached(*overrides):
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    model = load_model(cfg.model)
    return model, adapters.attach(model, cfg.method.name, method_settings(cfg))


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [["method=lora"], ["method=vblora", "method.vector_length=32"], ["method=full"]],
                         ids=["lora", "vblora", "full"])
def test_forward_flops_are_the_products_the_model_runs(overrides):
    model, adapter = attached(*overrides)
    x = torch.randint(0, 256, TOKENS)
    with torch.no_grad():
        assert Cost(model, adapter).forward * x.numel() == counted(lambda: model(input_ids=x))


def test_full_fine_tuning_costs_three_forwards():
    """Every weight trained: forward, input gradients and weight gradients, 6 FLOPs per weight and token."""
    model, adapter = attached("method=full")
    x = torch.randint(0, 256, TOKENS)
    cost = Cost(model, adapter)
    assert cost.linear == 3 * cost.forward
    assert cost.linear * x.numel() == counted(lambda: model(input_ids=x, labels=x).loss.backward())


def test_a_frozen_base_skips_its_weight_gradients():
    model, adapter = attached("method=lora")
    cost = Cost(model, adapter)
    base = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    branches = sum(layer.branch_flops() for layer in adapter.layers.values())
    assert cost.forward == base + branches
    assert cost.linear == 2 * base + 3 * branches  # no 2·k·d for the frozen weights' gradients


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_branch_flops_are_its_products(mora_type):
    model, adapter = attached("method=mora", f"method.type={mora_type}")
    for layer in list(adapter.layers.values())[:3]:
        x = torch.randn(*TOKENS, layer.in_features)
        with torch.no_grad():
            assert layer.branch_flops() * x.shape[0] * x.shape[1] == counted(lambda layer=layer, x=x: layer.branch(x))


def mora_layer(mora_type, dropout=0.0):
    from finetune.adapters.mora import MoraLayer

    base = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
    return MoraLayer(base, rank=8, mora_type=mora_type, dropout=dropout).train()  # k = d = 64, r̂ = 32


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_step_flops_are_the_products_its_layer_runs(mora_type):
    """Forward and backward of one MoRA layer over a frozen dense base (whole blocks): the counter
    sees the base's two GEMMs plus ``step_flops``; type 6 runs its branch inside the base's GEMMs
    with W + ΔW and is left with P_b's gradient, one forward's worth."""
    layer = mora_layer(mora_type)
    forward, step = layer.step_flops()
    assert (forward, step) == ((0, layer.branch_flops()) if mora_type == 6 else
                               (layer.branch_flops(), 3 * layer.branch_flops()))
    x = torch.randn(*TOKENS, 64, requires_grad=True)
    tokens, base_flops = x.shape[0] * x.shape[1], 2 * 64 * 64
    with torch.no_grad():
        assert counted(lambda: layer(x)) == tokens * (base_flops + forward)
    assert counted(lambda: layer(x).sum().backward()) == tokens * (2 * base_flops + step)


def test_mora_with_dropout_keeps_its_branch_apart():
    layer = mora_layer(6, dropout=0.1)
    assert layer.step_flops() == (layer.branch_flops(), 3 * layer.branch_flops())


def test_attention_scales_with_each_rows_real_length():
    model, adapter = attached("method=lora")
    cost = Cost(model, adapter)
    mask = torch.tensor([[1] * 10 + [0] * 6, [1] * 16])  # 10 and 16 real tokens
    got = cost.step([{"attention_mask": mask}])
    assert got == cost.linear * 26 + cost.attention * (10 * 10 + 16 * 16)
    layers, width = 2, 128  # model=tiny: 2 layers, 4 heads x 32
    assert cost.attention == 3 * 4 * layers * width


def test_the_output_projection_counts_the_tokens_with_a_target_only():
    """The loss needs logits where there is a target; the chunked loss projects only those, and
    torch's counter sees the same FLOPs (every weight trained, so no adapter kernel it cannot see)."""
    model, adapter = attached("method=full")
    cost = Cost(model, adapter)
    head = model.get_output_embeddings()
    assert cost.head == 6 * head.in_features * head.out_features
    x = torch.randint(0, 256, TOKENS)
    labels = x.clone()
    labels[:, :25] = IGNORE  # a prompt without a loss
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    targets = int((labels[:, 1:] != IGNORE).sum())  # 2 x 15
    expected = (cost.linear - cost.head) * x.numel() + cost.head * targets
    assert cost.step([batch]) == expected + cost.attention * 2 * 40 * 40
    causal_lm_loss_sum(model, batch, chunk=8)  # the first call checks the head once
    # the model's own forward still projects its last position (logits_to_keep=1), unused
    last = 2 * head.in_features * head.out_features * x.shape[0]
    assert counted(lambda: causal_lm_loss_sum(model, batch, chunk=8).backward()) == expected + last


def test_packed_rows_count_attention_within_each_example():
    """A packed row's examples attend within themselves (finetune.models.attention cuts the row at
    the same places), so each is its own context; the padding after a row is in none."""
    model, adapter = attached("method=lora")
    cost = Cost(model, adapter)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2]])
    mask = torch.tensor([[1] * 10 + [0] * 2, [1] * 12])  # row 0: examples of 4 and 6, then 2 of padding
    batch = {"attention_mask": mask, "position_ids": positions}
    assert context_lengths(batch).tolist() == [4, 6, 7, 2, 3]
    cut = segments(positions)  # the attention's own cut, padding as one more segment of row 0
    assert cut == [[4, 6, 2], [7, 2, 3]]
    real = [4 * 4 + 6 * 6, 7 * 7 + 2 * 2 + 3 * 3]
    assert cost.step([batch]) == cost.linear * 22 + cost.attention * sum(real)
    assert cost.step([{"attention_mask": mask}]) == cost.linear * 22 + cost.attention * (10 * 10 + 12 * 12)


def test_the_cpu_peak_is_the_best_of_several_sizes(tmp_path, monkeypatch):
    """Which square product runs fastest depends on the caches (on a 2-vCPU AMD EPYC 512² ran at ≈ 197
    GFLOP/s and 1024² at 125–168), so the peak is the best of them."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    rates = {256: 5e10, 512: 9e10, 1024: 7e10, 2048: 6e10}
    tried = []
    monkeypatch.setattr(flops, "_measure_matmul", lambda device, dtype, n, seconds: tried.append(n) or rates[n])
    assert peak_flops(torch.device("cpu"))[0] == 9e10
    assert tried == list(flops.CPU_SIZES) == sorted(rates)


def test_the_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    first, source = peak_flops(torch.device("cpu"))
    assert first > 1e8 and "measured fp32 matmul peak" in source
    assert peak_flops(torch.device("cpu"))[0] == first  # read back, not measured again
