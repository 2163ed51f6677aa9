"""Security rules, checked on the source of finetune/ and on what a run writes: weights only as
safetensors, no pickle loading, trust_remote_code false unless configured, paths never executed."""

import ast
from pathlib import Path

import pytest

from finetune.config.compose import compose, group_options
from finetune.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def calls():
    """(file, line, dotted name of the callee, ast.Call) for every call in finetune/."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", dotted(node.func), node


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 20 and any(name.endswith("save_file") for _, name, _ in calls())


def test_no_pickle_modules():
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
    assert not found


def test_torch_load_only_with_weights_only_and_no_torch_save():
    bad = [where for where, name, call in calls()
           if (name.endswith("torch.load") and not is_true(keyword(call, "weights_only")))
           or name.endswith("torch.save")  # (numpy .npy token caches are read with allow_pickle=False)
           or (name.endswith(("np.load", "numpy.load")) and is_true(keyword(call, "allow_pickle")))]
    assert not bad


def test_weights_are_written_and_read_as_safetensors_only():
    bad = [where for where, name, call in calls()
           if (name.endswith("save_pretrained") and is_false(keyword(call, "safe_serialization")))
           or (name.endswith("from_pretrained") and is_false(keyword(call, "use_safetensors")))]
    assert not bad


def test_no_code_execution_from_strings_or_shells():
    bad = [where for where, name, call in calls()
           if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen", "yaml.load",
                       "yaml.unsafe_load", "runpy.run_path", "runpy.run_module")
           or (name.startswith("subprocess.") and is_true(keyword(call, "shell")))]
    assert not bad


def test_modules_are_imported_only_from_inside_finetune():
    """Config values pick methods and tasks by name; the module imported is always finetune.*."""
    bad = []
    for where, name, call in calls():
        if name.endswith("import_module"):
            arg = call.args[0] if call.args else None
            first = arg.values[0] if isinstance(arg, ast.JoinedStr) and arg.values else arg
            if not (isinstance(first, ast.Constant) and str(first.value).startswith("finetune.")):
                bad.append(where)
    assert not bad


def test_trust_remote_code_is_never_hard_coded_true():
    bad = [where for where, _, call in calls() if is_true(keyword(call, "trust_remote_code"))]
    assert not bad


@pytest.mark.parametrize("model", group_options("model"))
def test_trust_remote_code_defaults_to_false(model):
    assert compose([f"model={model}"]).model.trust_remote_code is False
    assert compose([f"model={model}", "model.trust_remote_code=true"]).model.trust_remote_code is True


def test_a_package_path_names_one_package_and_imports_nothing():
    from finetune.models.paths import resolve_path

    with pytest.raises(UserError, match="pkg: takes the name of one installed top-level Python package"):
        resolve_path("pkg:os.path")
    with pytest.raises(UserError, match="pkg:not_a_real_pkg_123: the Python package"):
        resolve_path("pkg:not_a_real_pkg_123")


def test_a_run_writes_no_pickle_files(tmp_path):
    from finetune.training.loop import train

    from conftest import tiny_config

    run = tmp_path / "run"
    train(tiny_config("task.num_pairs=2", "task.eval_limit=1", "task.max_new_tokens=1", "trainer.max_steps=2",
                      "trainer.batch_size=2", "trainer.save_every=1", f"output_dir={run}"), quiet=True)
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
