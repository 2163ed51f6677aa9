"""Sweeps (`finetune train -m`): Hydra's sweep grammar expands to the cartesian product, each run
gets its own directory under one sweep directory, every combination is validated before anything
trains, failures do not stop the sweep (unless --fail-fast), finished runs are skipped on a rerun;
and end to end, a 2×2 sweep on the tiny model feeds `finetune report`, `finetune runs` and
TensorBoard."""

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UserError
from finetune.report.sweep import expand, plan, run_name

TINY = ["model=tiny", "trainer.max_steps=2", "task.num_pairs=4", "trainer.merge=false", "trainer.batch_size=2",
        "task.max_new_tokens=4", "task.eval_limit=2"]


def test_comma_lists_expand_to_the_cartesian_product_first_key_outermost():
    jobs = expand(["method=lora,mora", "method.rank=2,4", "trainer.lr=1e-3"])
    assert jobs == [["method=lora", "method.rank=2", "trainer.lr=1e-3"],
                    ["method=lora", "method.rank=4", "trainer.lr=1e-3"],
                    ["method=mora", "method.rank=2", "trainer.lr=1e-3"],
                    ["method=mora", "method.rank=4", "trainer.lr=1e-3"]]


def test_range_choice_glob_and_repeated_keys():
    assert expand(["method.rank=range(2,9,2)"]) == [[f"method.rank={r}"] for r in (2, 4, 6, 8)]
    assert expand(["trainer.lr=choice(1e-3,1e-4)"]) == [["trainer.lr=0.001"], ["trainer.lr=0.0001"]]
    assert ["method=lora"] in expand(["method=glob(*ora)"]) and ["method=mora"] in expand(["method=glob(*ora)"])
    assert ["method=full"] not in expand(["method=glob(*ora)"])
    assert expand(["trainer.merge=true,false"]) == [["trainer.merge=true"], ["trainer.merge=false"]]
    assert expand(["method.rank=2,4", "method.rank=8"]) == [["method.rank=8"]]  # the last one wins
    assert expand([]) == [[]]


def test_unsupported_or_malformed_sweeps_are_one_line_errors():
    with pytest.raises(UserError, match="interval.. sweeps are continuous"):
        expand(["trainer.lr=interval(0.1,1.0)"])
    with pytest.raises(UserError, match="cannot parse the overrides"):
        expand(["method.rank=2,,4"])


def test_run_names_show_the_swept_values():
    keys = ["method", "method.rank", "trainer.lr"]
    assert run_name(3, ["method=mora", "method.rank=8", "trainer.lr=1e-4"], keys) == "3_mora_rank=8_lr=1e-4"
    assert run_name(0, ["method.targets=[q_proj,v_proj]"], ["method.targets"]) == "0_targets=-q_proj-v_proj-"


def test_plan_validates_every_run_and_places_them_under_the_sweep_directory(tmp_path, monkeypatch):
    root, entries = plan(["model=tiny", "method=lora,mora", "method.rank=2,4", f"output_dir={tmp_path / 's'}"])
    assert root == (tmp_path / "s").resolve()
    assert [e["run_dir"].name for e in entries] == ["0_lora_rank=2", "1_lora_rank=4", "2_mora_rank=2",
                                                     "3_mora_rank=4"]
    assert entries[3]["cfg"].output_dir == str(root / "3_mora_rank=4")
    assert entries[3]["cfg"].method.name == "mora" and entries[3]["cfg"].method.rank == 4
    monkeypatch.chdir(tmp_path)
    root, _ = plan(["model=tiny", "method.rank=2,4"])
    assert root.parent == (tmp_path / "multirun").resolve()
    with pytest.raises(UserError, match=r"sweep run 1 \(model=tiny method.rank=0\): method.rank=0: must be > 0"):
        plan(["model=tiny", "method.rank=2,0"])
    with pytest.raises(UserError, match="output_dir cannot be swept"):
        plan(["model=tiny", "output_dir=a,b"])


def test_a_comma_list_without_multirun_points_to_it():
    r = CliRunner().invoke(app, ["config", "model=tiny", "method.rank=2,4"])
    assert r.exit_code == 2 and "finetune train -m" in r.output


def _fake_train(fail_on):
    """A stand-in for finetune.training.loop.train: fails (TrainingError or a crash) for some ranks."""
    from finetune.errors import TrainingError

    def train(cfg, overrides, quiet=False, config_dir=None):
        Path(cfg.output_dir).mkdir(parents=True)
        if cfg.method.rank == fail_on.get("training"):
            raise TrainingError("loss became nan at step 1")
        if cfg.method.rank == fail_on.get("crash"):
            raise RuntimeError("segfault-ish")
        return {"run_dir": cfg.output_dir, "metric": "char_acc", "metrics": {"char_acc": 0.5}}

    return train


