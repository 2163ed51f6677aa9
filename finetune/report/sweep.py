"""Sweeps: ``finetune train -m method=lora,mora method.rank=8,16,32 ...`` runs the cartesian product
of the swept values with Hydra's multirun semantics, one run after the other in this process.

* Expansion uses Hydra's own override grammar: comma lists (``a,b``), ``range(start,stop[,step])``,
  ``choice(a,b)`` and ``glob(*)`` over a group's options; a key given twice keeps its last value;
  ``interval()`` (continuous) sweeps need an optimizing sweeper and are refused.
* Every run gets its own run directory under one sweep directory: ``output_dir`` when given (then it
  is the sweep root), else ``multirun/<timestamp>``; runs are named ``<index>_<swept values>``.
* Every combination is composed and validated before the first run starts.
* A failed run is recorded and the sweep goes on (``fail_fast`` stops it); Ctrl-C or SIGTERM
  stops the sweep (the running run saves a checkpoint first).
* Re-running a sweep completes it: a finished run is skipped and an unfinished one continues from
  its newest checkpoint (``trainer.resume=auto``), unless ``trainer.overwrite=true``.
* ``SWEEP_DIR/sweep.json`` records the command and every run's status, updated after each run;
  the end prints a summary table.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

from finetune.config.compose import compose, group_options
from finetune.errors import RunInterrupted, TrainingError, UserError, first_line
from finetune.report.table import text_table
from finetune.run.directory import is_run, read_run, write_atomic

SWEEP_FILE = "sweep.json"
SWEEP_ROOT = "multirun"
GROUPS = ("model", "method", "task")
MAX_NAME = 80


# --------------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------------


class _GroupOptions:
    """The one ConfigLoader method that Hydra's ``glob()`` sweeps call: a group's options."""

    def __init__(self, config_dir: str | None):
        self.config_dir = config_dir

    def get_group_options(self, group_name, results_filter=None, config_name=None, overrides=None):
        if group_name not in GROUPS:
            raise UserError(f"{group_name}=glob(...): glob sweeps work on the groups {', '.join(GROUPS)}")
        return group_options(group_name, self.config_dir)


def parse(overrides: list[str], config_dir: str | None = None) -> list:
    """Hydra ``Override`` objects for the command-line overrides (one-line UserError on bad syntax)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=_GroupOptions(config_dir))
    try:
        return parser.parse_overrides(list(overrides))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot parse the overrides {' '.join(overrides)!r}: {first_line(e)}") from None


def choices(overrides: list[str], config_dir: str | None = None) -> dict[str, list[str]]:
    """Each key (in first-seen order) with its list of ``key=value`` overrides: one entry for a
    plain override, one per value for a sweep. A repeated key keeps its last values."""
    out: dict[str, list[str]] = {}
    for override in parse(overrides, config_dir):
        key = override.get_key_element()
        if not override.is_sweep_override():
            out[key] = [override.input_line]  # as typed
        elif override.is_discrete_sweep():
            values = [f"{key}={v}" for v in override.sweep_iterator(transformer=_as_typed)]
            if not values:
                raise UserError(f"{key}: the sweep has no values")
            out[key] = values
        else:
            raise UserError(f"{key}: interval() sweeps are continuous; use a comma list, range() or choice()")
    return out


def _as_typed(value) -> str:
    """A swept value as override text (booleans lower-case, as users type them)."""
    from hydra.core.override_parser.types import Transformer

    if isinstance(value, bool):
        return "true" if value else "false"
    return Transformer.str(value)


def quoted(path: Path) -> str:
    """A path as a quoted override value (run names contain '=')."""
    # Hydra's quoted strings: backslashes are literal except right before a quote or the end.
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(path))
    return f"'{text}'"


def expand(overrides: list[str], config_dir: str | None = None) -> list[list[str]]:
    """The cartesian product of the sweep: one override list per run, first key outermost."""
    lists = list(choices(overrides, config_dir).values())
    return [list(job) for job in itertools.product(*lists)]


# --------------------------------------------------------------------------------------------
# Directories and names
# --------------------------------------------------------------------------------------------


