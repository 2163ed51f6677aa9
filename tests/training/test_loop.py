"""The training loop: the loss goes down, the run directory is complete, gradient accumulation is
invariant to how a window is split, only adapter weights train."""

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

from finetune import adapters
from finetune.data.batching import collate
from finetune.errors import UserError
from finetune.training import loop
from finetune.training.loop import accumulate_gradients, train

from conftest import OneProcess, tiny_config


def run_tiny(tmp_path, *overrides, name="run"):
    cfg = tiny_config("task.num_pairs=8", f"output_dir={tmp_path / name}", "trainer.merge=false",
                      *overrides)
    return train(cfg, quiet=True)


def test_training_lowers_the_loss_and_writes_the_run(tmp_path):
    result = run_tiny(tmp_path, "trainer.max_steps=30", "trainer.lr=1e-2", "trainer.schedule=constant")
    run = tmp_path / "run"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.4  # a no-op step would leave it unchanged
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["metric"] == "char_acc"
    assert 0.0 <= info["metrics"]["char_acc"] <= 1.0 and info["metrics"]["n"] == 8
    assert info["params"]["trainable_params"] == sum(v.numel() for v in load_file(run / "adapter.safetensors").values())
    for name in ["config.yaml", "adapter.json", "adapter.safetensors", "tokenizer", "base"]:
        assert (run / name).exists(), name
    assert result["run_dir"] == str(run)


def test_finished_run_is_not_overwritten(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=1")
    before = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a finished run; pass trainer.overwrite=true"):
        run_tiny(tmp_path, "trainer.max_steps=1", "trainer.seed=5")
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == before
    run_tiny(tmp_path, "trainer.max_steps=1", "trainer.seed=5", "trainer.overwrite=true")
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() != before


def test_batch_8_equals_8_micro_batches_of_1_end_to_end(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=3", "trainer.batch_size=8", "trainer.grad_accum=1", name="a")
    run_tiny(tmp_path, "trainer.max_steps=3", "trainer.batch_size=1", "trainer.grad_accum=8", name="b")
    a, b = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(tmp_path / "b" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_token_level_normalisation_with_unequal_lengths(tiny_model):
    """Variable-length examples: one batch of 8 and 8 micro-batches of 1 give the same loss and
    gradients (a mean of per-micro-batch means would not)."""
    torch.manual_seed(1)
    adapter = adapters.attach(tiny_model, "lora", {"rank": 4, "alpha": 8})
    for layer in adapter.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    examples = []
    for n in [5, 9, 17, 3, 30, 12, 8, 21]:
        ids = torch.randint(0, 256, (n,)).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # some prompt tokens without loss
        examples.append({"input_ids": ids, "labels": labels})

    def grads(micro):
        tiny_model.zero_grad()
        loss, _ = accumulate_gradients(tiny_model, micro, OneProcess())
        return loss, [p.grad.clone() for p in adapter.parameters()]

    loss_a, g_a = grads([collate(examples, 258)])
    loss_b, g_b = grads([collate([e], 258) for e in examples])
    assert abs(loss_a - loss_b) < 1e-5
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    mean_of_means = sum(grads([collate([e], 258)])[0] for e in examples) / len(examples)
    assert abs(mean_of_means - loss_a) > 1e-3  # the test can tell the two normalisations apart


def test_only_adapter_weights_change(tmp_path):
    run_tiny(tmp_path, "trainer.max_steps=2", "trainer.lr=1e-2")
    base = load_file(tmp_path / "run" / "base" / "model.safetensors")
    from finetune.run.load import load_run

    model, adapter, _, _ = load_run(tmp_path / "run")
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for k, v in base.items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)
    assert any(layer.lora_B.abs().max() > 0 for layer in adapter.layers.values())


def test_full_fine_tuning_trains_everything(tmp_path):
    run_tiny(tmp_path, "method=full", "trainer.max_steps=2", "method.lr=1e-3")
    base = load_file(tmp_path / "run" / "base" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "adapter.safetensors")
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) == len(base)


@pytest.mark.parametrize("method", ["lora", "vblora"])
def test_the_merge_runs_without_the_trained_model_in_memory(tmp_path, monkeypatch, method):
    """The merge reads the saved weights back, so the model that was trained (and its optimizer)
    is let go first: a process that merges at the end needs one model's memory, not two. VB-LoRA's
    layers and hooks refer back to the model, so it is freed only by a collection after the last
    outside reference is gone."""
    models, seen = [], {}
    load_model, merge_run = loop.load_model, loop.merge_run

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def merge_and_check(run_dir, **kwargs):
        seen["alive"] = [ref() is not None for ref in models]
        return merge_run(run_dir, **kwargs)

    monkeypatch.setattr(loop, "load_model", load_and_watch)
    monkeypatch.setattr(loop, "merge_run", merge_and_check)
    result = run_tiny(tmp_path, "trainer.max_steps=2", "trainer.merge=true", f"method={method}")
    assert seen["alive"] == [False]  # one model loaded for training, gone before the merge
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists() and result["merged"]
