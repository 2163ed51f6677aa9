"""The streaming merge writer (finetune.outputs.streaming, used by `finetune merge`): the files it writes
equal the in-place merge + save_pretrained, tensor for tensor, in every dtype, with shards, and
transformers loads them."""

import json

import pytest
import torch
from safetensors import safe_open

from finetune import adapters
from finetune.outputs.streaming import INDEX_FILE, SINGLE_FILE, save_merged


def tensors(directory):
    out = {}
    index = directory / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_FILE]
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def adapted(tiny_model_cfg, method):
    from finetune.models.load import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_cfg).eval()
    settings = {"lora": {"rank": 4, "alpha": 8}, "mora": {"rank": 4}, "vblora": {"rank": 4}}[method]
    adapter = adapters.attach(model, method, settings)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, adapter


@pytest.mark.parametrize("method", ["lora", "mora", "vblora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_equals_in_place_merge_and_save_pretrained(tiny_model_cfg, tmp_path, method, dtype):
    model, adapter = adapted(tiny_model_cfg, method)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits = model(ids).logits
    assert save_merged(model, adapter, tmp_path / "streamed", dtype) == "streamed"
    assert not any(isinstance(m, type(next(iter(adapter.layers.values())))) for m in model.modules())

    ref, ref_adapter = adapted(tiny_model_cfg, method)
    with torch.no_grad():
        ref_adapter.merge()
    ref_adapter.unwrap()
    ref.to(getattr(torch, dtype)).save_pretrained(tmp_path / "reference", safe_serialization=True)

    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "reference")
    assert list(got) == list(want)  # same names (tied lm_head written once), same order
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["dtype"] == dtype and config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "streamed" / "generation_config.json").is_file()

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert loaded.dtype == getattr(torch, dtype)
    if dtype == "float32":
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_shards_and_index(tiny_model_cfg, tmp_path):
    model, adapter = adapted(tiny_model_cfg, "lora")
    save_merged(model, adapter, tmp_path / "one", "float32")
    model, adapter = adapted(tiny_model_cfg, "lora")
    save_merged(model, adapter, tmp_path / "many", "float32", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "many" / SINGLE_FILE).exists()
    one, many = tensors(tmp_path / "one"), tensors(tmp_path / "many")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    assert list(one) == sorted(many, key=list(one).index) and all(torch.equal(one[k], many[k]) for k in one)

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_non_finite_merge_is_refused(tiny_model_cfg, tmp_path):
    model, adapter = adapted(tiny_model_cfg, "lora")
    with torch.no_grad():
        next(iter(adapter.layers.values())).lora_B.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="non-finite"):
        save_merged(model, adapter, tmp_path / "x", "float32")


def test_fallback_and_full_fine_tuning_write_the_same(tiny_model_cfg, tmp_path, monkeypatch):
    import finetune.outputs.streaming as streaming

    model, adapter = adapted(tiny_model_cfg, "vblora")
    assert save_merged(model, adapter, tmp_path / "streamed", "bfloat16") == "streamed"
    assert not hasattr(model, "vblora_vector_bank")  # unwrapped: a plain model again
    model, adapter = adapted(tiny_model_cfg, "vblora")
    monkeypatch.setattr(streaming, "_state_to_save", lambda model, exclude: None)
    assert save_merged(model, adapter, tmp_path / "fallback", "bfloat16") == "save_pretrained"
    monkeypatch.undo()
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "fallback")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    from finetune.models.load import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_cfg)
    full = adapters.attach(model, "full", {})
    assert save_merged(model, full, tmp_path / "full", "float32") == "streamed"
    got = tensors(tmp_path / "full")
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v)
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got  # tied: written once
