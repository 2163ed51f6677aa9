"""`finetune report` and `finetune runs` on run directories written by hand (no training): the
runs are found, each status is told right (finished, running, stale, resumable, failed), the table
has one row per run, CSV and Markdown are written, and the plots are real PNG images of the
documented size."""

import csv
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.report.plots import DPI, FIGSIZE
from finetune.report.report import throughput

from rundirs import make_run

PNG_SIZE = (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_throughput_uses_the_time_between_logged_steps():
    records = [{"step": 1, "tokens": 100, "time": 10.0}, {"step": 2, "tokens": 300, "time": 11.0},
               {"step": 3, "tokens": 500, "time": 12.0}, {"step": 3, "eval": {"acc": 1.0}}]
    assert throughput(records) == pytest.approx(200.0)
    assert throughput([{"step": 1, "tokens_per_s": 42.0, "tokens": 1, "time": 1.0}]) == 42.0
    assert throughput([]) is None


def test_report_table_csv_markdown_and_plots(sweep, tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["report", str(sweep), "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = lines[0].split()
    for column in ["run", "method", "rank", "trainable", "stored", "steps", "tokens/s", "metric", "value"]:
        assert column in header, column
    rows = lines[2:2 + 7]
    assert len(rows) == 7 and all(row.split()[1] == "finished" for row in rows)
    assert lines[9] == "" and lines[10].startswith("wrote ")

    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7
    by_run = {row["run"]: row for row in table}
    assert by_run["1_lora_r8"]["rank"] == "8" and by_run["1_lora_r8"]["bank_size"] == ""
    assert by_run["4_vblora_h256"]["bank_size"] == "256" and by_run["5_full"]["rank"] == ""
    assert float(by_run["10_mora_r8"]["value"]) == 0.6 and by_run["10_mora_r8"]["metric"] == "char_acc"
    assert float(by_run["0_lora_r2"]["tokens_per_s"]) == pytest.approx(50.0)
    assert int(by_run["5_full"]["stored_params"]) == 100000

    markdown = (out / "report.md").read_text()
    assert markdown.count("\n| ") == 7 + 1  # header + 7 rows (the alignment row starts with '|-')
    for name in ["loss.png", "metric_vs_size.png", "metric_vs_params.png"]:
        assert f"]({name})" in markdown
        assert png_size(out / name) == PNG_SIZE, name


def test_report_default_out_and_no_plots(sweep):
    r = CliRunner().invoke(app, ["report", str(sweep), "--no-plots", "--quiet"])
    assert r.exit_code == 0 and r.output == ""
    assert (sweep / "report" / "report.csv").is_file() and not list((sweep / "report").glob("*.png"))


def test_report_without_runs_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2
    assert "no runs found below" in r.output


def test_report_with_a_failed_run_keeps_its_row(tmp_path):
    make_run(tmp_path / "a", "lora", 2, value=0.5)
    make_run(tmp_path / "b", "lora", 4, status="failed", error="boom")
    r = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(open(tmp_path / "rep" / "report.csv")))
    assert [row["status"] for row in table] == ["finished", "failed"]
    assert (tmp_path / "rep" / "loss.png").is_file() and (tmp_path / "rep" / "metric_vs_size.png").is_file()


def test_runs_command_lists_status_method_task_metric(sweep, tmp_path):
    make_run(tmp_path / "sweep" / "6_dead", status="running", pid=2**22 + 12345, host=os.uname().nodename)
    r = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:6] == ["run", "status", "method", "task", "step", "metric"]
    body = {line.split()[0].rsplit("/", 1)[-1]: line.split() for line in lines[2:]}
    assert len(body) == 8
    assert body["10_mora_r8"][1:4] == ["finished", "mora", "memorize"] and "char_acc=0.6000" in body["10_mora_r8"]
    assert body["6_dead"][1] == "stale" and "3/3" in body["6_dead"]
    r = CliRunner().invoke(app, ["runs", str(tmp_path), "--json"])
    records = [json.loads(line) for line in r.output.splitlines()]
    assert {rec["status"] for rec in records} == {"finished", "stale"}


def test_report_and_runs_help_import_nothing_heavy():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
            "for c in (['report', '--help'], ['runs', '--help']):\n"
            "    r = CliRunner().invoke(app, c)\n    assert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