def _value(job: list[str], key: str) -> str | None:
    for override in job:
        name, _, value = override.partition("=")
        if name == key:
            return value
    return None


def run_name(index: int, job: list[str], keys: list[str]) -> str:
    """``<index>_<swept values>``: group options by value (``lora``), other keys as
    ``leaf=value`` (``rank=8``); unsafe characters become '-'."""
    parts = []
    for key in keys:
        value = _value(job, key) or ""
        bare = key.lstrip("+~")
        parts.append(value if bare in GROUPS else f"{bare.rsplit('.', 1)[-1]}={value}")
    name = "_".join([str(index)] + parts)
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    return name[:MAX_NAME]


def sweep_root(choices_by_key: dict[str, list[str]]) -> Path:
    """``output_dir=DIR`` (not swept) is the sweep directory; otherwise ``multirun/<timestamp>``."""
    given = choices_by_key.get("output_dir")
    if given and len(given) > 1:
        raise UserError("output_dir cannot be swept: it is the sweep directory that holds every run")
    value = parse(given)[0].value() if given else None
    if value not in (None, ""):
        root = Path(str(value)).expanduser().resolve()
        if is_run(root):
            raise UserError(f"output_dir={value} holds a single run; a sweep needs a directory of its own")
        return root
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("a multi-process sweep needs output_dir=DIR (one sweep directory for every process)")
    base = Path(SWEEP_ROOT) / time.strftime("%Y%m%d-%H%M%S")
    root, n = base, 1
    while root.exists():
        n += 1
        root = base.with_name(f"{base.name}-{n}")
    return root.resolve()


# --------------------------------------------------------------------------------------------
# Planning: every run composed and validated before anything trains
# --------------------------------------------------------------------------------------------


def plan(overrides: list[str], config_dir: str | None = None) -> tuple[Path, list[dict]]:
    """The sweep directory and one entry per run: index, overrides, run_dir, composed config."""
    by_key = choices(overrides, config_dir)
    root = sweep_root(by_key)
    by_key.pop("output_dir", None)
    keys = [k for k, v in by_key.items() if len(v) > 1]
    jobs = [list(job) for job in itertools.product(*by_key.values())]
    entries = []
    for index, job in enumerate(jobs):
        run_dir = root / run_name(index, job, keys)
        job = job + [f"output_dir={quoted(run_dir)}"]
        try:
            cfg = compose(job, config_dir)
        except UserError as e:
            raise UserError(f"sweep run {index} ({' '.join(job[:-1])}): {e}") from None
        entries.append({"index": index, "overrides": job, "run_dir": run_dir, "cfg": cfg})
    return root, entries


def already_finished(entry: dict) -> bool:
    run_dir = entry["run_dir"]
    if entry["cfg"].trainer.overwrite or not is_run(run_dir):
        return False
    return read_run(run_dir).get("status") == "finished"


def continue_unfinished(entry: dict) -> bool:
    """A rerun of a sweep continues a run left unfinished (interrupted, failed, died) from its
    newest checkpoint: ``trainer.resume=auto`` unless the user chose resume or overwrite."""
    cfg = entry["cfg"]
    if cfg.trainer.overwrite or cfg.trainer.get("resume") is not None or not is_run(entry["run_dir"]):
        return False
    cfg.trainer.resume = "auto"
    entry["overrides"] = entry["overrides"] + ["trainer.resume=auto"]
    return True


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _record(entry: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in entry.items() if k != "cfg"}


