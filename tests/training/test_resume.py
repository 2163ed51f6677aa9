"""Where a run writes and where it starts (finetune.training.resume): every row of the decision
table, config drift, and what an early stop leaves behind — on run directories and checkpoints
written by hand, no training."""

import json
import os
import signal

import pytest
import torch

from finetune.config.compose import to_yaml
from finetune.environment import process_identity
from finetune.errors import RunInterrupted, TrainingError, UserError
from finetune.run import checkpoints
from finetune.run.directory import RunDir
from finetune.training.checkpoint import checkpoint_texts
from finetune.training.resume import Start, abandon, begin, decide_output_dir, find_checkpoint, plan, resume_command

from conftest import tiny_config

BASE = ["trainer.max_steps=10", "trainer.batch_size=2"]


def cfg_for(out, *overrides):
    return tiny_config(*BASE, f"output_dir={out}", *overrides)


def make_run(path, status, steps=(), **overrides):
    """A run directory with ``status`` and complete checkpoints at ``steps`` of the config ``overrides``."""
    cfg = cfg_for(path, *[f"{k}={v}" for k, v in overrides.items()])
    run = RunDir(path)
    run.create(to_yaml(cfg), [], overwrite=False)
    run.update(status=status, pid=2**22 + 7, host="elsewhere-" + str(os.getpid()))
    for step in steps:
        tmp = checkpoints.begin(run.checkpoints, step)
        checkpoints.write_pieces(tmp, checkpoints.WEIGHTS, 0, {"w": (torch.zeros(1), 0, (1,))})
        texts = checkpoint_texts(step, {"method": "lora"}, {"param_groups": []}, [], {},
                                 {"tokens_seen": 0, "num_processes": 1, "global_batch": 2}, to_yaml(cfg))
        checkpoints.finish(run.checkpoints, step, tmp, {}, texts)
    return run.path


def decide(out, *overrides, num_processes=1):
    cfg = cfg_for(out, *overrides)
    return plan(cfg, decide_output_dir(cfg), num_processes)


# --------------------------------------------------------------------------------------------
# The decision table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume,setup,mode,step", [
    (None, "nothing", "new", 0),
    (None, "empty", "new", 0),
    ("auto", "nothing", "new", 0),
    ("auto", "interrupted with checkpoints", "continue", 4),
    ("auto", "interrupted without checkpoint", "overwrite", 0),
])
def test_decisions(tmp_path, resume, setup, mode, step):
    out = tmp_path / "run"
    if setup == "empty":
        out.mkdir()
    elif setup == "interrupted with checkpoints":
        make_run(out, "interrupted", steps=(2, 4))
    elif setup == "interrupted without checkpoint":
        make_run(out, "interrupted")
    start = decide(out, *([f"trainer.resume={resume}"] if resume else []))
    assert (start.mode, start.step, start.run_dir) == (mode, step, str(out))
    if mode == "continue":
        assert start.checkpoint == str(out / "checkpoints" / "step-4")
    if setup == "interrupted without checkpoint":
        assert "has no complete checkpoint; trainer.resume=auto starts it again from step 0" in start.warnings[0]


@pytest.mark.parametrize("resume,status,message", [
    (None, "finished", "already holds a finished run; pass trainer.overwrite=true"),
    (None, "interrupted", "already holds an unfinished run (interrupted); continue it with trainer.resume=auto"),
    ("auto", "finished", "already holds a finished run; nothing to resume"),
])
def test_refusals(tmp_path, resume, status, message):
    out = make_run(tmp_path / "run", status, steps=(2,))
    with pytest.raises(UserError) as e:
        decide(out, *([f"trainer.resume={resume}"] if resume else []))
    assert message in str(e.value)


def test_overwrite_replaces_a_run_and_contradicts_resume(tmp_path):
    out = make_run(tmp_path / "run", "finished")
    assert decide(out, "trainer.overwrite=true").mode == "overwrite"
    with pytest.raises(UserError, match="trainer.resume and trainer.overwrite=true contradict each other"):
        decide(out, "trainer.overwrite=true", "trainer.resume=auto")


def test_resume_from_a_path(tmp_path):
    src = make_run(tmp_path / "src", "interrupted", steps=(2, 4))
    # a run directory and no output_dir: continue that run from its newest checkpoint
    cfg = tiny_config(*BASE, f"trainer.resume={src}")
    start = plan(cfg, decide_output_dir(cfg), 1)
    assert (start.run_dir, start.mode, start.step) == (str(src), "continue", 4)
    # a checkpoint into another output_dir: a new run that starts from it
    start = decide(tmp_path / "new", f"trainer.resume={src / 'checkpoints' / 'step-2'}")
    assert (start.run_dir, start.mode, start.step) == (str(tmp_path / "new"), "new", 2)
    assert start.checkpoint == str(src / "checkpoints" / "step-2")


