"""Every method learns on its defaults: a few steps of `finetune train method=X` with nothing else
changed (the tiny model, the memorize task's trainer settings) lower the loss. The embedded model's
figures (every method ≥ 90 % on the default task) come from scripts/bench_defaults.py."""

import json

import pytest

from finetune.training.loop import train

from conftest import tiny_config


@pytest.mark.parametrize("method", ["lora", "mora", "vblora", "full"])
def test_each_method_learns_on_its_defaults(tmp_path, method):
    extra = ["method.vector_length=32"] if method == "vblora" else []  # 64 does not divide the tiny model's 384
    cfg = tiny_config(f"method={method}", *extra, "trainer.max_steps=30", "task.num_pairs=8", "task.eval_limit=1",
                      "task.max_new_tokens=2", "trainer.merge=false", f"output_dir={tmp_path / 'run'}")
    train(cfg, quiet=True)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # nats
