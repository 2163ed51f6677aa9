"""``finetune report DIR...``: one row per run found below the directories — method, rank / bank
size, trainable and stored parameters, steps, tokens/s, peak memory, final loss, the task metric —
printed as a table and written as ``report.csv`` (raw numbers) and ``report.md`` (the table and the
plots), with the PNG plots from ``finetune.report.plots``.

Everything comes from the run directories' files; nothing heavy is imported (matplotlib only when
plotting)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from finetune.errors import UserError
from finetune.report.table import markdown_table
from finetune.run.listing import find_runs, read_config, read_info, read_metrics, run_status

# (CSV field, table header, formatter); the order of the columns everywhere.
COLUMNS = [
    ("run", "run", str),
    ("status", "status", str),
    ("method", "method", str),
    ("rank", "rank", str),
    ("bank_size", "bank size", str),
    ("trainable_params", "trainable", lambda v: f"{v:,}"),
    ("stored_params", "stored", lambda v: f"{v:,}"),
    ("steps", "steps", str),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    ("mfu", "MFU", lambda v: f"{100 * v:.1f}%"),
    ("peak_memory_mb", "peak MB", lambda v: f"{v:,.0f}"),
    ("final_loss", "final loss", lambda v: f"{v:.4f}"),
    ("metric", "metric", str),
    ("value", "value", lambda v: f"{v:.4f}"),
    ("wall_time_s", "wall s", lambda v: f"{v:,.1f}"),
]
CSV_EXTRA = ["task", "model", "run_dir"]


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def label_for(run_dir: Path, roots: list[Path]) -> str:
    """The run's path relative to the directory it was found under (its own name if it is one)."""
    for root in roots:
        try:
            rel = run_dir.relative_to(root)
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else run_dir.name
    return run_dir.name


def throughput(records: list[dict]) -> float | None:
    """Training tokens per second: tokens between the first and last logged step over the time
    between them (excludes set-up, evaluation and saving); one record: its own tokens/s."""
    steps = [r for r in records if "tokens" in r and "time" in r]
    if len(steps) >= 2 and steps[-1]["time"] > steps[0]["time"]:
        return (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["time"] - steps[0]["time"])
    rates = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    return sum(rates) / len(rates) if rates else None


def loss_curve(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records
            if isinstance(r.get("loss"), (int, float)) and "step" in r]


def method_sizes(method_cfg: dict) -> tuple[int | None, int | None]:
    """(rank, bank size): VB-LoRA has both, LoRA and MoRA a rank, full fine-tuning neither."""
    if method_cfg.get("name") == "full":
        return None, None
    return method_cfg.get("rank"), method_cfg.get("num_vectors")


def run_row(run_dir: Path, roots: list[Path]) -> dict:
    """Everything the report shows about one run (None where a value is not known)."""
    info = read_info(run_dir)
    cfg = read_config(run_dir)
    records = read_metrics(run_dir)
    method_cfg = cfg.get("method") or {}
    rank, bank = method_sizes(method_cfg)
    params = info.get("params") or {}
    curve = loss_curve(records)
    metric = info.get("metric")
    evals = [r["eval"] for r in records if isinstance(r.get("eval"), dict)]
    metrics = info.get("metrics") or (evals[-1] if evals else {})
    value = metrics.get(metric) if metric else None
    return {"run": label_for(run_dir, roots), "status": run_status(run_dir, info),
            "method": info.get("method") or method_cfg.get("name"), "rank": rank, "bank_size": bank,
            "trainable_params": params.get("trainable_params"), "stored_params": params.get("stored_params"),
            "steps": info.get("steps") or (curve[-1][0] if curve else None),
            "tokens_per_s": throughput(records), "mfu": (info.get("mfu") or {}).get("mfu"),
            "peak_memory_mb": info.get("peak_memory_mb"),
            "final_loss": info.get("final_loss", curve[-1][1] if curve else None),
            "metric": metric, "value": value, "wall_time_s": info.get("wall_time_s"),
            "task": info.get("task") or (cfg.get("task") or {}).get("name"),
            "model": info.get("model") or (cfg.get("model") or {}).get("name"),
            "run_dir": str(run_dir), "loss_curve": curve}


def collect(dirs: list[str | Path]) -> list[dict]:
    roots = [Path(d).expanduser().resolve() for d in dirs]
    runs = find_runs(roots)
    if not runs:
        raise UserError(f"no runs found below {', '.join(str(d) for d in dirs)} (a run directory has run.json)")
    return [run_row(r, roots) for r in runs]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _cell(value, fmt) -> str:
    if value is None or value == "":
        return ""
    try:
        return fmt(value)
    except (TypeError, ValueError):
        return str(value)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (columns in ``COLUMNS`` order)."""
    headers = [header for _, header, _ in COLUMNS]
    cells = [[_cell(row[key], fmt) for key, _, fmt in COLUMNS] for row in rows]
    return headers, cells


def to_csv(rows: list[dict]) -> str:
    fields = [key for key, _, _ in COLUMNS] + CSV_EXTRA
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return buf.getvalue()


def to_markdown(rows: list[dict], plots: list[Path], out: Path) -> str:
    lines = ["# Run report", "", markdown_table(*table(rows)), ""]
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.relative_to(out)})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def default_out(dirs: list[str | Path]) -> Path:
    """One directory: DIR/report; several: ./report."""
    return Path(dirs[0]) / "report" if len(dirs) == 1 else Path("report")


def write_report(dirs: list[str | Path], out: str | Path | None = None, plots: bool = True) -> dict:
    """Collect the runs, write report.csv, report.md and the PNG plots into ``out``.
    Returns {"rows", "out", "files"}."""
    rows = collect(dirs)
    out = Path(out or default_out(dirs)).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plots:
        from finetune.report.plots import draw_all

        images = draw_all(rows, out)
    (out / "report.csv").write_text(to_csv(rows))
    (out / "report.md").write_text(to_markdown(rows, images, out))
    return {"rows": rows, "out": out, "files": [out / "report.csv", out / "report.md", *images]}
