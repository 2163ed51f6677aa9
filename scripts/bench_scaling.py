#!/usr/bin/env python
"""Step time and peak memory of one process, DDP, FSDP2 and ZeRO-3 on the same job, each launched by
`finetune train` in its own process tree, with the per-rank memory the formulas predict beside it.

The job: the embedded SmolLM2-135M on the default memorize task, a global batch of --batch rows
(one process: all of them; N processes: batch/N each), --steps optimizer steps, no merge, one
evaluation prompt. Methods: full fine-tuning (where sharding matters) and LoRA r=8.

Measured per run: the median time of the optimizer steps after the first (from metrics.jsonl), and
the peak resident set size of the largest process of the tree (the kernel's ru_maxrss of the
launcher, which covers its ranks). On the CPU every rank first loads the whole fp32 model (the
sharded kinds then keep 1/N of it), so the peak is at least one model in fp32; the formula column
gives what each rank holds while training: weights, gradients and AdamW's two moments of the
trained parameters (4 + 4 + 8 bytes each; sharded kinds: divided by N), the frozen weights (4 bytes
each; sharded kinds: divided by N), plus for the sharded kinds the one unit gathered at a time.

    python scripts/bench_scaling.py --quick
    python scripts/bench_scaling.py --processes 2 --steps 6

Writes docs/bench/scaling-<device>.json and .md (--quick: under /tmp unless --out is given).
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
    hardware_line,
    md_table,
    median,
    output_path,
    print_hardware,
    run_measured,
    write_outputs,
)

LAUNCHERS = ("none", "ddp", "fsdp", "deepspeed")
METHODS = {"full": ["method=full", "method.lr=1e-5"], "lora": ["method=lora", "method.rank=8"]}


def parse_args():
    p = bench_parser(__doc__, "scaling")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--launchers", default=",".join(LAUNCHERS))
    p.add_argument("--quick", action="store_true", help="the tiny model, 3 steps: a smoke test")
    return p.parse_args()


def parameter_counts(model_args: list[str]) -> dict:
    """Total parameters, those of the largest decoder layer, and LoRA r=8's trainable count."""
    from finetune import adapters
    from finetune.config.compose import compose, method_settings
    from finetune.models.load import count_params, load_model
    from finetune.training.fsdp import decoder_layers

    cfg = compose([*model_args, "method=lora", "method.rank=8"])
    model = load_model(cfg.model)
    total = count_params(model)
    layer = max(sum(p.numel() for p in m.parameters()) for m in decoder_layers(model))
    lora = adapters.attach(model, "lora", method_settings(cfg)).num_trainable()
    return {"total": total, "largest_unit": layer, "lora_trainable": lora}


def predicted_mb(counts: dict, method: str, launcher: str, n: int) -> float:
    """Bytes per rank while training (see the module docstring), in MiB."""
    shards = n if launcher in ("fsdp", "deepspeed") else 1
    trained = counts["total"] if method == "full" else counts["lora_trainable"]
    frozen = 0 if method == "full" else counts["total"]
    held = (16 * trained + 4 * frozen) / shards
    gathered = 4 * counts["largest_unit"] if shards > 1 else 0
    return (held + gathered) / 2**20


def main() -> None:
    args = parse_args()
    info = hardware_info(args.device)
    print_hardware(info)
    model_args = ["model=tiny"] if args.quick else ["model=smollm2-135m"]
    steps = 3 if args.quick else args.steps
    counts = parameter_counts(model_args)
    work = Path(tempfile.mkdtemp(prefix="finetune-scaling-"))
    rows, records = [], []
    for method in args.methods.split(","):
        for launcher in args.launchers.split(","):
            n = 1 if launcher == "none" else args.processes
            run = work / f"{method}-{launcher}"
            cmd = [sys.executable, "-m", "finetune", "train", *model_args, *METHODS[method],
                   f"trainer.max_steps={steps}", f"trainer.batch_size={args.batch // n}", "trainer.merge=false",
                   "task.eval_limit=1", "task.max_new_tokens=1", "logger=none", f"trainer.device={args.device}",
                   f"launcher={launcher}", f"output_dir={run}", "-q"]
            if n > 1:
                cmd.append(f"launcher.num_processes={n}")
            print(f"{method} / {launcher} ({n} process{'es' * (n > 1)}) ...", flush=True)
            result = run_measured(cmd, work / f"{method}-{launcher}.log", env=child_env())
            check_ok(result, f"{method} / {launcher}")
            log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            times = [r["time"] for r in log if "loss" in r]
            step_s = median([b - a for a, b in zip(times, times[1:])])
            record = {"method": method, "launcher": launcher, "processes": n, "step_s": step_s,
                      "peak_rss_mb": result["peak_rss_mb"], "predicted_mb": predicted_mb(counts, method, launcher, n),
                      "wall_s": result["wall_s"], "last_loss": [r for r in log if "loss" in r][-1]["loss"]}
            records.append(record)
            rows.append([method, launcher, n, f"{step_s:.2f}", f"{record['predicted_mb']:,.0f}",
                         f"{record['peak_rss_mb']:,.0f}", f"{record['wall_s']:.0f}", f"{record['last_loss']:.4f}"])
            print(f"  step {step_s:.2f} s, peak RSS {result['peak_rss_mb']:,.0f} MiB", flush=True)
    headers = ["method", "launcher", "processes", "step s (median)", "formula MiB per rank", "peak RSS MiB",
               "wall s", "last loss"]
    table = md_table(headers, rows)
    print("\n" + table)
    markdown = (f"# Scaling: one process, DDP, FSDP2, ZeRO-3 ({args.device})\n\n{hardware_line(info)}\n\n"
                f"`python scripts/bench_scaling.py --device {args.device}{' --quick' if args.quick else ''}`; "
                f"{' '.join(model_args)}, global batch {args.batch}, {steps} steps; parameters: "
                f"{counts['total']:,} (largest unit {counts['largest_unit']:,}; LoRA r=8 trains "
                f"{counts['lora_trainable']:,}).\n\n{table}\n")
    write_outputs(output_path(args, "scaling"), {"hardware": info, "counts": counts, "runs": records,
                                                 "args": vars(args)}, markdown)


if __name__ == "__main__":
    main()
