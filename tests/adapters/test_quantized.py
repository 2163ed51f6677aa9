"""Quantized bases (`model.quantize=4bit|8bit`, bitsandbytes on the CPU) with every adapter method:
a few training steps, the merge policy of methods.md §2.10 / §4.13, and the tolerances behind it.

Tolerances (why these numbers):

- Weights: the merged dense weight of an adapted layer must equal dequant(Q(W0)) + ΔW, both in fp32:
  ≤ 1e-6 (it is the same fp32 sum, so in practice exactly 0); a quantized layer that is not adapted
  must equal dequant(Q(W0)); every other tensor (embeddings, norms) the saved base exactly.
- Logits, quantization-free: the adapted model whose quantized base layers are replaced by their
  dequantized fp32 twins (adapter still unmerged) against the merged model: ≤ 1e-5, the spec's
  merged-vs-unmerged fp32 tolerance (§6), since only fp32 summation order differs.
- Logits, through bitsandbytes' own compute path (the adapted model exactly as trained):
  * 4-bit: on the CPU, bitsandbytes multiplies by exactly dequant(W) in the compute dtype (fp32) —
    once `finetune.models.load.keep_4bit_layout` has switched off its AVX512-BF16 repacking — so the
    same 1e-5 holds (measured: ≤ 7e-7).
  * 8-bit: LLM.int8 also quantizes the *activations* (row-wise absmax to int8, through fp16) on
    every matmul, so even the un-adapted base differs from its dequantized dense twin by D0
    (measured ≈ 1.4e-2 on logits of magnitude ≈ 1.7). The adapter branch is fp32 on the same input
    and adds no error of its own, so the adapted-vs-merged gap is that same activation rounding
    carried through a slightly different network: we require ≤ 2·D0 (measured ≤ 1.1·D0), and the
    exact quantization-free comparison above pins down the merge itself.
"""

import json

import bitsandbytes  # noqa: F401 (a dependency: fail, never skip, if it is missing)
import pytest
import torch

from finetune.adapters.base import dense_weight, is_quantized  # noqa: E402
from finetune.errors import UserError  # noqa: E402
from finetune.outputs.merge import MARKER, dequantize_model, load_run, merge_run  # noqa: E402
from finetune.training.loop import train  # noqa: E402

from conftest import tiny_config  # noqa: E402

METHODS = {
    "lora": [],
    # MoRA on three projections only: the others stay quantized and un-adapted, and must be
    # dequantized into the merged model as well.
    "mora": ["method.targets=[q_proj,v_proj,down_proj]"],
    "vblora": ["method.vector_length=32", "method.lr_logits=0.1", "method.lr_bank=0.01"],
}
COMBOS = [(m, q) for m in METHODS for q in ("4bit", "8bit")]
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{m}-{q}" for m, q in COMBOS])
def run_dir(request, tmp_path_factory):
    method, bits = request.param
    out = tmp_path_factory.mktemp(f"q-{method}-{bits}") / "run"
    cfg = tiny_config(f"method={method}", f"model.quantize={bits}", f"output_dir={out}", "task.num_pairs=2",
                      "task.max_new_tokens=4", "trainer.max_steps=3", "trainer.batch_size=2",
                      "trainer.lr=1e-2", *METHODS[method])
    train(cfg, quiet=True)
    return out, method, bits


def _safetensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_trains_on_the_quantized_base_and_merges(run_dir):
    out, method, bits = run_dir
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 3
    model, adapter, _, cfg = load_run(out)
    assert cfg.model.quantize == bits
    assert all(is_quantized(layer.root_layer()) for layer in adapter.layers.values())
    assert max(layer.delta_weight().abs().max().item() for layer in adapter.layers.values()) > 1e-4
    marker = json.loads((out / "merged" / MARKER).read_text())
    assert marker["method"] == method and marker["base_quantized"] == bits
    assert marker["merged_into"] == "dequantized"
    assert marker["quantization"]["bits"] == bits
    if bits == "4bit":
        assert marker["quantization"]["quant_type"] == "nf4" and marker["quantization"]["double_quant"] is True
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    # the saved base is the full-precision one (not a bitsandbytes checkpoint)
    assert "quantization_config" not in json.loads((out / "base" / "config.json").read_text())
    assert all(t.dtype == torch.float32 for t in _safetensors(out / "base").values())


