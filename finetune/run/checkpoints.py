"""A run's checkpoint folder: where checkpoints live, which of them are complete, writing one
atomically and pruning old ones. What goes into a checkpoint is the training loop's business
(finetune.training.checkpoint); this module only knows the files.

    RUN_DIR/checkpoints/step-N/
      weights.R.safetensors   the method's training tensors (adapter tensors; all weights for
                              method=full; plus the merged base weights for ReMoRA), as pieces
      adapter.json            method and settings (MoRA: each layer's current type)
      optimizer.R.safetensors optimizer state tensors, keyed by parameter name, as pieces
      rng.safetensors         torch (and CUDA) RNG states of every rank
      state.json              step, tokens seen, optimizer hyper-parameters, LR scheduler state
                              (including ReMoRA restarts), Python/NumPy RNG states per rank
      config.yaml             the resolved config the run was trained with
      COMPLETE                written last: the files above with their sizes and SHA-256

**Pieces.** Rank R writes ``weights.R.safetensors`` and ``optimizer.R.safetensors`` with the part of
each tensor it holds: a contiguous range of the tensor's elements in row-major order, stored flat,
the file's metadata giving every piece's start and the tensor's whole shape. One process or data
parallel: rank 0 writes every tensor whole. FSDP2: every rank its rows of each sharded tensor.
ZeRO-3: every rank its partition of each flattened tensor. Nothing is gathered to save, whatever
the model's size, and any rank of any later run reads exactly the range it needs
(:class:`Pieces`), so a checkpoint resumes with another process count or another launcher.

A checkpoint is written into ``checkpoints/.tmp-step-N-<pid>`` (every rank into the same one, on
storage all ranks share) and renamed to ``step-N`` by the main process once every file and then the
marker are on disk, so a kill at any moment leaves either no ``step-N`` or a complete one; a
``step-N`` whose marker or files do not match is never used: listing checks the sizes, resuming the
checksums (:func:`damaged_file`). No pickle anywhere: tensors are safetensors, everything else JSON
or YAML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

DIR = "checkpoints"
MARKER = "COMPLETE"
WEIGHTS = "weights"  # stem of the piece files weights.R.safetensors
META = "adapter.json"
OPTIMIZER = "optimizer"  # stem of optimizer.R.safetensors
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


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listed(path: Path) -> dict[str, tuple[int, str | None]]:
    """The marker's files: {name: (size, sha256 or None for markers written before checksums)}."""
    files = json.loads((Path(path) / MARKER).read_text())["files"]
    return {name: (entry, None) if isinstance(entry, int) else (int(entry["size"]), entry.get("sha256"))
            for name, entry in files.items()}


def is_complete(path: Path) -> bool:
    """A ``step-N`` directory whose marker lists files that all exist with the listed sizes (cheap:
    what listing runs needs; :func:`damaged_file` reads the bytes)."""
    path = Path(path)
    if step_number(path) is None or not (path / MARKER).is_file():
        return False
    try:
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, (size, _) in _listed(path).items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def damaged_file(path: Path) -> str | None:
    """None when checkpoint ``path`` is complete and every file has the checksum its marker
    records; else the name of the first file that does not (``COMPLETE``: no valid marker)."""
    path = Path(path)
    if not is_complete(path):
        return MARKER
    for name, (_, sha) in sorted(_listed(path).items()):
        if sha is not None and file_digest(path / name) != sha:
            return name
    return None


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


