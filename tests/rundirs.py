"""Run directories written by hand, as the training loop leaves them (no training): for the tests of
listing, reporting and resuming."""

import json

import pytest


def make_run(path, method="lora", rank=8, num_vectors=None, status="finished", value=0.5, steps=3,
             stored=1000, **info):
    """A run directory as train.py leaves it: config.yaml, run.json, metrics.jsonl."""
    path.mkdir(parents=True)
    method_cfg = {"name": method} if method == "full" else {"name": method, "rank": rank}
    if num_vectors is not None:
        method_cfg["num_vectors"] = num_vectors
    import yaml

    (path / "config.yaml").write_text(yaml.safe_dump({"method": method_cfg, "task": {"name": "memorize"},
                                                      "trainer": {"max_steps": steps}}))
    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 100.0, "tokens": 50 * s,
                "time": 1000.0 + s} for s in range(1, steps + 1)]
    run = {"status": status, "method": method, "task": "memorize", "model": "tiny",
           "created": "2026-01-01T00:00:00", **info}
    if status == "finished":
        records.append({"step": steps, "eval": {"char_acc": value}})
        run.update(steps=steps, final_loss=records[steps - 1]["loss"], metric="char_acc",
                   metrics={"char_acc": value}, peak_memory_mb=400.0, wall_time_s=12.5,
                   params={"trainable_params": stored, "stored_params": stored})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "run.json").write_text(json.dumps(run))
    return path


def make_checkpoint(run_dir, step):
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    (ckpt / "COMPLETE").write_text(json.dumps({"step": step, "files": {"state.json": (ckpt / "state.json").stat().st_size}}))


@pytest.fixture
def sweep(tmp_path):
    """Six finished runs: LoRA and MoRA at ranks 2 and 8, VB-LoRA at two bank sizes, and full."""
    root = tmp_path / "sweep"
    make_run(root / "0_lora_r2", "lora", 2, value=0.2, stored=2000)
    make_run(root / "1_lora_r8", "lora", 8, value=0.4, stored=8000)
    make_run(root / "2_mora_r2", "mora", 2, value=0.3, stored=2000)
    make_run(root / "10_mora_r8", "mora", 8, value=0.6, stored=8000)
    make_run(root / "3_vblora_h64", "vblora", 4, num_vectors=64, value=0.25, stored=900)
    make_run(root / "4_vblora_h256", "vblora", 4, num_vectors=256, value=0.35, stored=1500)
    make_run(root / "5_full", "full", value=0.9, stored=100000)
    return root
