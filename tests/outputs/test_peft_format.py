"""The peft adapter format (methods.md §5) against peft as the oracle (§6.6).

peft is a test dependency only. Every peft model here is built from a copy of the same tiny base;
weights are copied, never seeded (peft's VB-LoRA init differs from ours and re-draws its bank per
module). "No warnings" ignores one transformers deprecation that peft itself triggers while loading
(`is_gradient_checkpointing`), which has nothing to do with the adapter files.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft  # the test-only oracle, installed by `make test`
import pytest
import torch
from safetensors import safe_open

from finetune.adapters import attach as attach_method
from finetune.adapters import lora, vblora
from finetune.adapters.base import ALL_LINEAR, replace_module
from finetune.adapters.lora import LoraLayer
from finetune.errors import UserError
from finetune.outputs.peft_format import (
    BANK_KEY,
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_module_names,
    check_payload,
    export_peft,
    export_run_peft,
    import_peft,
    peft_payload,
)

from conftest import ids, logits_of

B_LEN = 32
LORA_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "lora_alpha",
               "use_rslora", "target_modules", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias",
               "use_dora", "modules_to_save", "layers_to_transform", "layers_pattern", "lora_dropout",
               "init_lora_weights"}
VBLORA_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "num_vectors",
                 "vector_length", "topk", "save_only_topk_weights", "target_modules", "fan_in_fan_out", "bias",
                 "modules_to_save", "vblora_dropout", "init_logits_std", "init_vector_bank_bound"}


def randomize_lora(adapter, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def load_in_peft(base, directory):
    """PeftModel.from_pretrained with every warning recorded; asserts there is none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    relevant = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert not relevant, relevant
    return model


def peft_quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def check_files(directory, fields):
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert set(config) == fields
    assert not (directory / "adapter_model.bin").exists()
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
    assert all(k.startswith("base_model.model.model.layers.") or k == BANK_KEY for k in keys)
    assert not any("default" in k for k in keys)
    return config, keys


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["all7", "rslora", "qv", "layer0"])
def test_lora_export_loads_in_peft(tiny_model, tmp_path, variant):
    fresh = copy.deepcopy(tiny_model)
    kw = {"all7": {}, "rslora": {"rslora": True}, "qv": {"targets": ["q_proj", "v_proj"]},
          "layer0": {"targets": r"model\.layers\.0\..*_proj"}}[variant]
    adapter = lora.attach(tiny_model, rank=4, alpha=8, **kw)
    randomize_lora(adapter)
    x = ids()
    ours = logits_of(tiny_model, x)
    export_peft(adapter, tmp_path, "tiny-llama")
    config, keys = check_files(tmp_path, LORA_FIELDS)
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llama"
    assert len(keys) == 2 * len(adapter.layers)
    if variant == "all7":
        assert config["target_modules"] == sorted(ALL_LINEAR)
    if variant == "layer0":  # leaf names would also select layer 1: full paths instead
        assert config["target_modules"] == sorted(adapter.layers)
    theirs = logits_of(load_in_peft(fresh, tmp_path), x)
    assert (ours - theirs).abs().max() <= 1e-5


def test_lora_export_per_module_ranks(tiny_model, tmp_path):
    fresh, again = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    adapter = lora.attach(tiny_model, rank=4, alpha=8)
    for name in [n for n in adapter.layers if n.endswith("q_proj")] + ["model.layers.1.mlp.down_proj"]:
        rank, alpha = (8, 8.0) if name.endswith("q_proj") else (2, 6.0)
        layer = LoraLayer(adapter.layers[name].base_layer, rank, alpha)
        replace_module(tiny_model, name, layer)
        adapter.layers[name] = layer
    randomize_lora(adapter)
    x = ids()
    ours = logits_of(tiny_model, x)
    export_peft(adapter, tmp_path)
    config, _ = check_files(tmp_path, LORA_FIELDS)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 6}
    assert (logits_of(load_in_peft(fresh, tmp_path), x) - ours).abs().max() <= 1e-5
    import_peft(again, tmp_path)  # our importer honours the patterns too
    assert (logits_of(again, x) - ours).abs().max() <= 1e-6


