"""Checkpoints and resume: atomic checkpoints, exact continuation (also after a real SIGKILL),
SIGINT/SIGTERM save then stop, a non-finite loss keeps the last good checkpoint, config drift."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import RunInterrupted, TrainingError, UserError
from finetune.run import checkpoints
from finetune.training.loop import train
from finetune.training.resume import plan

from conftest import tiny_config

FAST = ["task.num_pairs=4", "task.eval_limit=1", "task.max_new_tokens=1", "trainer.batch_size=2",
        "trainer.merge=false", "logger=none"]


def config(run_dir, *overrides):
    return tiny_config(*FAST, f"output_dir={run_dir}", *overrides)


def weights(path):
    return load_file(str(path))


def checkpoint_weights(path):
    pieces = checkpoints.Pieces(path, checkpoints.WEIGHTS)
    return {name: pieces.whole(name) for name in pieces.names()}


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def status(run_dir):
    return json.loads((Path(run_dir) / "run.json").read_text())["status"]


# --------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------


def write_fake(root: Path, step: int) -> Path:
    tmp = checkpoints.begin(root, step)
    if tmp is None:
        return checkpoints.step_dir(root, step)
    checkpoints.write_pieces(tmp, checkpoints.WEIGHTS, 0, {"w": (torch.ones(2), 0, (2,))})
    return checkpoints.finish(root, step, tmp, {}, {"state.json": json.dumps({"step": step}), "config.yaml": "a: 1\n"})


def test_checkpoints_are_complete_or_invisible(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_fake(root, step)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-2", "step-4", "step-6"]
    # What a kill leaves behind: a half-written temp dir, a step-N without its marker, a file cut short.
    (root / ".tmp-step-8-999").mkdir()
    (root / ".tmp-step-8-999" / "weights.safetensors").write_bytes(b"partial")
    no_marker = write_fake(root, 10)
    (no_marker / checkpoints.MARKER).unlink()
    truncated = write_fake(root, 12)
    with open(checkpoints.piece_file(truncated, checkpoints.WEIGHTS, 0), "r+b") as f:
        f.truncate(10)
    assert checkpoints.latest(tmp_path).name == "step-6"
    checkpoints.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-12", "step-4", "step-6"]
    write_fake(root, 10)  # an incomplete step-N is replaced by a complete one
    assert checkpoints.latest(tmp_path).name == "step-10"


def test_no_pickle_in_a_checkpoint(tmp_path):
    path = write_fake(tmp_path / "checkpoints", 1)
    assert sorted(p.suffix for p in path.iterdir()) == ["", ".json", ".safetensors", ".yaml"]


# --------------------------------------------------------------------------------------------
# Exact continuation, in process (a checkpoint of run A continued as run B)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [
    ["method=lora", "method.dropout=0.1"],  # dropout: the RNG state matters
    ["method=mora", "method.type=1", "method.remora_every=2", "method.remora_warmup=1", "method.rank=4"],
    ["method=full", "method.lr=1e-4"],
], ids=["lora-dropout", "remora", "full"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method):
    common = [*method, "trainer.max_steps=4", "trainer.save_every=3", "trainer.keep_checkpoints=0",
              "trainer.warmup_steps=2", "trainer.schedule=cosine"]
    train(config(tmp_path / "a", *common), quiet=True)
    # ReMoRA triggers at steps 2 and 4: step-3 holds a merged base and type-2 layers.
    train(config(tmp_path / "b", *common, f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'step-3'}"),
          quiet=True)
    assert_same(checkpoint_weights(tmp_path / "a" / "checkpoints" / "step-4"),
                checkpoint_weights(tmp_path / "b" / "checkpoints" / "step-4"))
    assert_same(weights(tmp_path / "a" / "adapter.safetensors"), weights(tmp_path / "b" / "adapter.safetensors"))
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed_from"].endswith("step-3")


# --------------------------------------------------------------------------------------------
# A real kill, and signals
# --------------------------------------------------------------------------------------------

KILL_RUN = ["trainer.max_steps=10", "trainer.save_every=2", "trainer.batch_size=1", "method.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(config(run, *KILL_RUN), quiet=True)
    return weights(run / "adapter.safetensors")


def start_cli(run_dir, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "finetune", "train", "model=tiny", "method=lora", *FAST, *KILL_RUN,
            f"output_dir={run_dir}", *overrides, "-q"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, run_dir, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoints.latest(run_dir) is not None:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = start_cli(run)
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert status(run) == "running" and not (run / "adapter.safetensors").exists()  # killed mid-run
    killed_at = checkpoints.step_of(checkpoints.latest(run))
    assert 2 <= killed_at < 10
    result = train(config(run, *KILL_RUN, "trainer.resume=auto"), quiet=True)
    assert_same(uninterrupted, weights(run / "adapter.safetensors"))
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 11))  # the log reads as one run: the killed run's extra steps dropped
    assert result["steps"] == 10 and status(run) == "finished"


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = start_cli(run)
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("finetune:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune: error: interrupted by SIGTERM after step ")
    assert "continue with: finetune train model=tiny method=lora" in lines[0]
    assert lines[0].endswith(f"output_dir={run} trainer.resume=auto")
    assert status(run) == "interrupted"
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert checkpoints.step_of(checkpoints.latest(run)) == step
    train(config(run, *KILL_RUN, "trainer.resume=auto"), quiet=True)
    assert_same(uninterrupted, weights(run / "adapter.safetensors"))


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    import finetune.training.loop as loop

    real, calls = loop.accumulate_gradients, []

    def accumulate_and_press_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", accumulate_and_press_ctrl_c)
    with pytest.raises(RunInterrupted, match="interrupted by SIGINT after step 3") as e:
        train(config(tmp_path / "run", "trainer.max_steps=10"), quiet=True)
    assert e.value.exit_code == 130
    assert checkpoints.step_of(checkpoints.latest(tmp_path / "run")) == 3
    assert status(tmp_path / "run") == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import finetune.training.loop as loop

    real, calls = loop.accumulate_gradients, []

    def diverge_at_step_5(*args, **kwargs):
        calls.append(1)
        loss, tokens = real(*args, **kwargs)
        return (float("nan") if len(calls) == 5 else loss), tokens

    monkeypatch.setattr(loop, "accumulate_gradients", diverge_at_step_5)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(config(run, "trainer.max_steps=8", "trainer.save_every=2"), quiet=True)
    message = str(e.value)
    assert message.startswith("loss became nan at step 5; lower trainer.lr")
    assert f"the newest checkpoint ({run / 'checkpoints' / 'step-4'}) stays: continue from it" in message
    assert message.endswith(f"output_dir={run} trainer.resume=auto")
    assert checkpoints.latest(run).name == "step-4" and status(run) == "failed"


# --------------------------------------------------------------------------------------------
# Which run directory, and config drift
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, marked interrupted."""
    run = tmp_path_factory.mktemp("drift") / "run"
    train(config(run, "trainer.max_steps=4", "trainer.save_every=2"), quiet=True)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, status="interrupted")))
    return run


