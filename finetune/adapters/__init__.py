"""Method registry and the own adapter file format.

``attach(model, method_cfg)`` dispatches to ``finetune.adapters.<method>.attach``, whose keyword
arguments are exactly the fields of that method's config (``finetune.config.schema``). An adapter is saved
as ``adapter.safetensors`` (tensors) plus ``adapter.json`` (method, settings, base model).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from finetune.errors import UserError, first_line

METHODS = ("full", "lora", "mora", "vblora")
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


def method_module(method: str):
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    try:
        return importlib.import_module(f"finetune.adapters.{method}")
    except ModuleNotFoundError as e:
        if e.name == f"finetune.adapters.{method}":
            raise UserError(f"method {method!r} is not available in this version") from None
        raise


def attach(model, method: str, settings: dict):
    """Attach ``method`` to ``model`` with ``settings`` (the method config minus its name)."""
    return method_module(method).attach(model, **settings)


def save_adapter(adapter, directory: str | Path, meta: dict | None = None, state: dict | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``directory``; ``state``: the tensors
    to write (default ``adapter.state_dict()``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter.state_dict() if state is None else state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    info = {"method": adapter.method, "settings": adapter.settings, **(meta or {})}
    # Each file appears whole (written aside, then renamed): an interruption leaves the old or the new.
    tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "method": adapter.method})
    os.replace(tmp, directory / WEIGHTS_FILE)
    tmp = directory / f".{META_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, directory / META_FILE)
    return directory


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {META_FILE} here; expected a finetune run or adapter directory")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); the adapter description is damaged") from None
    if not isinstance(meta, dict) or meta.get("method") not in METHODS or not isinstance(meta.get("settings"), dict):
        method = meta.get("method") if isinstance(meta, dict) else None
        raise UserError(f"{path}: names method {method!r}, which finetune does not have (allowed: {', '.join(METHODS)}), "
                        "or has no settings; the adapter description is damaged")
    return meta


def load_adapter(model, directory: str | Path):
    """Attach the adapter saved in ``directory`` to ``model`` and load its weights."""
    from safetensors.torch import load_file

    meta = read_meta(directory)
    adapter = attach(model, meta["method"], meta["settings"])
    path = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors reports a damaged file with its own error types
        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)}); the adapter is damaged") from None
    adapter.load_state_dict(state)
    return adapter
