"""Damaged run directories and checkpoints are found before anything uses them: a truncated or
altered weights file, an unreadable adapter.json or run.json, a method finetune does not have —
one line naming the file, exit code 2; a damaged checkpoint is skipped (or refused when named)."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.run import checkpoints

RUN = ["model=tiny", "method=lora", "task.num_pairs=4", "task.eval_limit=1", "task.max_new_tokens=1",
       "trainer.batch_size=2", "trainer.merge=false", "logger=none"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(app, ["train", *RUN, "trainer.max_steps=4", "trainer.save_every=2",
                                      "trainer.keep_checkpoints=0", f"output_dir={run}", "-q"])
    assert result.exit_code == 0, result.output
    return run


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    info = json.loads((target / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({**info, "files": info["files"]}))
    return target


def flip_a_byte(path, at=-100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only a checksum tells


def one_line(args):
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "adapter.safetensors").write_bytes((r / "adapter.safetensors").read_bytes()[:100]),
     "adapter.safetensors: does not match the checksum run.json records"),
    (lambda r: flip_a_byte(r / "adapter.safetensors"), "adapter.safetensors: does not match the checksum"),
    (lambda r: (r / "adapter.json").write_text("{not json"), "adapter.json: does not match the checksum"),
    (lambda r: (r / "run.json").write_text('{"status": "fini'), "run.json: not readable JSON"),
    (lambda r: (r / "config.yaml").write_text("model: [unclosed\n"), "config.yaml: not readable YAML"),
])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_damaged_run_is_one_line(finished, tmp_path, damage, message, command):
    run = copy_of(finished, tmp_path)
    damage(run)
    line = one_line([command, str(run)])
    assert line.startswith("finetune: error: ") and message in line, line
    assert not (run / "merged").exists()


def test_runs_without_recorded_checksums_still_name_the_damage(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    info = json.loads((run / "run.json").read_text())
    info.pop("files")  # written before checksums were recorded
    (run / "run.json").write_text(json.dumps(info))
    (run / "adapter.safetensors").write_bytes(b"garbage")
    assert "adapter.safetensors: not a readable safetensors file" in one_line(["merge", str(run)])
    (run / "adapter.json").write_text(json.dumps({"method": "dora", "settings": {}}))
    line = one_line(["merge", str(run)])
    assert "adapter.json: names method 'dora', which finetune does not have" in line


def test_a_damaged_checkpoint_is_skipped_or_refused(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    newest = run / "checkpoints" / "step-4"
    flip_a_byte(checkpoints.piece_file(newest, checkpoints.WEIGHTS, 0))
    assert checkpoints.is_complete(newest) and checkpoints.damaged_file(newest) == "weights.0.safetensors"

    named = one_line(["train", *RUN, "trainer.max_steps=4", f"trainer.resume={newest}", f"output_dir={tmp_path / 'b'}"])
    assert "the checkpoint is damaged: weights.0.safetensors does not match its recorded checksum" in named

    result = CliRunner().invoke(app, ["train", *RUN, "trainer.max_steps=4", "trainer.save_every=2",
                                      "trainer.keep_checkpoints=0", f"output_dir={run}", "trainer.resume=auto", "-q"])
    assert result.exit_code == 0, result.output
    assert f"checkpoint {newest} is damaged (weights.0.safetensors does not match" in result.stderr
    resumed = json.loads((run / "run.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumes"][-1]["step"] == 2  # from the sound one
    flip_a_byte(checkpoints.piece_file(run / "checkpoints" / "step-2", checkpoints.WEIGHTS, 0))
    flip_a_byte(checkpoints.piece_file(run / "checkpoints" / "step-4", checkpoints.WEIGHTS, 0))
    (run / "run.json").write_text(json.dumps({**resumed, "status": "interrupted"}))
    line = one_line(["train", *RUN, "trainer.max_steps=4", f"output_dir={run}", "trainer.resume=auto"])
    assert "every checkpoint is damaged" in line and (run / "checkpoints" / "step-2").is_dir()  # nothing deleted
