"""Run directories written by hand, as the training loop leaves them (no training): for the tests of
listing, reporting and resuming."""

import json


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
