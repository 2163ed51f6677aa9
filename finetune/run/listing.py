"""Finding run directories below some folders and telling what state each one is in, from files
alone (run.json, config.yaml, metrics.jsonl, checkpoints/): ``finetune runs`` lists them, ``finetune
report`` compares them. Nothing heavy is imported.

Status of a run:

    finished     run.json says so
    running      run.json says running and its process is alive (or lives on another host)
    resumable    not finished, not running, and it has a complete checkpoint to resume from
    stale        run.json says running but its process is gone, and there is no checkpoint
    failed, interrupted   as recorded, with no checkpoint
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from finetune.environment import process_alive
from finetune.errors import UserError
from finetune.run import directory
from finetune.run.checkpoints import complete_checkpoints, step_number
from finetune.run.directory import METRICS_FILE, RUN_FILE

# Folders never searched (besides hidden ones such as .venv and .git, and the inside of a run).
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


def natural_key(path: Path) -> list:
    """Sort key that orders ``2_x`` before ``10_x``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(roots: list[str | Path]) -> list[Path]:
    """Every run directory (one with run.json) at or below ``roots``, in natural order. Run
    directories are not searched further; hidden folders are skipped."""
    found = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"{root}: no such directory")
        if (root / RUN_FILE).is_file():
            found.add(root.resolve())
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if RUN_FILE in filenames:
                found.add(Path(dirpath).resolve())
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
    return sorted(found, key=natural_key)


# --------------------------------------------------------------------------------------------
# Reading a run's files
# --------------------------------------------------------------------------------------------


def read_info(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {"status": "unreadable"}


def read_config(run_dir: Path) -> dict:
    """The resolved config.yaml as plain data ({} when missing or unreadable)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(directory.read_config(run_dir)) or {}
    except Exception:  # listing never fails on one damaged run  # noqa: BLE001
        return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records; a half-written last line (a live run) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def last_logged_step(run_dir: Path) -> int | None:
    """The step of the last training record, reading only the end of metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return int(record["step"])
    return None


# --------------------------------------------------------------------------------------------
# Checkpoints and status
# --------------------------------------------------------------------------------------------


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the run's complete checkpoints (``checkpoints/step-N`` with a valid marker)."""
    return [step_number(p) for p in complete_checkpoints(run_dir)]


def run_status(run_dir: Path, info: dict) -> str:
    """finished | running | resumable | stale | failed | interrupted (see the module docstring)."""
    recorded = info.get("status", "unknown")
    if recorded == "finished":
        return "finished"
    if recorded == "running" and process_alive(info) is not False:
        return "running"
    if checkpoint_steps(run_dir):
        return "resumable"
    return "stale" if recorded == "running" else recorded


# --------------------------------------------------------------------------------------------
# One line per run (finetune runs)
# --------------------------------------------------------------------------------------------


def display_path(path: Path) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(run_dir: Path) -> dict:
    """A run's listing: path, status, method, task, model, progress and metric."""
    info = read_info(run_dir)
    cfg = read_config(run_dir)
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    status = run_status(run_dir, info)
    step = info.get("steps") if status == "finished" else last_logged_step(run_dir)
    metric = info.get("metric")
    value = (info.get("metrics") or {}).get(metric) if metric else None
    checkpoints = checkpoint_steps(run_dir)
    return {"run": display_path(run_dir), "status": status, "method": info.get("method") or
            (cfg.get("method") or {}).get("name"), "task": info.get("task") or (cfg.get("task") or {}).get("name"),
            "model": info.get("model"), "step": step, "max_steps": max_steps, "metric": metric, "value": value,
            "last_checkpoint": checkpoints[-1] if checkpoints else None, "created": info.get("created"),
            "error": info.get("error")}


def runs_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["run", "status", "method", "task", "step", "metric", "created"]
    rows = []
    for r in records:
        step = "" if r["step"] is None else str(r["step"])
        if r["max_steps"] and r["status"] != "finished":
            step = f"{step or 0}/{r['max_steps']}"
        metric = f"{r['metric']}={r['value']:.4f}" if isinstance(r["value"], (int, float)) else ""
        rows.append([r["run"], r["status"], r["method"] or "", r["task"] or "", step, metric,
                     (r["created"] or "").replace("T", " ")])
    return headers, rows
