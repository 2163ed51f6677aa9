"""The command line: fast help (no heavy imports), one-line errors with exit code 2, and the
documented end-to-end path train → merge → eval through the real console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

FINETUNE = str(Path(sys.executable).with_name("finetune"))


def run_cli(*args, cwd=None):
    return subprocess.run([FINETUNE, *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("command", [[], ["train"], ["merge"], ["eval"], ["config"], ["export"], ["data"]])
def test_help_imports_nothing_heavy(command):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
            f"r = CliRunner().invoke(app, {command + ['--help']!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'datasets', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_command_prints_the_resolved_config_without_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
            "r = CliRunner().invoke(app, ['config', 'model=tiny', 'method.rank=3'])\n"
            "assert r.exit_code == 0, r.output\nassert 'rank: 3' in r.output\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args,message", [
    (["train", "method=nope"], "method=nope: unknown option for group 'method'; available:"),
    (["config", "trainer.lr=fast"], "trainer.lr='fast': wrong type, expected float"),
    (["merge", "/nonexistent/run"], "not a finetune run directory"),
    # click's own usage errors get the same one-line form
    (["bogus"], "No such command 'bogus'. (see finetune --help)"),
    (["merge"], "Missing argument 'run_dir'. (see finetune merge --help)"),
    (["merge", "/x", "--bogus"], "No such option: --bogus"),
])
def test_user_errors_are_one_line_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("finetune: error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_train_merge_eval_through_the_console_script(tmp_path):
    out = tmp_path / "X"
    r = run_cli("train", "model=tiny", "method=lora", "task=memorize", "trainer.max_steps=5",
                f"output_dir={out}", "task.num_pairs=4", "trainer.merge=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "char_acc = " in r.stdout and str(out) in r.stdout
    r = run_cli("merge", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "merged" / "model.safetensors").is_file()
    r = run_cli("eval", str(out / "merged"), "model=tiny", "task.num_pairs=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged_metrics = json.loads(r.stdout)["metrics"]
    r = run_cli("eval", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"] == merged_metrics  # merged and adapted agree
