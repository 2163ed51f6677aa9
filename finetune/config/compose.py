"""Composing a config: ``conf/config.yaml`` and its groups (``model``, ``method``, ``task``,
``launcher``; shipped as the package ``finetune.conf``, plus ``--config-dir`` / FINETUNE_CONFIG_DIR)
with the shell's overrides, through Hydra, into a validated, resolved DictConfig. Hydra's errors
become one line naming the key and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from finetune.config.schema import GROUPS, SCHEMA_BY_NAME, register_schemas
from finetune.config.validate import unknown_key_message, validate
from finetune.errors import UserError

CONFIG_MODULE = "finetune.conf"


def _config_dirs(extra: Optional[str]) -> List[str]:
    dirs = []
    for d in [os.environ.get("FINETUNE_CONFIG_DIR"), extra]:
        if d:
            p = Path(d).expanduser().resolve()
            if not p.is_dir():
                raise UserError(f"--config-dir {d}: no such directory")
            dirs.append(f"file://{p}")
    return dirs


def group_options(group: str, config_dir: Optional[str] = None) -> List[str]:
    """The option names available for a config group (shipped YAML plus user config dirs)."""
    from importlib.resources import files

    names = {p.name[:-5] for p in files(CONFIG_MODULE).joinpath(group).iterdir() if p.name.endswith(".yaml")}
    for d in _config_dirs(config_dir):
        g = Path(d[len("file://"):]) / group
        if g.is_dir():
            names |= {p.stem for p in g.glob("*.yaml")}
    return sorted(names)


PATH_KEYS = ("output_dir", "model.path", "model.tokenizer", "task.data.path", "task.eval_path")


def absolute_paths(overrides: List[str]) -> List[str]:
    """Rewrite path-valued overrides that name local files to absolute paths, so a run's config
    and its recorded overrides mean the same thing from any working directory. Hub ids and
    ``pkg:`` names are left alone."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        quote = value[0] if value[:1] in ("'", '"') and len(value) > 1 and value[-1] == value[0] else ""
        raw = value[1:-1] if quote else value
        local = raw.startswith(("./", "../", "~")) or (raw and os.path.exists(raw)) or (
            key.lstrip("+") == "output_dir" and raw not in ("", "null"))
        if sep and key.lstrip("+") in PATH_KEYS and local and (quote or "," not in raw):
            value = f"{quote}{Path(raw).expanduser().resolve()}{quote}"
        out.append(f"{key}{sep}{value}")
    return out


def compose(overrides: List[str] = (), config_dir: Optional[str] = None):
    """Compose ``conf/config.yaml`` with ``overrides``; return a validated, resolved DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_schemas()
    overrides = absolute_paths(list(overrides))
    searchpath = _config_dirs(config_dir)
    if searchpath:
        overrides.append(f"hydra.searchpath=[{','.join(searchpath)}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as e:  # hydra/omegaconf errors -> one line
        raise UserError(explain_hydra_error(e, overrides, config_dir)) from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.resolve(cfg)
    validate(cfg)
    return cfg


def explain_hydra_error(e: Exception, overrides: List[str], config_dir: Optional[str]) -> str:
    """Turn a Hydra/OmegaConf composition error into one actionable line."""
    msg = str(e).strip()
    if e.__cause__ is not None:
        msg += "\n" + str(e.__cause__).strip()
    first = msg.splitlines()[0] if msg else type(e).__name__
    m = re.search(r'in "([^"]+\.ya?ml)", line (\d+)', msg)  # a YAML file that does not parse
    if m:
        return f"{m.group(1)}:{m.group(2)}: not valid YAML ({first}); fix the file or leave it out of --config-dir"
    full = re.search(r"full_key: (\S+)", msg)
    m = re.search(r"Could not (?:find|load) '(\w+)/([^']+)'", msg)
    if m and m.group(1) in GROUPS:
        group, option = m.group(1), m.group(2)
        return (f"{group}={option}: unknown option for group '{group}'; available: "
                f"{', '.join(group_options(group, config_dir))}")
    m = re.search(r"Key '([^']+)' (?:is )?not in (?:struct|'(\w+)')", msg)
    if m:
        return unknown_key_message(full.group(1) if full else m.group(1), SCHEMA_BY_NAME.get(m.group(2)))
    m = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if m:
        return f"{full.group(1) if full else '?'}={m.group(1)}: not allowed; allowed: {m.group(2)}"
    m = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if m:
        return f"{full.group(1) if full else '?'}={m.group(1)!r}: wrong type, expected {m.group(2).lower()}"
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        return (f"{m.group(1)}: a comma list is a sweep; run it with `finetune train -m ...` "
                f"(or write a list value as key=[a,b])")
    if type(e).__name__ == "OverrideParseException" or "mismatched input" in msg:
        return f"cannot parse the overrides {' '.join(overrides)!r}: {first} (syntax: key=value, group=option)"
    return first



def to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)))


def method_settings(cfg) -> dict:
    """The method's keyword arguments for ``attach`` (its config minus ``name``)."""
    settings = to_container(cfg.method)
    settings.pop("name", None)
    return settings


def flatten(node, prefix: str = "") -> dict:
    """Nested plain data as ``{"section.key": value}`` (lists and other leaves kept as they are)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}
