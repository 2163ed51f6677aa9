#!/usr/bin/env python
"""Every method on its defaults: `finetune train method=X` with nothing else changed (the embedded
model, the memorize task and its trainer settings), for lora, mora, vblora and full, each in its own
process; plus VB-LoRA at the paper's rank and learning rates (`method.rank=4 method.lr_bank=1e-3
method.lr_logits=1e-2`) for comparison.

Per run: the wall time of the whole command (load, training, evaluation and merge), the peak
resident memory, the task's metrics on all pairs (character accuracy of the recalled values and
exact matches) and the training steps' MFU from run.json.

    python scripts/bench_defaults.py
    python scripts/bench_defaults.py --methods lora vblora

Writes docs/bench/defaults-<device>.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    bench_parser,
    check_ok,
    child_env,
    hardware_info,
    md_heading,
    md_table,
    output_path,
    print_hardware,
    run_measured,
    write_outputs,
)

RUNS = {"lora": ["method=lora"], "mora": ["method=mora"], "vblora": ["method=vblora"], "full": ["method=full"],
        "vblora-paper": ["method=vblora", "method.rank=4", "method.lr_bank=1e-3", "method.lr_logits=1e-2"]}
GOAL = 0.90  # character accuracy


def main() -> None:
    p = bench_parser(__doc__, "defaults")
    p.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    info = hardware_info(args.device)
    print_hardware(info)
    work = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    env = child_env()
    results, rows = {}, []
    for name in args.methods:
        run = work / name
        cmd = [sys.executable, "-m", "finetune", "train", "-q", *RUNS[name], f"trainer.device={args.device}",
               f"output_dir={run}"]
        print(f"{name}: {' '.join(['finetune', 'train', *RUNS[name]])} ...", flush=True)
        r = run_measured(cmd, work / f"{name}.log", env=env, timeout=args.timeout)
        check_ok(r, name)
        summary = json.loads((run / "run.json").read_text())
        metrics = summary["metrics"]
        mfu = (summary.get("mfu") or {}).get("mfu")
        results[name] = {"command": "finetune train " + " ".join(RUNS[name]), "wall_s": r["wall_s"],
                         "peak_rss_mb": r["peak_rss_mb"], "metrics": metrics, "mfu": mfu,
                         "steps": summary.get("steps"), "lr": summary.get("config", {}).get("trainer", {}).get("lr")}
        met = "met" if metrics["char_acc"] >= GOAL else "not met"
        rows.append([results[name]["command"], f"{100 * metrics['char_acc']:.1f}%", f"{100 * metrics['exact_match']:.0f}%",
                     f"{r['wall_s'] / 60:.1f}", f"{r['peak_rss_mb']:,.0f}", f"{100 * mfu:.0f}%" if mfu else "-",
                     f"≥ 90 %: {met}" if name in ("lora", "mora", "vblora", "full") else "(reference)"])
        print(f"  char_acc {metrics['char_acc']:.4f}, exact {metrics['exact_match']:.4f}, {r['wall_s']:.0f} s", flush=True)
    command = "python scripts/bench_defaults.py " + " ".join(sys.argv[1:])
    md = (md_heading(f"Every method on its defaults ({args.device})", info)
          + "Each row is one `finetune train` process with nothing changed but the method: the embedded "
          "SmolLM2-135M-Instruct, the memorize task (32 UUID pairs; 96 steps of batch 8 at trainer.lr 4e-3), "
          "evaluation on all pairs and the merge included in the wall time.\n\n"
          + md_table(["command", "char accuracy", "exact pairs", "wall min", "peak RSS MiB", "MFU", "goal"], rows)
          + "\n")
    write_outputs(output_path(args, "defaults"), {"hardware": info, "command": command, "results": results}, md)


if __name__ == "__main__":
    main()