def save(root: Path, overrides: list[str], entries: list[dict], started: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    doc = {"command": "finetune train -m " + " ".join(overrides), "overrides": list(overrides),
           "started": started, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "runs": [_record(e) for e in entries]}
    write_atomic(root / SWEEP_FILE, json.dumps(doc, indent=2, default=str) + "\n")


def _release_memory() -> None:
    """Between runs: free the previous run's tensors and let the next run choose its own
    Accelerate settings (precision, device)."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()



def run_one(entry: dict, config_dir: str | None, quiet: bool) -> None:
    """Train one run of the sweep; record its status, metric and time (or its error) in ``entry``."""
    from finetune.training.loop import train

    start = time.time()
    try:
        result = train(entry["cfg"], entry["overrides"], quiet=quiet, config_dir=config_dir)
    except (KeyboardInterrupt, RunInterrupted) as e:  # Ctrl-C / SIGTERM: the whole sweep stops
        entry.update(status="interrupted", error=first_line(e))
        raise
    except (UserError, TrainingError) as e:
        entry.update(status="failed", error=first_line(e))
    except Exception as e:  # a bug or a crash: show the traceback, keep sweeping
        import traceback

        traceback.print_exc(file=sys.stderr)
        entry.update(status="failed", error=f"{type(e).__name__}: {first_line(e)}")
    else:
        entry.update(status="finished", metric=result["metric"],
                     value=result["metrics"].get(result["metric"]))
    finally:
        entry["wall_time_s"] = round(time.time() - start, 1)
        _release_memory()


def run_sweep(overrides: list[str], config_dir: str | None = None, quiet: bool = False,
              fail_fast: bool = False) -> dict:
    """Plan, then train every run in order. Returns {"sweep_dir", "runs", and the counts
    "finished", "failed", "skipped", "pending"}."""
    root, entries = plan(overrides, config_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for entry in entries:
        entry["status"] = "pending"
    save(root, overrides, entries, started)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"sweep: {len(entries)} run{'s' * (len(entries) != 1)} in {root}")
    try:
        for n, entry in enumerate(entries, 1):
            position = f"[{n}/{len(entries)}]"
            _sweep_step(position, entry, config_dir, quiet, say, lambda: save(root, overrides, entries, started))
            if entry["status"] == "failed" and fail_fast:
                say("stopping the sweep (--fail-fast)")
                break
    except BaseException:  # interrupted (a signal): record where the sweep stopped
        for entry in entries:
            if entry["status"] == "running":
                entry["status"] = "interrupted"
        save(root, overrides, entries, started)
        raise
    save(root, overrides, entries, started)
    summary = {"sweep_dir": str(root), "runs": [_record(e) for e in entries]}
    for status in ("finished", "failed", "skipped", "pending"):
        summary[status] = sum(e["status"] == status for e in entries)
    say("\n" + summary_text(summary))
    return summary


def _sweep_step(position: str, entry: dict, config_dir: str | None, quiet: bool, say, save_progress) -> None:
    """Skip (already finished) or train one entry, saving sweep.json around it; with ``quiet``,
    print the entry as one JSON line."""
    label = " ".join(entry["overrides"][:-1]) or "(defaults)"
    if already_finished(entry):
        entry.update(status="skipped", error="already finished (trainer.overwrite=true reruns it)")
        say(f"{position} {label}: already finished in {entry['run_dir']}, skipped")
    else:
        resuming = continue_unfinished(entry)
        say(f"\n{position} {label} → {entry['run_dir']}{' (continuing it)' if resuming else ''}")
        entry["status"] = "running"
        save_progress()
        run_one(entry, config_dir, quiet)
        save_progress()
        if entry["status"] == "failed" and not quiet:
            print(f"{position} failed: {entry['error']}", file=sys.stderr, flush=True)
    if quiet:
        print(json.dumps(_record(entry)), flush=True)


def summary_text(summary: dict) -> str:
    """The sweep's closing table: one row per run with its status, metric and time."""
    rows = []
    for r in summary["runs"]:
        value = r.get("value")
        metric = f"{r.get('metric')}={value:.4f}" if isinstance(value, (int, float)) else ""
        time_s = f"{r['wall_time_s']:.1f}" if r.get("wall_time_s") is not None else ""
        rows.append([str(r["index"]), Path(r["run_dir"]).name, r["status"], metric, time_s,
                     r.get("error", "") if r["status"] != "finished" else ""])
    counts = ", ".join(f"{summary[s]} {s}" for s in ("finished", "failed", "skipped", "pending") if summary[s])
    table = text_table(["#", "run", "status", "metric", "time_s", "note"], rows)
    return (f"sweep {summary['sweep_dir']}: {counts}\n{table}\n"
            f"compare them: finetune report {summary['sweep_dir']}")