def test_a_finished_run_is_not_continued_in_place(tmp_path):
    src = make_run(tmp_path / "src", "finished", steps=(2,))
    with pytest.raises(UserError, match="already holds a finished run; to train on from step-2, write a new run"):
        decide(src, f"trainer.resume={src / 'checkpoints' / 'step-2'}")


def test_a_run_being_trained_is_refused(tmp_path):
    out = make_run(tmp_path / "run", "running")
    RunDir(out).update(pid=os.getppid(), host=process_identity()["host"], pid_start=None)  # alive, not us
    with pytest.raises(UserError, match="is being trained right now"):
        decide(out, "trainer.resume=auto")


def test_find_checkpoint_messages(tmp_path):
    src = make_run(tmp_path / "src", "interrupted", steps=(2,))
    assert find_checkpoint(str(src), []) == src / "checkpoints" / "step-2"
    (src / "checkpoints" / "step-6").mkdir()  # a save that was cut short: no marker
    with pytest.raises(UserError, match="an incomplete checkpoint"):
        find_checkpoint(str(src / "checkpoints" / "step-6"), [])
    empty = make_run(tmp_path / "empty", "interrupted")
    with pytest.raises(UserError, match="the run has no complete checkpoint"):
        find_checkpoint(str(empty), [])
    with pytest.raises(UserError, match="not a checkpoint or run directory; allowed: auto"):
        find_checkpoint(str(tmp_path / "nothing"), [])


# --------------------------------------------------------------------------------------------
# Drift between the checkpoint and the config
# --------------------------------------------------------------------------------------------


def test_drift(tmp_path):
    out = make_run(tmp_path / "run", "interrupted", steps=(4,))
    with pytest.raises(UserError, match=r"belongs to another run: method.rank=16 \(was 8\)"):
        decide(out, "trainer.resume=auto", "method.rank=16")
    with pytest.raises(UserError, match="was trained with a global batch of 2 examples"):
        decide(out, "trainer.resume=auto", "trainer.batch_size=4")
    # the same global batch split another way is fine
    assert decide(out, "trainer.resume=auto", "trainer.batch_size=1", "trainer.grad_accum=2").mode == "continue"
    assert decide(out, "trainer.resume=auto", "trainer.batch_size=1", num_processes=2).mode == "continue"
    with pytest.raises(UserError, match="is at step 4, beyond trainer.max_steps=3"):
        decide(out, "trainer.resume=auto", "trainer.max_steps=3")
    start = decide(out, "trainer.resume=auto", "trainer.lr=1e-3")
    assert "with changed settings: trainer.lr=0.001" in start.warnings[0]
    assert decide(out, "trainer.resume=auto", "trainer.save_every=1").warnings == []  # a free key


# --------------------------------------------------------------------------------------------
# Claiming and what an early stop leaves behind
# --------------------------------------------------------------------------------------------


def test_continue_truncates_the_log_to_the_checkpoint(tmp_path):
    out = make_run(tmp_path / "run", "interrupted", steps=(2,))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    cfg = cfg_for(out, "trainer.resume=auto")
    start = plan(cfg, out, 1)
    begin(start, cfg, ["trainer.resume=auto"])
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    info = RunDir(out).info()
    assert info["status"] == "running" and info["resumes"] == [{"checkpoint": start.checkpoint, "step": 2}]


@pytest.mark.parametrize("error,trained,expect", [
    (UserError("bad data"), False, "removed"),
    (UserError("bad data"), True, "failed"),
    (TrainingError("loss became nan"), False, "failed"),
    (RunInterrupted("stopped", signal.SIGTERM), True, "interrupted"),
    (RunInterrupted("stopped during set-up", signal.SIGINT, "set-up"), False, "removed"),
    (KeyboardInterrupt(), False, "removed"),
    (KeyboardInterrupt(), True, "interrupted"),
])
def test_abandon(tmp_path, error, trained, expect):
    out = tmp_path / "run"
    cfg = cfg_for(out)
    start = plan(cfg, out, 1)
    begin(start, cfg, [])
    if trained:
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    abandon(start, error)
    if expect == "removed":
        assert not out.exists()  # a corrected rerun just works
    else:
        info = RunDir(out).info()
        assert info["status"] == expect
        if expect == "failed":
            assert info["error"] == str(error)


def test_resume_command_continues_the_same_run():
    command = resume_command(["method=lora", "output_dir=/x", "trainer.overwrite=true"], "/runs/a b")
    assert command == "finetune train method=lora 'output_dir=/runs/a b' trainer.resume=auto"
    assert isinstance(Start("/x", "new").run, RunDir)
