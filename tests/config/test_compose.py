"""Config composition and validation: every shipped combination composes; each mistake is one
clear line naming the key."""

import pytest

from finetune.config.compose import compose, group_options
from finetune.config.schema import SCHEMAS
from finetune.errors import UserError


def test_defaults_compose():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m"
    assert cfg.task.name == "memorize"
    assert cfg.method.name in ("lora", "mora")
    assert cfg.output_dir is None


@pytest.mark.parametrize("method", group_options("method"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_method_combination_composes(model, method):
    cfg = compose([f"model={model}", f"method={method}"])
    assert cfg.model.name == model and cfg.method.name == method


@pytest.mark.parametrize("task", group_options("task"))
def test_every_task_composes(task):
    assert compose(["model=tiny", f"task={task}"]).task.name == task


def test_public_key_names_are_overridable(tmp_path):
    cfg = compose(["model=tiny", "method=lora", f"output_dir={tmp_path}", "trainer.max_steps=3",
                   "trainer.lr=1e-3", "trainer.batch_size=2", "trainer.grad_accum=4", "trainer.warmup_steps=1",
                   "trainer.schedule=cosine", "trainer.save_every=2", "trainer.eval_every=2", "trainer.seed=7",
                   "method.rank=16", "method.alpha=32", "method.dropout=0.1", "method.targets=[q_proj,v_proj]",
                   "model.path=some/model", "task.num_pairs=10", "task.max_length=64"])
    assert cfg.trainer.grad_accum == 4 and cfg.trainer.schedule.value == "cosine"
    assert list(cfg.method.targets) == ["q_proj", "v_proj"] and cfg.method.rank == 16
    assert cfg.task.num_pairs == 10 and cfg.model.path == "some/model"


def test_method_configs_bind_to_attach_signatures():
    """Each method config's fields (less `name`) are exactly the keyword arguments of its attach."""
    import inspect
    from dataclasses import fields

    from finetune.adapters import method_module

    for name, schema in SCHEMAS["method"].items():
        module = method_module(name)
        params = set(inspect.signature(module.attach).parameters) - {"model"}
        assert {f.name for f in fields(schema)} - {"name"} == params, name


BAD = [
    (["method=foo"], "method=foo: unknown option for group 'method'; available: "),
    (["model=nope"], "model=nope: unknown option for group 'model'; available: "),
    (["task=bogus"], "task=bogus: unknown option for group 'task'; available: cpt, gsm8k, instruct, memorize, "
                     "pretrain"),
    (["task=gsm8k", "task.data.pth=x"], "unknown config key 'task.data.pth'; did you mean 'path'?"),
    (["task=cpt", "task.on_overflow=cut"], "task.on_overflow=cut: not allowed; allowed: truncate, drop, error"),
    (["task=pretrain", "model=smollm2-135m"], "task=pretrain trains a model from scratch"),
    (["method.rnak=4"], "unknown config key 'method.rnak'; did you mean 'rank'?"),
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr'; did you mean 'lr'?"),
    (["+method.foo=1"], "unknown config key 'method.foo'"),
    (["foo=1"], "unknown config key 'foo'"),
    (["trainer.lr=abc"], "trainer.lr='abc': wrong type, expected float"),
    (["trainer.max_steps=1.5"], "trainer.max_steps='1.5': wrong type, expected integer"),
    (["trainer.schedule=exp"], "trainer.schedule=exp: not allowed; allowed: linear, cosine, constant"),
    (["method.rank=0"], "method.rank=0: must be > 0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be > 0"),
    (["trainer.lr=-1"], "trainer.lr=-1.0: must be > 0"),
    (["method.dropout=1.5"], "method.dropout=1.5: must be in [0, 1)"),
    (["model.quantize=3bit"], "model.quantize=3bit: allowed: 4bit, 8bit"),
    (["trainer.max_steps=[1"], "cannot parse the overrides"),
    (["method=full", "method.rank=3"], "unknown config key 'method.rank'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(UserError) as e:
        compose(["model=tiny", *overrides])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_user_config_dir(tmp_path):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "myrank.yaml").write_text(
        "defaults:\n  - /schema/method/lora@_here_\n  - _self_\nrank: 3\nalpha: 6\n")
    cfg = compose(["model=tiny", "method=myrank"], config_dir=str(tmp_path))
    assert cfg.method.name == "lora" and cfg.method.rank == 3
    assert "myrank" in group_options("method", str(tmp_path))
    with pytest.raises(UserError, match="no such directory"):
        compose([], config_dir=str(tmp_path / "missing"))


def test_config_yaml_ships_inside_the_package():
    """The YAML is package data of finetune.conf, so a wheel install finds it."""
    from importlib.resources import files

    assert files("finetune.conf").joinpath("config.yaml").is_file()
    assert files("finetune.conf").joinpath("model", "tiny.yaml").is_file()


def test_configs_are_found_from_an_installed_wheel(tmp_path):
    """Build the wheel, unpack it elsewhere, and compose from it (not from the source tree)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(root), "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("finetune-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import finetune.config.compose as c, sys\n"
            f"assert c.__file__.startswith({str(site)!r}), c.__file__\n"
            "cfg = c.compose(['model=tiny', 'method=lora'])\n"
            "assert cfg.model.arch.hidden_size == 128 and cfg.method.rank == 8\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