def test_resume_auto_picks_the_newest_checkpoint(interrupted_run):
    start = plan(config(interrupted_run, "trainer.max_steps=4", "trainer.resume=auto"), interrupted_run, 1)
    assert start.mode == "continue" and start.checkpoint.endswith("step-4") and not start.warnings


@pytest.mark.parametrize("overrides,message", [
    (["method.rank=16"], "belongs to another run: method.rank=16 (was 8)"),
    (["trainer.seed=1"], "belongs to another run: trainer.seed=1 (was 42)"),
    (["task.num_pairs=5"], "belongs to another run: task.num_pairs=5 (was 4)"),
    (["trainer.batch_size=4"], "global batch of 2 examples"),
    (["trainer.max_steps=3"], "is at step 4, beyond trainer.max_steps=3"),
    (["trainer.overwrite=true"], "contradict each other"),
])
def test_resume_refuses_another_runs_checkpoint(interrupted_run, overrides, message):
    cfg = config(interrupted_run, "trainer.max_steps=4", "trainer.resume=auto", *overrides)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(cfg, interrupted_run, 1)


def test_resume_warns_loudly_about_changed_hyperparameters(interrupted_run):
    cfg = config(interrupted_run, "trainer.max_steps=8", "trainer.lr=1e-3", "trainer.resume=auto",
                 "trainer.batch_size=1", "trainer.grad_accum=2", "trainer.save_every=5")
    start = plan(cfg, interrupted_run, 1)  # the same global batch (1 × 2) is fine; save_every is free
    assert start.mode == "continue"
    assert len(start.warnings) == 1
    lr = config(interrupted_run).trainer.lr  # the task default the run was trained with
    assert f"trainer.lr=0.001 (was {lr}), trainer.max_steps=8 (was 4)" in start.warnings[0]


def test_a_fresh_run_does_not_take_over_an_unfinished_one(interrupted_run):
    with pytest.raises(UserError, match=r"already holds an unfinished run \(interrupted\); continue it with trainer.resume=auto"):
        plan(config(interrupted_run, "trainer.max_steps=4"), interrupted_run, 1)


def test_resume_auto_without_a_run_starts_fresh(tmp_path):
    assert plan(config(tmp_path / "new", "trainer.resume=auto"), tmp_path / "new", 1).mode == "new"
