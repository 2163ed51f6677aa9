"""finetune.allocator: jemalloc for training processes where one is installed, the C library's
malloc where asked or where none is, and one line for a wrong FINETUNE_ALLOCATOR."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import allocator
from finetune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
INSTALLED = allocator.find_jemalloc() is not None


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FINETUNE_ALLOCATOR")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def test_restart_preloads_jemalloc_where_installed():
    """The real exec: the same command line again, now with jemalloc mapped in, where it is
    installed (CI installs libjemalloc2); the process stays as it is where it is not."""
    code = "from finetune import allocator, environment; allocator.restart_with_jemalloc(); print(environment.allocator_in_use())"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["jemalloc"] if INSTALLED else ["system"])  # printed once: one exec


def test_system_keeps_the_c_librarys_malloc():
    code = "from finetune import allocator, environment; allocator.restart_with_jemalloc(); print(environment.allocator_in_use())"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(FINETUNE_ALLOCATOR="system"),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["system"], done.stderr


def test_a_wrong_value_is_one_line_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "finetune", "train", "model=tiny"], cwd=tmp_path,
                          env=child_env(FINETUNE_ALLOCATOR="tcmalloc"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "finetune: error: FINETUNE_ALLOCATOR='tcmalloc' is not an allocator; use one of auto, jemalloc, system"]
    assert not (tmp_path / "outputs").exists()


def test_asking_for_jemalloc_where_none_is_found(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    with pytest.raises(UserError, match="FINETUNE_ALLOCATOR=jemalloc, but no jemalloc library was found"):
        allocator.preload_for({"FINETUNE_ALLOCATOR": "jemalloc"})
    assert allocator.preload_for({}) is None  # auto: the C library's malloc, silently


def test_a_preload_the_linker_ignored_is_not_tried_again(monkeypatch):
    """LD_PRELOAD naming jemalloc in a process without it: no second exec (no loop)."""
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    assert allocator.preload_for({"LD_PRELOAD": "libjemalloc.so.2"}) is None
    with pytest.raises(UserError, match="was not loaded"):
        allocator.preload_for({"LD_PRELOAD": "libjemalloc.so.2", "FINETUNE_ALLOCATOR": "jemalloc"})
    assert allocator.preload_for({}) == "libjemalloc.so.2"


def test_the_preloading_environment_keeps_what_the_user_set():
    env = allocator.with_jemalloc({"LD_PRELOAD": "libmine.so", "PATH": "/bin"}, "libjemalloc.so.2")
    assert env == {"LD_PRELOAD": "libjemalloc.so.2 libmine.so", "PATH": "/bin",
                   "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    assert allocator.with_jemalloc({"MALLOC_CONF": "narenas:1"}, "libjemalloc.so.2")["MALLOC_CONF"] == "narenas:1"



WATCH = """
import ctypes
from finetune import allocator
allocator.restart_with_jemalloc()
watch = allocator.KeptMemoryWatch.start()
if watch is None:
    print("none")
    raise SystemExit
MIB = 1 << 20
loading = [bytearray(MIB) for _ in range(100)]
for block in loading:  # written, so resident, then freed: what loading leaves behind
    ctypes.memset((ctypes.c_char * MIB).from_buffer(block), 1, MIB)
del loading, block
before = watch.kept()
watch = allocator.KeptMemoryWatch.start()
at_start = before - watch.kept()
steady = [watch.check() for _ in range(allocator.SETTLE_STEPS + 2)]  # nothing grew: nothing handed back
blocks = [bytearray(MIB) for _ in range(200)]
for block in blocks:  # written, so resident
    ctypes.memset((ctypes.c_char * MIB).from_buffer(block), 1, MIB)
del blocks, block  # 200 MiB freed; jemalloc keeps the pages
grown = watch.kept() - watch.baseline
handed = watch.check()
after = watch.kept() - watch.baseline
print(at_start // MIB, any(steady), grown // MIB, handed, after // MIB, watch.handed_back, allocator.KEPT_MARGIN // MIB)
"""


@pytest.mark.parametrize("which", ["auto", "system"])
def test_kept_pages_that_grow_go_back_to_the_system(which):
    """The watch training starts before its steps and runs after each one, in a child with finetune's
    jemalloc settings: what was freed before the steps is handed back at the start; freed pages kept
    beyond the first steps' by more than the margin are handed back, once, and nothing is handed
    back while they do not grow. Without jemalloc there is no watch."""
    done = subprocess.run([sys.executable, "-c", WATCH], env=child_env(FINETUNE_ALLOCATOR=which),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if which == "system" or not INSTALLED:
        assert done.stdout.split() == ["none"]
        return
    at_start, steady, grown, handed, after, count, margin = done.stdout.split()
    assert int(at_start) >= 95  # the 100 MiB freed before the steps
    assert steady == "False" and handed == "True" and count == "1"
    assert int(grown) >= 190  # the freed 200 MiB are kept...
    assert int(after) < int(margin)  # ...until the watch hands them back
