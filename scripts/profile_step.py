#!/usr/bin/env python
"""Where a training step's time goes: `finetune train` in this process, with torch's profiler on
for a few optimizer steps after a warm-up, and the operators' own (self) CPU time summed into a
few kinds: GEMMs, attention, the loss head, elementwise, normalisation and reductions, copies and
layout, the optimizer, and the rest (Python and framework time outside any operator is the
difference between the steps' wall time and the operators' sum).

    python scripts/profile_step.py                                   # the default run (memorize)
    python scripts/profile_step.py --job gsm8k                       # bench_throughput's job
    python scripts/profile_step.py --job gsm8k -- method=mora        # plus any overrides

Writes docs/bench/profile-<job>-<device>.json and .md (the kinds, and the top operators).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_parser, hardware_info, md_heading, md_table, output_path, print_hardware, write_outputs  # noqa: E402

GSM8K = "/work/shared/data/gsm8k/train.jsonl"
# bench_throughput's finetune job (its defaults: 3 packed rows of 512 tokens, LoRA r=8 on all projections)
JOBS = {"memorize": [],
        "gsm8k": ["task=gsm8k", f"task.data.path={GSM8K}", "task.max_length=512", "task.packing=true",
                  "task.on_overflow=truncate", "method=lora", "method.rank=8", "method.alpha=16", "method.dropout=0.0",
                  "trainer.batch_size=3", "trainer.grad_accum=1", "trainer.lr=2e-4", "trainer.schedule=linear",
                  "trainer.warmup_steps=0", "trainer.weight_decay=0.0"]}

# Ranges whose operators all count as one kind, by the range's name (an ancestor of the operator):
# the optimizer's step, the chunked loss (its forward computes the head's gradients too), attention.
RANGES = [("optimizer", ("Optimizer.step", "Optimizer.zero_grad", "clip_grad")),
          ("loss head", ("ChunkedLinearCrossEntropy",)),
          ("attention", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product"))]
# Otherwise by the operator's own name (without "aten::"); first matching rule wins.
KINDS = [
    ("GEMM", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
    ("normalisation, reductions", ("mean", "sum", "rsqrt", "pow", "norm", "var", "amax", "max", "logsumexp")),
    ("copies, layout", ("copy", "clone", "cat", "contiguous", "to", "_to_copy", "empty", "zeros", "fill",
                        "index", "slice", "transpose", "view", "reshape", "expand", "permute", "t", "narrow",
                        "stack", "split", "select", "unsqueeze", "squeeze", "as_strided", "zero", "new",
                        "gather", "scatter", "unbind")),
    ("elementwise", ("mul", "add", "sub", "div", "silu", "sigmoid", "exp", "neg", "where", "cos", "sin",
                     "threshold", "gelu", "tanh", "masked_fill", "rsub", "reciprocal", "sqrt", "relu", "lerp",
                     "addcmul", "addcdiv")),
]


def job_overrides(job: str, extra: list[str], device: str, steps: int, out_dir) -> list[str]:
    """A job's `finetune train` overrides for ``steps`` optimizer steps in this process, with a trivial
    end-of-run evaluation, no merge, logger or checkpoints, into ``out_dir``."""
    return [*JOBS[job], *extra, f"trainer.device={device}", f"trainer.max_steps={steps}", "task.eval_limit=1",
            "task.max_new_tokens=1", "trainer.merge=false", "logger=none", "trainer.save_every=0",
            f"output_dir={out_dir}"]


def kind_of(event) -> str:
    """An operator's kind: that of a range it runs in, else by its name (equal to a key, or starting
    with a key longer than three letters; in-place variants count with their operator)."""
    parent = event.cpu_parent
    while parent is not None:
        for kind, names in RANGES:
            if parent.name.startswith(names):
                return kind
        parent = parent.cpu_parent
    for kind, names in RANGES:
        if event.name.startswith(names):
            return kind
    op = event.name.split("::")[-1].lower().rstrip("_")
    for kind, keys in KINDS:
        if any(op == k or (len(k) > 3 and op.startswith(k)) for k in keys):
            return kind
    return "other"


def main() -> None:
    p = bench_parser(__doc__, "profile")
    p.add_argument("--job", choices=list(JOBS), default="memorize")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before the profiler starts")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps profiled")
    p.add_argument("overrides", nargs="*", help="extra config overrides (after --)")
    args = p.parse_args()
    from finetune.allocator import restart_with_jemalloc
    from finetune.environment import allocator_in_use

    restart_with_jemalloc()  # the malloc `finetune train` has (under glibc's, elementwise passes took twice as long)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetune.config.compose import compose
    from finetune.training import loop

    info = hardware_info(args.device)
    print_hardware(info)
    out_dir = Path(tempfile.mkdtemp(prefix="profile-"))
    overrides = job_overrides(args.job, args.overrides, args.device, args.warmup + args.steps + 1, out_dir)
    cfg = compose(overrides)

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else []))
    window = {"calls": 0, "start": 0.0, "seconds": 0.0}
    original = loop.accumulate_gradients

    def accumulate(model, micro, parallel, loss_chunk=0):
        # The window opens before step warmup+1's forward and closes before the forward of the step
        # after the last profiled one, so it holds whole steps: data, forward, backward, clipping,
        # optimizer, schedule, logging (the extra step after it keeps evaluation and saving out).
        if window["calls"] == args.warmup:
            prof.start()
            window["start"] = time.perf_counter()
        elif window["calls"] == args.warmup + args.steps:
            if args.device == "cuda":
                torch.cuda.synchronize()
            prof.stop()
            window["seconds"] = time.perf_counter() - window["start"]
        window["calls"] += 1
        return original(model, micro, parallel, loss_chunk)

    loop.accumulate_gradients = accumulate
    try:
        summary = loop.train(cfg, overrides, quiet=True)
    finally:
        loop.accumulate_gradients = original
    kinds: dict[str, float] = {}
    by_op: dict[tuple[str, str], list] = {}  # (operator, kind) -> [seconds, calls]
    for e in prof.events():
        if e.self_cpu_time_total <= 0:
            continue
        kind = kind_of(e)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        entry = by_op.setdefault((e.name, kind), [0.0, 0])
        entry[0] += e.self_cpu_time_total / 1e6
        entry[1] += 1
    top = [(seconds, name, kind, calls) for (name, kind), (seconds, calls) in by_op.items()]
    top.sort(reverse=True)
    ops_total = sum(kinds.values())
    records = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x]
    every = [r for r in records if "loss" in r and "time" in r]
    steps = every[args.warmup:args.warmup + args.steps]
    mfu = [r["mfu"] for r in steps if r.get("mfu")]
    tps = [r["tokens_per_s"] for r in steps]
    # the same job without the profiler: the warm-up steps after the first, and the step after the window
    plain = [r["tokens_per_s"] for r in every[1:args.warmup] + every[args.warmup + args.steps:]]
    result = {"job": args.job, "overrides": overrides, "hardware": info, "allocator": allocator_in_use(),
              "profiled_steps": args.steps,
              "operator_seconds": ops_total, "wall_seconds": window["seconds"], "kinds_s": kinds,
              "mfu_mean": sum(mfu) / len(mfu) if mfu else None,
              "tokens_per_s_mean": sum(tps) / len(tps) if tps else None,
              "tokens_per_s_unprofiled": sum(plain) / len(plain) if plain else None,
              "top": [{"op": k, "kind": kind, "self_s": s, "calls": c} for s, k, kind, c in top[:25]]}
    kinds["outside operators (Python, framework)"] = max(window["seconds"] - ops_total, 0.0)
    wall = window["seconds"]
    rows = [[kind, f"{s:.2f}", f"{100 * s / wall:.1f}%"] for kind, s in sorted(kinds.items(), key=lambda kv: -kv[1])]
    top_rows = [[f"`{k}`", kind, f"{s:.2f}", f"{100 * s / wall:.1f}%", f"{c:,}"] for s, k, kind, c in top[:15]]
    md = (md_heading(f"Where the time goes: {args.job} ({args.device})", info, f"Allocator: {result['allocator']}")
          + f"{args.steps} optimizer steps after {args.warmup} warm-up steps; mean MFU of those steps "
          f"{100 * (result['mfu_mean'] or 0):.0f}%, {result['tokens_per_s_mean'] or 0:,.0f} tokens/s under the "
          f"profiler ({result['tokens_per_s_unprofiled'] or 0:,.0f} tokens/s in the steps around them, without it). "
          "Self CPU "
          f"time of the operators by kind, as shares of the {wall:.1f} s the profiled steps took (with the "
          "profiler's own overhead):\n\n"
          + md_table(["kind", "seconds", "share"], rows) + "\n\nThe top operators:\n\n"
          + md_table(["operator", "kind", "seconds", "share", "calls"], top_rows) + "\n")
    print(md)
    write_outputs(output_path(args, f"profile-{args.job}"), result, md)


if __name__ == "__main__":
    main()
