"""The run directory (finetune.run.directory): who may claim a directory, and what a run writes."""

import json

import pytest

from finetune.errors import UserError
from finetune.run.directory import RunDir, default_output_dir, is_run, read_config, read_run, write_atomic


def claimed(path, status):
    run = RunDir(path)
    run.create("a: 1\n", ["x=1"], overwrite=False)
    run.update(status=status)
    return run


@pytest.mark.parametrize("setup,overwrite,expect", [
    ("nothing", False, "new"),
    ("empty", False, "new"),
    ("finished", True, "overwrite"),
    ("interrupted", True, "overwrite"),
    ("finished", False, "already holds a finished run; pass trainer.overwrite=true to replace it"),
    ("interrupted", False, "already holds an unfinished run (interrupted); continue it with trainer.resume=auto"),
    ("other", False, "is not empty and not a finetune run; choose another output_dir"),
    ("other", True, "is not empty and not a finetune run"),
    ("file", False, "exists and is not a directory"),
])
def test_claim_rules(tmp_path, setup, overwrite, expect):
    path = tmp_path / "run"
    if setup == "empty":
        path.mkdir()
    elif setup in ("finished", "interrupted"):
        claimed(path, setup)
    elif setup == "other":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    elif setup == "file":
        path.write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    if expect in ("new", "overwrite"):
        assert RunDir(path).claim_mode(overwrite) == expect
    else:
        with pytest.raises(UserError, match=f"output_dir={path}.*" if setup != "file" else "exists"):
            RunDir(path).claim_mode(overwrite)
        with pytest.raises(UserError) as e:
            RunDir(path).create("b: 2\n", [], overwrite)
        assert expect in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # deciding writes nothing


def test_create_writes_config_and_run_json_and_overwrite_clears(tmp_path):
    run = claimed(tmp_path / "run", "finished")
    (run.path / "merged").mkdir()
    (run.path / "merged" / "model.safetensors").write_bytes(b"x")
    run.create("b: 2\n", ["y=2"], overwrite=True, method="lora")
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "run.json"]
    info = read_run(run.path)
    assert info["status"] == "running" and info["overrides"] == ["y=2"] and info["method"] == "lora"
    assert read_config(run.path).b == 2 and run.config().b == 2


def test_log_appends_records_and_tells_observers(tmp_path):
    run = claimed(tmp_path / "run", "running")
    seen = []
    run.observers.append(seen.append)
    run.log({"step": 1, "loss": 2.5})
    run.log({"step": 2, "loss": 2.0})
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2] and [r["step"] for r in seen] == [1, 2]


def test_update_keeps_other_fields(tmp_path):
    run = claimed(tmp_path / "run", "running")
    run.update(steps=3)
    run.update(status="finished")
    info = run.info()
    assert info["steps"] == 3 and info["status"] == "finished" and info["overrides"] == ["x=1"]


def test_not_a_run(tmp_path):
    assert not is_run(tmp_path)
    with pytest.raises(UserError, match="not a finetune run directory \\(no run.json\\)"):
        read_run(tmp_path)
    with pytest.raises(UserError, match="not a finetune run directory \\(no config.yaml\\)"):
        read_config(tmp_path)


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "f.json", "1")
    write_atomic(tmp_path / "f.json", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_text() == "2"


def test_default_output_dir_names_task_and_method():
    path = default_output_dir("gsm8k", "mora")
    assert path.parts[:3] == ("outputs", "gsm8k", "mora") and len(path.name) == len("20260101-000000")