def begin(root: Path, step: int) -> Path | None:
    """Main process: an empty temporary directory for checkpoint ``step`` (None when a sound
    ``step-N`` exists already: it holds the same state; a damaged one is replaced)."""
    if is_complete(step_dir(root, step)) and damaged_file(step_dir(root, step)) is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish(root: Path, step: int, tmp: Path, tensors: dict[str, dict], texts: dict[str, str],
           digests: dict[str, str] | None = None) -> Path:
    """Main process, once every rank's pieces are in ``tmp``: write ``tensors`` (file name → its
    tensors) and ``texts`` (file name → text), then the marker with every file's size and SHA-256
    (``digests``: those the ranks computed of the files they wrote), and rename ``tmp`` to ``step-N``."""
    from safetensors.torch import save_file

    for name, content in tensors.items():
        save_file(content, str(tmp / name), metadata={"format": "pt"})
    for name, text in texts.items():
        (tmp / name).write_text(text)
    digests = dict(digests or {})
    files = {}
    for path in sorted(tmp.iterdir()):
        _fsync(path)
        files[path.name] = {"size": path.stat().st_size,
                            "sha256": digests.get(path.name) or file_digest(path)}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}) + "\n")
    _fsync(tmp / MARKER)
    final = step_dir(root, step)
    if final.exists():  # an incomplete leftover of an earlier attempt
        _remove(final)
    os.replace(tmp, final)
    _fsync(root)
    return final


def write(root: Path, step: int, tensors: dict[str, dict], texts: dict[str, str]) -> Path:
    """Write checkpoint ``step`` from one process (``begin`` and ``finish``); returns its path."""
    tmp = begin(root, step)
    return step_dir(root, step) if tmp is None else finish(root, step, tmp, tensors, texts)


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Pieces of tensors
# --------------------------------------------------------------------------------------------


def piece_file(directory: Path, stem: str, rank: int) -> Path:
    return Path(directory) / f"{stem}.{rank}.safetensors"


def write_pieces(directory: Path, stem: str, rank: int, pieces: dict) -> Path | None:
    """Write this rank's pieces: ``{name: (flat tensor, start, whole shape)}`` (None when empty)."""
    from safetensors.torch import save_file

    if not pieces:
        return None
    index = {name: {"start": int(start), "shape": [int(s) for s in shape]} for name, (_, start, shape) in pieces.items()}
    tensors, storages = {}, set()
    for name, (flat, _, _) in pieces.items():
        flat = flat.detach().reshape(-1).contiguous().cpu()
        if flat.untyped_storage().data_ptr() in storages:  # safetensors stores no shared memory
            flat = flat.clone()
        storages.add(flat.untyped_storage().data_ptr())
        tensors[name] = flat
    path = piece_file(directory, stem, rank)
    save_file(tensors, str(path), metadata={"format": "pt", "pieces": json.dumps(index)})
    return path


class Pieces:
    """The tensors of a checkpoint's ``stem.*.safetensors`` files, read whole or by element range.
    A file without a piece index (the format before pieces) holds whole tensors."""

    def __init__(self, directory: Path, stem: str):
        from safetensors import safe_open

        self.files = sorted(Path(directory).glob(f"{stem}.*safetensors"))  # R.safetensors, or the whole file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.where: dict[str, list[tuple[int, int, Path]]] = {}  # name → [(start, length, file)]
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                index = json.loads(meta["pieces"]) if "pieces" in meta else None
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    numel = 1
                    for s in shape:
                        numel *= s
                    start, whole = (index[name]["start"], tuple(index[name]["shape"])) if index else (0, tuple(shape))
                    self.shapes[name] = whole
                    self.where.setdefault(name, []).append((start, numel, path))

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def range(self, name: str, start: int, length: int):
        """Elements ``[start, start + length)`` of tensor ``name`` (row-major), as a flat tensor."""
        import torch
        from safetensors import safe_open

        if name not in self.where:
            raise KeyError(name)
        parts, end, pos = [], start + length, start
        for piece_start, numel, path in sorted(self.where[name]):
            lo, hi = max(pos, piece_start), min(end, piece_start + numel)
            if lo >= hi or lo != pos:
                continue
            with safe_open(str(path), framework="pt") as f:
                flat = f.get_slice(name)
                data = flat[lo - piece_start:hi - piece_start] if len(flat.get_shape()) == 1 else \
                    f.get_tensor(name).reshape(-1)[lo - piece_start:hi - piece_start]
            parts.append(data)
            pos = hi
        if pos != end:
            raise ValueError(f"checkpoint pieces of {name} do not cover elements [{start}, {end})")
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def whole(self, name: str):
        """Tensor ``name`` in its whole shape."""
        return self.range(name, 0, self.numel(name)).reshape(self.shapes[name])


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
