"""A signal at any moment of a run (set-up, training, saving, evaluation, merging) ends it with one
line saying what was kept and how to continue, exit code 130, and nothing half-written: through the
real command line, a SIGINT sent in each phase."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.run import checkpoints
from finetune.run.directory import RunDir

TESTS = Path(__file__).parent
REPO = TESTS.parents[1]
ARGS = ["model=tiny", "method=lora", "task.num_pairs=8", "task.eval_limit=1", "task.max_new_tokens=1",
        "trainer.max_steps=4", "trainer.save_every=2", "logger=none"]


def interrupted_in(phase: str, run: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(TESTS / "signal_driver.py"), phase, "train", *ARGS, f"output_dir={run}"],
                          env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert done.returncode == 130, done.stderr[-3000:]
    assert last.startswith("finetune: error: interrupted by SIGINT") and "Traceback" not in done.stderr, last
    return last


@pytest.mark.parametrize("phase,kept", [
    ("set-up", "during set-up, before any training step; nothing new was kept; run the same command again"),
    ("training", "after step 2; checkpoint saved in {run}/checkpoints/step-2; continue with: finetune train"),
    ("saving", "after training all 4 steps; the trained weights are saved in {run}; evaluate them with: "
               "finetune eval {run}; merge them with: finetune merge {run}"),
    ("evaluation", "after training all 4 steps; the trained weights are saved in {run}"),
    ("merging", "while merging; the trained weights and their metrics are saved in {run}; merge with: "
                "finetune merge {run}"),
])
def test_a_signal_in_every_phase_says_what_was_kept(tmp_path, phase, kept):
    run = tmp_path / "run"
    line = interrupted_in(phase, run)
    assert kept.format(run=run) in line
    if phase == "set-up":
        assert not run.exists()  # nothing was trained: the directory it claimed is gone
        return
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["phase"] == phase
    if phase == "training":
        assert checkpoints.damaged_file(run / "checkpoints" / "step-2") is None
        assert not (run / "adapter.safetensors").exists()
        return
    RunDir(run).check_files()  # the weights are complete and match the checksums recorded with them
    assert (run / "adapter.json").is_file() and (run / "tokenizer").is_dir()
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (run / "merged").exists()  # no half-written merge
    if phase == "merging":
        assert info["metric"] == "char_acc" and "char_acc" in info["metrics"]
