#!/usr/bin/env python
"""Start-up times: `finetune --help`, `finetune config`, and loading the embedded model again.

Each measurement is a fresh process (so imports count, as they do for a user), repeated --reps
times after one untimed warm-up run (which also creates the dequantized GGUF cache if it is
missing: the *first* load); the median wall time is compared with the goal, and the median CPU
time (user + system, from the kernel) is reported next to it: on a busy machine wall time grows
with the load, CPU time much less.

    finetune --help        goal <= 0.3 s   (no torch / transformers import on the CLI path)
    finetune config        goal <= 0.5 s   (Hydra composition + validation, nothing heavy)
    second model load      goal <= 3 s     (finetune.models.load.load_model + load_tokenizer of the
                                            embedded SmolLM2-135M from its safetensors cache, in
                                            a process that has imported torch already; the import
                                            time and the whole process's wall time are reported too)

    python scripts/bench_startup.py --quick
    python scripts/bench_startup.py --reps 7
    python scripts/bench_startup.py --device cuda

Writes docs/bench/startup-<device>.json and .md (--quick: under /tmp unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    bench_parser,
    check_ok,
    child_env,
    hardware_info,
    hardware_line,
    md_table,
    median,
    output_path,
    print_hardware,
    run_measured,
    write_outputs,
)

GOALS = {"help": 0.3, "config": 0.5, "load": 3.0}


def parse_args(argv=None):
    p = bench_parser(__doc__, "startup")
    p.add_argument("--model", default="smollm2-135m", help="a `model` config option")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 reps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.reps == p.get_default("reps"):
        args.reps = 2
    return args


def worker(spec: dict) -> None:
    """One model load in a fresh process, timed in phases."""
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    t1 = time.perf_counter()
    from finetune.config.compose import compose
    from finetune.models.load import load_model
    from finetune.models.tokenizer import load_tokenizer

    cfg = compose([f"model={spec['model']}"])
    t2 = time.perf_counter()
    model = load_model(cfg.model, spec["device"])
    if spec["device"] == "cuda":
        model.to("cuda")
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    load_tokenizer(cfg.model)
    t4 = time.perf_counter()
    Path(spec["result"]).write_text(json.dumps({
        "import_s": t1 - t0, "compose_s": t2 - t1, "load_model_s": t3 - t2, "load_tokenizer_s": t4 - t3,
        "load_s": t4 - t2, "params": sum(p.numel() for p in model.parameters())}))


def finetune_command() -> list[str]:
    """The installed console script next to this Python (what users run), else python -m finetune."""
    script = Path(sys.executable).parent / "finetune"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("finetune")
    return [found] if found else [sys.executable, "-m", "finetune"]


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    """Wall and CPU time of one process (CPU: user + system from the kernel's rusage of that child)."""
    return run_measured(cmd, log, env=env)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.spec))
        return
    info = hardware_info(args.device)
    print_hardware(info)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = child_env(args.threads)
    cli = finetune_command()
    results = {}

    for name, cmd in (("help", [*cli, "--help"]), ("config", [*cli, "config", f"model={args.model}"])):
        check_ok(timed(cmd, work / f"{name}-warmup.log", env), f"finetune {name}")
        runs = [timed(cmd, work / f"{name}-{i}.log", env) for i in range(args.reps)]
        for r in runs:
            check_ok(r, " ".join(cmd))
        results[name] = {"command": " ".join(["finetune", *cmd[len(cli):]]),
                         "wall_s": median([r["wall_s"] for r in runs]), "cpu_s": median([r["cpu_s"] for r in runs]),
                         "runs_wall_s": [r["wall_s"] for r in runs]}
        print(f"finetune {name}: {results[name]['wall_s']:.3f} s wall, {results[name]['cpu_s']:.3f} s CPU "
              f"(goal <= {GOALS[name]} s)", flush=True)

    loads = []
    for i in range(args.reps + 1):  # the first one may convert the GGUF file (the first load)
        result = work / f"load-{i}.json"
        spec = {"model": args.model, "device": args.device, "result": str(result)}
        r = timed([sys.executable, str(Path(__file__).resolve()), "--worker", "--spec", json.dumps(spec)],
                  work / f"load-{i}.log", env)
        check_ok(r, "model load")
        loads.append({**json.loads(result.read_text()), "process_wall_s": r["wall_s"], "process_cpu_s": r["cpu_s"],
                      "peak_rss_mb": r["peak_rss_mb"]})
    first, second = loads[0], loads[1:]
    results["load"] = {"load_s": median([x["load_s"] for x in second]),
                       "load_model_s": median([x["load_model_s"] for x in second]),
                       "load_tokenizer_s": median([x["load_tokenizer_s"] for x in second]),
                       "import_s": median([x["import_s"] for x in second]),
                       "process_wall_s": median([x["process_wall_s"] for x in second]),
                       "process_cpu_s": median([x["process_cpu_s"] for x in second]),
                       "first_load_s": first["load_s"], "runs_load_s": [x["load_s"] for x in second],
                       "params": first["params"]}
    ld = results["load"]
    print(f"second load of {args.model}: {ld['load_s']:.2f} s (model {ld['load_model_s']:.2f} s, tokenizer "
          f"{ld['load_tokenizer_s']:.2f} s; torch + transformers import {ld['import_s']:.2f} s; whole process "
          f"{ld['process_wall_s']:.2f} s) (goal <= {GOALS['load']} s)", flush=True)

    for key, value in (("help", results["help"]["wall_s"]), ("config", results["config"]["wall_s"]),
                       ("load", ld["load_s"])):
        results[key]["goal_s"] = GOALS[key]
        results[key]["goal_met"] = value <= GOALS[key]
    rows = [["`finetune --help`", f"{results['help']['wall_s']:.3f}", f"{results['help']['cpu_s']:.3f}",
             f"<= {GOALS['help']}", "met" if results["help"]["goal_met"] else "not met"],
            [f"`finetune config model={args.model}`", f"{results['config']['wall_s']:.3f}",
             f"{results['config']['cpu_s']:.3f}", f"<= {GOALS['config']}",
             "met" if results["config"]["goal_met"] else "not met"],
            [f"second load of {args.model} (load_model + load_tokenizer)", f"{ld['load_s']:.2f}", "-",
             f"<= {GOALS['load']}", "met" if results["load"]["goal_met"] else "not met"],
            ["  the same process: torch + transformers import", f"{ld['import_s']:.2f}", "-", "", ""],
            ["  the same process, start to end", f"{ld['process_wall_s']:.2f}", f"{ld['process_cpu_s']:.2f}", "", ""]]
    md = "\n".join([f"# Start-up times ({args.device})", "", f"Hardware: {hardware_line(info)}.", "",
                    f"Medians of {args.reps} fresh processes after one warm-up run.", "",
                    md_table(["what", "wall s", "CPU s", "goal s", ""], rows), "",
                    f"First load (the warm-up run; converts the GGUF file only if its cache was missing): "
                    f"{first['load_s']:.2f} s.", "",
                    "Command: `python scripts/bench_startup.py " + " ".join(sys.argv[1:]) + "`"])
    print()
    print(md)
    write_outputs(output_path(args, "startup"),
                  {"benchmark": "startup", "hardware": info, "settings": vars(args), "results": results,
                   "loads": loads}, md)


if __name__ == "__main__":
    main()