def test_merged_weights_are_dequantized_base_plus_delta(run_dir):
    out, method, bits = run_dir
    model, adapter, _, _ = load_run(out)
    merged = _safetensors(out / "merged")
    original = _safetensors(out / "base")
    quantized_keys, plain_quantized = set(), 0
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        key = name.replace(".base_layer", "") + ".weight"
        quantized_keys.add(key)
        if ".base_layer" not in name:  # quantized but not adapted: dequantized as is
            plain_quantized += 1
            assert torch.equal(merged[key], dense_weight(module)), key
    for name, layer in adapter.layers.items():  # adapted: dequant(Q(W0)) + ΔW
        key = f"{name}.weight"
        expected = dense_weight(layer.root_layer()) + layer.delta_weight()
        assert merged[key].dtype == torch.float32
        assert (merged[key] - expected).abs().max().item() <= 1e-6, key
    assert plain_quantized == (2 * 4 if method == "mora" else 0)  # MoRA: k, o, gate, up of 2 layers
    assert len(quantized_keys) == 14
    for key in set(original) - quantized_keys:  # embeddings, norms: the saved base, untouched
        if key in merged:
            assert torch.equal(merged[key], original[key]), key


def test_merged_logits_match_the_adapted_quantized_model(run_dir):
    from transformers import AutoModelForCausalLM

    out, method, bits = run_dir
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    model, adapter, _, _ = load_run(out)
    with torch.no_grad():
        expected = merged(IDS).logits
        adapted_q = model(IDS).logits                      # as trained: bitsandbytes layers
        adapter.set_enabled(False)
        base_q = model(IDS).logits
        dequantize_model(model)                            # the same weights, dense fp32
        base_dq = model(IDS).logits
        adapter.set_enabled(True)
        adapted_dq = model(IDS).logits
    assert (adapted_q - base_q).abs().max().item() > 1e-3  # the adapter changes the model
    assert (adapted_dq - expected).abs().max().item() <= 1e-5
    gap = (adapted_q - expected).abs().max().item()
    d0 = (base_q - base_dq).abs().max().item()
    if bits == "4bit":
        assert d0 <= 1e-5 and gap <= 1e-5
    else:
        assert 1e-4 < d0 < 0.1  # LLM.int8 rounds activations: a real, bounded compute-path error
        assert gap <= 2 * d0 + 1e-5, (gap, d0)


@pytest.mark.parametrize("run_dir", [("lora", "4bit")], indirect=True, ids=["lora-4bit"])
def test_merge_into_the_original_weights(run_dir, tmp_path):
    out, method, bits = run_dir
    target = merge_run(out, tmp_path / "orig", base="original", quiet=True)
    marker = json.loads((target / MARKER).read_text())
    assert marker["merged_into"] == "original" and marker["base_quantized"] == "4bit"
    assert "quantization error" in marker["note"]
    _, adapter, _, _ = load_run(out)
    merged, original, dequant = _safetensors(target), _safetensors(out / "base"), _safetensors(out / "merged")
    for name, layer in adapter.layers.items():
        key = f"{name}.weight"
        assert (merged[key] - (original[key] + layer.delta_weight())).abs().max().item() <= 1e-6
        assert (merged[key] - dequant[key]).abs().max().item() > 1e-4  # differs by the NF4 error
    with pytest.raises(UserError, match="--base bogus: allowed: dequantized, original"):
        merge_run(out, tmp_path / "x", base="bogus")


