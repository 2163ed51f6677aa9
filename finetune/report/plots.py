"""The report's PNG plots, drawn with matplotlib's Agg canvas (no display, no pyplot state), each
800×500 pixels with a title, axis labels and a legend:

    loss.png              every run's training loss curve on one chart
    metric_vs_size.png    the task metric against rank (LoRA, MoRA) and bank size (VB-LoRA), one
                          line per method; full fine-tuning as a dashed reference line
    metric_vs_params.png  the task metric against stored parameters (log scale), one series per
                          method, each point labelled with its rank or bank size

Rows are the report's (``finetune.report.report.run_row``). A plot without data is not drawn.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

FIGSIZE = (8, 5)  # inches
DPI = 100  # → 800 × 500 pixels
MARKERS = "osD^v<>ph*"


def _figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays fixed
    return path


def _metric_label(rows: list[dict]) -> str:
    names = {r["metric"] for r in rows if r.get("metric")}
    return names.pop() if len(names) == 1 else "task metric"


def _series_name(row: dict, several_tasks: bool) -> str:
    return f"{row['method']} ({row['task']})" if several_tasks else str(row["method"])


def _scored(rows: list[dict]) -> list[dict]:
    return [r for r in rows if isinstance(r.get("value"), (int, float))]


# --------------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------------


def loss_curves(rows: list[dict], path: Path) -> Path | None:
    curves = [r for r in rows if r.get("loss_curve")]
    if not curves:
        return None
    fig, (ax,) = _figure()
    colors = _colors(len(curves))
    for row, color in zip(curves, colors):
        steps, losses = zip(*row["loss_curve"])
        ax.plot(steps, losses, color=color, linewidth=1.4, label=row["run"],
                marker="o" if len(steps) <= 10 else None, markersize=3)
    ax.set_title(f"Training loss ({len(curves)} run{'s' * (len(curves) != 1)})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small" if len(curves) > 8 else "small", ncol=2 if len(curves) > 12 else 1)
    return _save(fig, path)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Metric vs rank / bank size
# --------------------------------------------------------------------------------------------


def _by_series(rows: list[dict], x_key: str, several_tasks: bool) -> dict[str, dict[float, list[float]]]:
    """{series: {x: [metric values]}} for rows that have ``x_key``."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(x_key) is not None:
            out[_series_name(r, several_tasks)][r[x_key]].append(r["value"])
    return out


def _power_of_two_axis(ax, xs: list[float]) -> None:
    """Log-2 x axis with a tick at each value used, when the values span a factor of 4 or more."""
    xs = sorted(set(xs))
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()


def _draw_size_panel(ax, series: dict, references: dict[str, list[float]], xlabel: str, ylabel: str) -> None:
    xs = []
    for i, (name, points) in enumerate(sorted(series.items())):
        x = sorted(points)
        mean = [sum(points[v]) / len(points[v]) for v in x]
        line, = ax.plot(x, mean, marker=MARKERS[i % len(MARKERS)], linewidth=1.6, label=name)
        if any(len(points[v]) > 1 for v in x):  # repeated settings (e.g. seeds): show every run
            ax.scatter([v for v in x for _ in points[v]], [y for v in x for y in points[v]],
                       color=line.get_color(), alpha=0.35, s=14)
        xs += x
    for name, values in sorted(references.items()):
        ax.axhline(sum(values) / len(values), linestyle="--", color="0.4", linewidth=1.2, zorder=1,
                   label=f"{name} (no rank)")
    _power_of_two_axis(ax, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def metric_vs_size(rows: list[dict], path: Path) -> Path | None:
    scored = _scored(rows)
    several_tasks = len({r.get("task") for r in scored}) > 1
    by_rank = _by_series([r for r in scored if r.get("bank_size") is None], "rank", several_tasks)
    by_bank = _by_series(scored, "bank_size", several_tasks)
    if not by_rank and not by_bank:
        return None
    references: dict[str, list[float]] = defaultdict(list)
    for r in scored:
        if r.get("rank") is None and r.get("bank_size") is None:
            references[_series_name(r, several_tasks)].append(r["value"])
    panels = [(series, axis, name) for series, axis, name in
              ((by_rank, "rank r", "rank"), (by_bank, "bank size h (num_vectors)", "bank size")) if series]
    fig, axes = _figure(len(panels))
    ylabel = _metric_label(scored)
    for ax, (series, xlabel, _) in zip(axes, panels):
        _draw_size_panel(ax, series, references, xlabel, ylabel)
    fig.suptitle(f"{ylabel} vs {' and '.join(name for _, _, name in panels)}, per method")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Metric vs stored parameters
# --------------------------------------------------------------------------------------------


def _point_label(row: dict) -> str:
    if row.get("bank_size") is not None:
        return f"h={row['bank_size']}"
    if row.get("rank") is not None:
        return f"r={row['rank']}"
    return ""


def metric_vs_params(rows: list[dict], path: Path) -> Path | None:
    scored = [r for r in _scored(rows) if isinstance(r.get("stored_params"), (int, float)) and r["stored_params"] > 0]
    if not scored:
        return None
    several_tasks = len({r.get("task") for r in scored}) > 1
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in scored:
        groups[_series_name(r, several_tasks)].append(r)
    fig, (ax,) = _figure()
    for i, (name, members) in enumerate(sorted(groups.items())):
        members = sorted(members, key=lambda r: r["stored_params"])
        ax.plot([r["stored_params"] for r in members], [r["value"] for r in members], linestyle=":",
                marker=MARKERS[i % len(MARKERS)], markersize=7, linewidth=1, label=name)
        for r in members:
            ax.annotate(_point_label(r), (r["stored_params"], r["value"]), textcoords="offset points",
                        xytext=(5, 4), fontsize="x-small")
    ax.set_xscale("log")
    ylabel = _metric_label(scored)
    ax.set_title(f"{ylabel} vs stored parameters")
    ax.set_xlabel("stored parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------


PLOTS = {"loss.png": loss_curves, "metric_vs_size.png": metric_vs_size,
         "metric_vs_params.png": metric_vs_params}


def draw_all(rows: list[dict], out: Path) -> list[Path]:
    """Draw every plot that has data into ``out``; return the files written."""
    written = []
    for name, draw in PLOTS.items():
        path = draw(rows, Path(out) / name)
        if path is not None:
            written.append(path)
    return written
