"""A run's checkpoint folder: where checkpoints live, which of them are complete, writing one
atomically and pruning old ones. What goes into a checkpoint is the training loop's business
(finetune.training.checkpoint); this module only knows the files.

    RUN_DIR/checkpoints/step-N/
      weights.safetensors     the method's training tensors (adapter tensors; all weights for
                              method=full; plus the merged base weights for ReMoRA)
      adapter.json            method and settings (MoRA: each layer's current type)
      optimizer.safetensors   optimizer state tensors, keyed by parameter name
      rng.safetensors         torch (and CUDA) RNG states of every rank
      state.json              step, tokens seen, optimizer hyper-parameters, LR scheduler state
                              (including ReMoRA restarts), Python/NumPy RNG states per rank
      config.yaml             the resolved config the run was trained with
      COMPLETE                written last: the files above with their sizes

A checkpoint is written into ``checkpoints/.tmp-step-N-<pid>`` and renamed to ``step-N`` once the
marker is on disk, so a kill at any moment leaves either no ``step-N`` or a complete one; a
``step-N`` whose marker or files do not match is never used. No pickle anywhere: tensors are
safetensors, everything else JSON or YAML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

DIR = "checkpoints"
MARKER = "COMPLETE"
WEIGHTS = "weights.safetensors"
META = "adapter.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"
CONFIG = "config.yaml"
NAME = re.compile(r"step-(\d+)")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def step_number(path: Path) -> int | None:
    """N for a directory named ``step-N``, else None."""
    m = NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A ``step-N`` directory whose marker lists files that all exist with the listed sizes."""
    path = Path(path)
    if step_number(path) is None or not (path / MARKER).is_file():
        return False
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run_dir) / DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_number)


def latest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(json.loads((Path(path) / STATE).read_text())["step"])


def config_of(path: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(path) / CONFIG)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(root: Path, step: int, tensors: dict[str, dict], texts: dict[str, str]) -> Path:
    """Write checkpoint ``step`` under ``root`` (RUN_DIR/checkpoints) atomically: ``tensors`` maps a
    file name to the tensors it holds (safetensors), ``texts`` a file name to its text. Returns its
    path. An existing complete ``step-N`` is kept as it is (it holds the same state)."""
    from safetensors.torch import save_file

    final = step_dir(root, step)
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, content in tensors.items():
        save_file(content, str(tmp / name), metadata={"format": "pt"})
    for name, text in texts.items():
        (tmp / name).write_text(text)
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    for name in files:
        _fsync(tmp / name)
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}) + "\n")
    _fsync(tmp / MARKER)
    if final.exists():  # an incomplete leftover of an earlier attempt
        _remove(final)
    os.replace(tmp, final)
    _fsync(root)
    return final


def _remove(path: Path) -> None:
    """Hide the directory first (a rename), then delete it: a kill midway leaves no half-deleted
    ``step-N`` behind."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all); drop leftovers of interrupted saves."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-step-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)
    done = complete_checkpoints(root.parent)
    if keep > 0:
        for p in done[:-keep]:
            _remove(p)