@pytest.mark.parametrize("run_dir", [("vblora", "8bit")], indirect=True, ids=["vblora-8bit"])
def test_cli_merge_base_option(run_dir, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    out, method, bits = run_dir
    result = CliRunner().invoke(app, ["merge", str(out), "--out", str(tmp_path / "m"), "--base", "original"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / MARKER).read_text())["merged_into"] == "original"
    result = CliRunner().invoke(app, ["merge", str(out), "--out", str(tmp_path / "n"), "--base", "nf4"])
    assert result.exit_code == 2 and "--base nf4: allowed" in result.output


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_full_fine_tuning_of_a_quantized_base_is_refused(bits):
    with pytest.raises(UserError, match=f"model.quantize={bits} with method=full"):
        tiny_config("method=full", f"model.quantize={bits}")


@pytest.mark.parametrize("double_quant", [True, False])
def test_tiny_model_dimensions_fit_the_bitsandbytes_blocks(tmp_path, double_quant):
    """4-bit: NF4 blocks of 64 values; every tiny-model matrix (128x128, 64x128, 384x128, 128x384)
    has a row length that is a multiple of 64, so no block straddles two rows, and the dequantized
    weight is within NF4's largest half-gap (0.152) of the block absmax. 8-bit: row-wise absmax
    int8, error ≤ half a step (absmax/254) plus fp16 rounding of the scale."""
    from finetune.models.load import load_model

    torch.manual_seed(0)
    cfg4 = tiny_config("model.quantize=4bit", f"model.double_quant={str(double_quant).lower()}").model
    m4 = load_model(cfg4, save_base=tmp_path / "base")
    original = _safetensors(tmp_path / "base")
    cfg8 = tiny_config("model.quantize=8bit").model
    m8 = load_model(cfg8, base_dir=str(tmp_path / "base"))
    count = 0
    for name, module in m4.named_modules():
        if not is_quantized(module):
            continue
        count += 1
        w = original[f"{name}.weight"]
        state = module.weight.quant_state
        assert state.blocksize == 64 and module.in_features % state.blocksize == 0
        assert bool(state.nested) == double_quant
        err = (dense_weight(module) - w).reshape(-1, state.blocksize)
        absmax = w.reshape(-1, state.blocksize).abs().amax(dim=1, keepdim=True)
        assert (err.abs() <= 0.16 * absmax + 1e-7).all(), name
        w8 = dense_weight(m8.get_submodule(name))
        row_max = w.abs().amax(dim=1, keepdim=True)
        # half an int8 step, plus the fp16 rounding of the row scale (bitsandbytes quantizes via fp16)
        assert ((w8 - w).abs() <= 0.55 * row_max / 127).all(), name
    assert count == 14


def test_evaluation_does_not_change_the_4bit_training_path(tmp_path):
    """bitsandbytes would repack a 4-bit weight for a bf16 inference kernel (without autograd) at
    the first no-grad eval forward on AVX512-BF16 CPUs; after that, training gradients were
    silently wrong. Our loader switches the repacking off: gradients after an evaluation equal
    those of a fresh model."""
    from finetune import adapters
    from finetune.models.load import load_model

    torch.manual_seed(0)
    cfg = tiny_config("model.quantize=4bit").model
    load_model(cfg, save_base=tmp_path / "base")
    grads = []
    for evaluate_first in (False, True):
        model = load_model(cfg, base_dir=str(tmp_path / "base"))
        torch.manual_seed(1)
        adapter = adapters.attach(model, "lora", dict(rank=4))
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.lora_B.normal_(std=0.1)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(IDS)
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad for p in adapter.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_attach_also_pins_the_4bit_layout_of_models_loaded_elsewhere(tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune import adapters
    from finetune.models.load import load_model, quantization_config

    torch.manual_seed(0)
    cfg = tiny_config("model.quantize=4bit").model
    load_model(cfg, save_base=tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization_config(cfg),
                                                 device_map={"": "cpu"})
    adapters.attach(model, "mora", dict(rank=4, targets=["q_proj"]))
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_quantized_base_with_fully_trained_modules_merges(tmp_path):
    """task.train_modules on a quantized base: RUN_DIR/base then holds the bitsandbytes checkpoint
    with the trained norms; the merge dequantizes it (no original weights left: refused clearly)."""
    from safetensors.torch import load_file

    from finetune.config.compose import compose

    out = tmp_path / "run"
    cfg = compose(["model=tiny", "method=lora", "task=cpt", "model.quantize=4bit", "task.train_modules=[norm]",
                   f"output_dir={out}", "trainer.max_steps=2", "trainer.batch_size=2", "task.max_length=64",
                   "trainer.lr=1e-2"])
    train(cfg, quiet=True)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    model, adapter, _, _ = load_run(out)
    assert torch.equal(merged["model.norm.weight"], model.model.norm.weight.detach().float())
    assert not torch.equal(merged["model.norm.weight"], torch.ones_like(merged["model.norm.weight"]))
    for name, layer in adapter.layers.items():
        expected = dense_weight(layer.root_layer()) + layer.delta_weight()
        assert (merged[f"{name}.weight"] - expected).abs().max().item() <= 1e-6
    with pytest.raises(UserError, match="itself quantized"):
        merge_run(out, tmp_path / "orig", base="original")