def test_failed_runs_do_not_stop_the_sweep_unless_fail_fast(tmp_path, monkeypatch):
    import finetune.training.loop

    monkeypatch.setattr(finetune.training.loop, "train", _fake_train({"training": 4, "crash": 6}))
    r = CliRunner().invoke(app, ["train", "-m", "model=tiny", "method.rank=2,4,6,8", f"output_dir={tmp_path / 'a'}"])
    assert r.exit_code == 1
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert [run["status"] for run in sweep["runs"]] == ["finished", "failed", "failed", "finished"]
    assert sweep["runs"][1]["error"] == "loss became nan at step 1"
    assert sweep["runs"][2]["error"] == "RuntimeError: segfault-ish"
    assert "2 finished, 2 failed" in r.output

    r = CliRunner().invoke(app, ["train", "-m", "--fail-fast", "model=tiny", "method.rank=2,4,6,8",
                                 f"output_dir={tmp_path / 'b'}"])
    assert r.exit_code == 1
    sweep = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert [run["status"] for run in sweep["runs"]] == ["finished", "failed", "pending", "pending"]


def test_a_signal_stops_the_sweep_and_a_rerun_continues_unfinished_runs(tmp_path, monkeypatch):
    import finetune.training.loop
    from finetune.errors import RunInterrupted

    seen = []

    def train(cfg, overrides, quiet=False, config_dir=None):
        seen.append((cfg.method.rank, cfg.trainer.resume, overrides[-1]))
        run = Path(cfg.output_dir)
        if cfg.method.rank == 4 and cfg.trainer.resume is None:
            run.mkdir(parents=True)
            (run / "run.json").write_text(json.dumps({"status": "interrupted"}))
            raise RunInterrupted("stopped at step 3; checkpoint saved", 15)
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({"status": "finished"}))
        return {"run_dir": str(run), "metric": "char_acc", "metrics": {"char_acc": 0.5}}

    monkeypatch.setattr(finetune.training.loop, "train", train)
    args = ["train", "-m", "model=tiny", "method.rank=2,4,8", f"output_dir={tmp_path / 's'}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 128 + 15
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [run["status"] for run in sweep["runs"]] == ["finished", "interrupted", "pending"]

    seen.clear()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen == [(4, "auto", "trainer.resume=auto"), (8, None, f"output_dir='{tmp_path / 's' / '2_rank=8'}'")]
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [run["status"] for run in sweep["runs"]] == ["skipped", "finished", "finished"]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, busy CPU this runs the tiny model many times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_2x2_sweep_then_report_runs_and_tensorboard(tmp_path, one_thread):
    """The issue's acceptance test, on the tiny model."""
    root = tmp_path / "sweep"
    args = ["train", "-m", "-q", *TINY, "method=lora,mora", "method.rank=2,4", f"output_dir={root}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines] == ["finished"] * 4
    runs = sorted(p for p in root.iterdir() if (p / "run.json").is_file())
    assert [p.name for p in runs] == ["0_lora_rank=2", "1_lora_rank=4", "2_mora_rank=2", "3_mora_rank=4"]
    for run in runs:
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "finished" and info["tokens_seen"] > 0 and info["wall_time_s"] > 0
        env = info["environment"]
        assert {"torch", "transformers", "cpu", "cpu_cores", "memory_gb"} <= set(env)
        assert info["peak_memory_mb"] > 0 and info["pid"] and info["host"]

    # TensorBoard event files with the loss scalar, through Accelerate's tracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[0] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "eval/char_acc" in events.Tags()["scalars"]

    # the report: 4 rows, CSV, Markdown, PNGs of the documented size
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sum(line.split()[1:2] == ["finished"] for line in r.output.splitlines()) == 4
    table = list(csv.DictReader(open(out / "report.csv")))
    assert [(row["method"], row["rank"]) for row in table] == [("lora", "2"), ("lora", "4"), ("mora", "2"),
                                                                ("mora", "4")]
    assert all(float(row["tokens_per_s"]) > 0 and int(row["stored_params"]) > 0 for row in table)
    from matplotlib.image import imread

    from finetune.report.plots import DPI, FIGSIZE

    for name in ["loss.png", "metric_vs_size.png", "metric_vs_params.png"]:
        height, width = imread(out / name).shape[:2]
        assert (width, height) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI), name

    # finetune runs lists them
    r = CliRunner().invoke(app, ["runs", str(root)])
    assert r.exit_code == 0, r.output
    assert sum(" finished " in line for line in r.output.splitlines()) == 4

    # a rerun of the same sweep skips the finished runs (no training)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["status"] for line in r.output.splitlines() if line.startswith("{")] == ["skipped"] * 4