def test_lora_import_from_peft(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random, non-zero B
    pm = peft_quietly(peft.get_peft_model, tiny_model, config).eval()
    x = ids()
    theirs = logits_of(pm, x)
    pm.save_pretrained(str(tmp_path))
    adapter = import_peft(fresh, tmp_path)
    assert adapter.method == "lora" and len(adapter.layers) == 6
    assert (logits_of(fresh, x) - theirs).abs().max() <= 1e-5


def assert_merged_weights_match_peft(model, fresh, adapter, tmp_path):
    """Export ``adapter``, merge it with peft's merge_and_unload on ``fresh`` (an untouched copy of
    the base), merge ours in place: every weight agrees to 1e-6."""
    export_peft(adapter, tmp_path)
    merged_theirs = load_in_peft(fresh, tmp_path).merge_and_unload()
    adapter.merge()
    adapter.unwrap()
    ours, theirs = model.state_dict(), merged_theirs.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max() <= 1e-6, k


def test_lora_merge_and_unload_parity(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    adapter = lora.attach(tiny_model, rank=4, alpha=8)
    randomize_lora(adapter)
    assert_merged_weights_match_peft(tiny_model, fresh, adapter, tmp_path)


# --------------------------------------------------------------------------------------------
# VB-LoRA
# --------------------------------------------------------------------------------------------


def vblora_adapter(model, **kw):
    kw.setdefault("vector_length", B_LEN)
    kw.setdefault("num_vectors", 90)
    kw.setdefault("rank", 4)  # the paper's rank; the shapes below are written for it
    kw.setdefault("init_logits_std", 1.0)  # well-separated top-k choices
    return vblora.attach(model, **kw)


@pytest.mark.parametrize("topk_only", [False, True])
def test_vblora_export_loads_in_peft(tiny_model, tmp_path, topk_only):
    fresh = copy.deepcopy(tiny_model)
    adapter = vblora_adapter(tiny_model, save_only_topk=topk_only)
    x = ids()
    ours = logits_of(tiny_model, x)
    export_peft(adapter, tmp_path, "tiny-llama")
    config, keys = check_files(tmp_path, VBLORA_FIELDS)
    assert config["save_only_topk_weights"] is topk_only and config["num_vectors"] == 90
    assert BANK_KEY in keys and len(keys) == 1 + (4 if topk_only else 2) * len(adapter.layers)
    if topk_only:
        with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
            t = f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.vblora_logits_B_topk_indices")
        assert t.dtype == torch.uint8 and tuple(t.shape) == (64 // B_LEN, 4, 2)
    pm = load_in_peft(fresh, tmp_path)
    assert (logits_of(pm, x) - ours).abs().max() <= 1e-5


def test_vblora_import_from_peft(tiny_model, tmp_path):
    """peft-saved VB-LoRA (full logits, weights set by copying random tensors) → our implementation."""
    fresh = copy.deepcopy(tiny_model)
    config = peft.VBLoRAConfig(r=4, num_vectors=90, vector_length=B_LEN, topk=2, target_modules=list(ALL_LINEAR),
                               task_type="CAUSAL_LM")
    pm = peft_quietly(peft.get_peft_model, tiny_model, config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        pm.base_model.vblora_vector_bank["default"].copy_(torch.rand(90, B_LEN, generator=g) - 0.5)
        for name, p in pm.named_parameters():
            if "vblora_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    x = ids()
    theirs = logits_of(pm, x)
    pm.save_pretrained(str(tmp_path))
    adapter = import_peft(fresh, tmp_path)
    assert adapter.method == "vblora" and len(adapter.layers) == 14 and not adapter.inference_only
    assert (logits_of(fresh, x) - theirs).abs().max() <= 1e-5


def test_vblora_parity_with_peft_logits_and_gradients(tiny_model):
    other = copy.deepcopy(tiny_model)
    adapter = vblora_adapter(tiny_model)
    config = peft.VBLoRAConfig(r=4, num_vectors=90, vector_length=B_LEN, topk=2, target_modules=list(ALL_LINEAR),
                               task_type="CAUSAL_LM")
    pm = peft_quietly(peft.get_peft_model, other, config)
    modules = {n: m for n, m in pm.base_model.model.named_modules() if n in adapter.layers}
    assert set(modules) == set(adapter.layers)
    peft_bank = pm.base_model.vblora_vector_bank["default"]
    with torch.no_grad():
        peft_bank.copy_(adapter.bank)
        for name, layer in adapter.layers.items():
            modules[name].vblora_logits_A["default"].copy_(layer.vblora_logits_A)
            modules[name].vblora_logits_B["default"].copy_(layer.vblora_logits_B)
    tiny_model.train()
    pm.train()
    x = ids()
    ours, theirs = tiny_model(input_ids=x, labels=x), pm(input_ids=x, labels=x)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    ours.loss.backward()
    theirs.loss.backward()
    assert (adapter.bank.grad - peft_bank.grad).abs().max() <= 1e-5
    assert adapter.bank.grad.abs().max() > 0
    for name, layer in adapter.layers.items():
        for t in ("vblora_logits_A", "vblora_logits_B"):
            g_ours, g_theirs = getattr(layer, t).grad, getattr(modules[name], t)["default"].grad
            assert (g_ours - g_theirs).abs().max() <= 1e-5, (name, t)
    # the stored-parameter count follows peft's get_nb_savable_parameters (float32-equivalent)
    assert adapter.num_stored() == pm.base_model.get_nb_savable_parameters()[0]
    pm.peft_config["default"].save_only_topk_weights = True
    adapter.settings["save_only_topk"] = True
    assert adapter.num_stored() == pm.base_model.get_nb_savable_parameters()[0]


def test_vblora_as_lora(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    adapter = vblora_adapter(tiny_model)
    x = ids()
    ours = logits_of(tiny_model, x)
    export_peft(adapter, tmp_path, as_lora=True)
    config, _ = check_files(tmp_path, LORA_FIELDS)
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 4
    assert (logits_of(load_in_peft(fresh, tmp_path), x) - ours).abs().max() <= 1e-6


@pytest.mark.parametrize("topk_only", [False, True])
def test_vblora_merge_and_unload_parity(tiny_model, tmp_path, topk_only):
    fresh = copy.deepcopy(tiny_model)
    adapter = vblora_adapter(tiny_model, save_only_topk=topk_only)
    assert_merged_weights_match_peft(tiny_model, fresh, adapter, tmp_path)


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4])
def test_mora_sharing_types_as_exact_lora(tiny_model, tmp_path, mora_type):
    """§2.9: ΔW = T·M·C is a LoRA of rank r̂ with lora_A = M·C, lora_B = T and lora_alpha = r̂."""
    fresh = copy.deepcopy(tiny_model)
    adapter = attach_method(tiny_model, "mora", {"rank": 4, "type": 1})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.set_type(mora_type)
            layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=g) * 0.02)
    x = ids()
    ours = logits_of(tiny_model, x)
    export_peft(adapter, tmp_path, as_lora=True)
    config, _ = check_files(tmp_path, LORA_FIELDS)
    r_hat = {n.rsplit(".", 1)[-1]: l.r_hat for n, l in adapter.layers.items()}
    assert config["rank_pattern"] == {k: v for k, v in r_hat.items() if v != config["r"]}
    assert {**config["alpha_pattern"]} == {k: v for k, v in r_hat.items() if v != config["lora_alpha"]}
    assert (logits_of(load_in_peft(fresh, tmp_path), x) - ours).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------
# Negative checks
# --------------------------------------------------------------------------------------------


def test_refuses_vblora_without_bank(tiny_model):
    adapter = vblora_adapter(tiny_model)
    config, tensors = peft_payload(adapter)
    shapes = {n: (l.in_features, l.out_features) for n, l in adapter.layers.items()}
    names = base_module_names(tiny_model)
    check_payload(config, tensors, shapes, names)  # complete: passes
    del tensors[BANK_KEY]
    with pytest.raises(UserError, match="bank"):
        check_payload(config, tensors, shapes, names)


def test_refuses_target_modules_that_do_not_select_exactly(tiny_model, tmp_path):
    adapter = lora.attach(tiny_model, rank=4, targets=["q_proj", "v_proj"])
    with pytest.raises(UserError, match="does not select exactly"):
        export_peft(adapter, tmp_path / "a", target_modules=["q_proj"])  # misses v_proj
    with pytest.raises(UserError, match="does not select exactly"):
        export_peft(adapter, tmp_path / "b", target_modules=["q_proj", "v_proj", "k_proj"])  # extra k_proj
    with pytest.raises(UserError, match="does not select exactly"):
        export_peft(adapter, tmp_path / "c", target_modules=["self_attn"])  # matches the attention blocks
    assert not (tmp_path / "a").exists()
    export_peft(adapter, tmp_path / "ok", target_modules=r"model\.layers\.\d+\.self_attn\.[qv]_proj")


def test_refuses_bad_shapes_and_topk(tiny_model):
    adapter = vblora_adapter(tiny_model, save_only_topk=True)
    config, tensors = peft_payload(adapter)
    shapes = {n: (l.in_features, l.out_features) for n, l in adapter.layers.items()}
    names = base_module_names(tiny_model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_indices"
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key][..., 1] = bad[key][..., 0]
    with pytest.raises(UserError, match="repeated"):
        check_payload(config, bad, shapes, names)
    with pytest.raises(UserError, match="shape"):
        check_payload({**config, "r": 5}, tensors, shapes, names)
    with pytest.raises(UserError, match="the config implies"):
        check_payload({**config, "save_only_topk_weights": False}, tensors, shapes, names)


def test_refuses_mora_and_full(tiny_model, tmp_path):
    mora = attach_method(copy.deepcopy(tiny_model), "mora", {"rank": 4, "type": 1})
    with pytest.raises(UserError, match="MoRA has no peft adapter format; use `finetune merge`"):
        export_peft(mora, tmp_path)
    mora = attach_method(copy.deepcopy(tiny_model), "mora", {"rank": 4, "type": 6})
    with pytest.raises(UserError, match="MoRA has no peft adapter format; use `finetune merge`"):
        export_peft(mora, tmp_path, as_lora=True)  # type 6 has no compact LoRA form
    relora = lora.attach(copy.deepcopy(tiny_model), rank=4, relora_every=10)
    with pytest.raises(UserError, match="merged updates into the base"):
        export_peft(relora, tmp_path)
    full = attach_method(tiny_model, "full", {})
    with pytest.raises(UserError, match="full fine-tuning"):
        export_peft(full, tmp_path)
    assert not any(tmp_path.iterdir())


def test_import_rejects_unsupported_configs(tiny_model, tmp_path):
    adapter = lora.attach(copy.deepcopy(tiny_model), rank=4)
    export_peft(adapter, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        import_peft(tiny_model, tmp_path)
    with pytest.raises(UserError, match="no adapter_config.json"):
        import_peft(tiny_model, tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# `finetune export RUN_DIR --format peft --out DIR` on a trained run
# --------------------------------------------------------------------------------------------


def test_export_run_of_a_trained_vblora_run(tmp_path):
    """Train VB-LoRA for a few steps (top-k storage), export the run, load it in peft on the base
    that the config names (the run's saved random-init base): logits equal our loaded run's."""
    from transformers import AutoModelForCausalLM

    from finetune.run.load import load_run
    from finetune.training.loop import train

    from conftest import tiny_config

    run = tmp_path / "run"
    train(tiny_config("method=vblora", "method.vector_length=32", "method.num_vectors=64",
                      "method.save_only_topk=true", "task.num_pairs=4", "task.eval_limit=1", "task.max_new_tokens=2",
                      "trainer.max_steps=3",
                      "trainer.batch_size=2", "trainer.merge=false", f"output_dir={run}"), quiet=True)
    out = export_run_peft(run, tmp_path / "peft")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["save_only_topk_weights"] is True and config["base_model_name_or_path"] == str((run / "base").resolve())
    model, adapter, _, _ = load_run(run)
    assert adapter.inference_only
    x = ids()
    ours = logits_of(model, x)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    assert (logits_of(load_in_peft(base, out), x) - ours).abs().max() <= 1e-5


def test_cli_exports_a_trained_mora_type1_run_as_lora(tmp_path):
    """`finetune export RUN --out DIR --as-lora` on a trained MoRA type-1 run: peft loads it on the
    run's base and its logits equal our loaded run's; without --as-lora the CLI says how."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.run.load import load_run
    from finetune.training.loop import train

    from conftest import tiny_config

    run = tmp_path / "run"
    train(tiny_config("method=mora", "method.rank=4", "method.type=1", "task.num_pairs=4", "task.eval_limit=1",
                      "task.max_new_tokens=2", "trainer.max_steps=3", "trainer.batch_size=2",
                      "trainer.merge=false", f"output_dir={run}"), quiet=True)
    refused = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "--as-lora" in refused.output and not (tmp_path / "no").exists()
    out = tmp_path / "peft"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--as-lora", "-q"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA"
    model, _, _, _ = load_run(run)
    x = ids()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    assert (logits_of(load_in_peft(base, out), x) - logits_of(model, x)).abs().max() <= 1e-5
