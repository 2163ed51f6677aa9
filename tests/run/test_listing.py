"""Finding runs and telling their state from files alone (finetune.run.listing), on run directories
written by hand."""

import json
import os

import pytest

from finetune.environment import process_identity
from finetune.errors import UserError
from finetune.run.listing import describe, find_runs, last_logged_step, read_config, run_status, runs_table

from rundirs import make_checkpoint, make_run


def test_runs_are_found_in_natural_order_and_not_inside_runs(sweep, tmp_path):
    (sweep / "0_lora_r2" / "merged").mkdir()
    (sweep / "0_lora_r2" / "merged" / "run.json").write_text("{}")  # never looked at
    hidden = make_run(tmp_path / "sweep" / ".trash" / "x")
    runs = find_runs([tmp_path])
    names = [p.name for p in runs]
    assert names == ["0_lora_r2", "1_lora_r8", "2_mora_r2", "3_vblora_h64", "4_vblora_h256", "5_full",
                     "10_mora_r8"]
    assert hidden not in runs
    assert find_runs([sweep / "1_lora_r8"]) == [(sweep / "1_lora_r8").resolve()]
    with pytest.raises(UserError, match="no such directory"):
        find_runs([tmp_path / "nope"])


def test_status_running_stale_resumable_failed(tmp_path):
    live = make_run(tmp_path / "live", status="running", **process_identity())
    assert run_status(live, json.loads((live / "run.json").read_text())) == "running"
    dead = make_run(tmp_path / "dead", status="running", pid=2**22 + 12345, host=os.uname().nodename)
    assert run_status(dead, json.loads((dead / "run.json").read_text())) == "stale"
    reused = make_run(tmp_path / "reused", status="running", **{**process_identity(), "pid_start": "1"})
    assert run_status(reused, json.loads((reused / "run.json").read_text())) == "stale"
    elsewhere = make_run(tmp_path / "elsewhere", status="running", pid=1, host="another-host")
    assert run_status(elsewhere, json.loads((elsewhere / "run.json").read_text())) == "running"
    make_checkpoint(dead, 2)
    assert run_status(dead, json.loads((dead / "run.json").read_text())) == "resumable"
    failed = make_run(tmp_path / "failed", status="failed", error="loss became nan")
    assert run_status(failed, json.loads((failed / "run.json").read_text())) == "failed"
    (tmp_path / "failed" / "checkpoints" / "step-1").mkdir(parents=True)  # no marker: incomplete
    assert run_status(failed, json.loads((failed / "run.json").read_text())) == "failed"
    record = describe(dead)
    assert record["last_checkpoint"] == 2 and record["step"] == 3 and record["max_steps"] == 3


def test_the_last_logged_step_ignores_a_half_written_line(tmp_path):
    run = make_run(tmp_path / "r", status="running", steps=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the live run is writing
    assert last_logged_step(run) == 4
    assert last_logged_step(tmp_path / "nothing") is None


def test_a_damaged_run_is_listed_not_fatal(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "config.yaml").write_text("method: [unclosed\n")
    (run / "run.json").write_text('{"status": "fini')
    assert read_config(run) == {}
    record = describe(run)
    assert record["status"] == "unreadable" and record["method"] is None
    headers, rows = runs_table([record])
    assert rows[0][1] == "unreadable"
