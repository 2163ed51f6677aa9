#!/usr/bin/env python
"""Adapter overhead benchmark: training-step time of each method relative to the frozen base.

On one base model (default: the embedded SmolLM2-135M, loaded through ``finetune.models.load``), in one
process, this times one training step — forward, backward, optimizer step — of:

    base         the frozen base model, forward + backward only (input embeddings made to require
                 grad, so the backward runs through every layer as it must for any adapter; no
                 weight gradients, no optimizer): the denominator of every ratio
    lora         finetune's LoRA, r=8, alpha=16, on all 7 projections
    mora         finetune's MoRA, r=8 (type auto -> 6), on all 7 projections
    vblora       finetune's VB-LoRA, r=4 (the paper's rank), 256 vectors of length 64, top-2
    peft-lora    peft's LoRA with the same settings as ``lora`` (if peft is installed)
    peft-vblora  peft's VB-LoRA with the same settings as ``vblora`` (if peft is installed)

Every variant is a separate copy of the same base weights. After ``--warmup`` untimed steps per
variant, ``--reps`` rounds run; each round times one step of every variant, in an order rotated
from round to round (interleaving: a slow period of the machine hits all variants alike). The
reported ratio of a variant is the median over rounds of (its step time / the base's step time in
the same round); the median step times are reported too. Inputs are fixed random token ids
(``--batch`` x ``--seq``), labels = inputs, the model's own causal-LM loss, fp32.

    python scripts/bench_adapters.py                       # CPU, the threads torch picks, ≈ 10 min
    python scripts/bench_adapters.py --threads 1 --clock cpu  # steadier on a shared machine
    python scripts/bench_adapters.py --device cuda
    python scripts/bench_adapters.py --quick                # smoke test: 2 rounds, output under /tmp

Writes docs/bench/adapters-<device>.json and .md (``--out PATH`` without suffix to choose; --quick:
under /tmp unless --out is given) and prints the table. Results vary with the machine's load: run it
on a quiet machine for numbers worth quoting; the load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_parser, hardware_info, hardware_line, output_path, print_hardware, write_outputs  # noqa: E402

OUR_METHODS = ("lora", "mora", "vblora")
PEFT_METHODS = ("peft-lora", "peft-vblora")
ALL_VARIANTS = ("base", *OUR_METHODS, *PEFT_METHODS)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"lora": 1.08, "mora": 1.10, "vblora": 1.10}


def parse_args(argv=None):
    p = bench_parser(__doc__, "adapters")
    p.add_argument("--model", default="smollm2-135m", help="a `model` config option (default: smollm2-135m)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--reps", type=int, default=10, help="timed rounds (one step of every variant each)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (base is always run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, much less sensitive "
                        "to other processes on a shared machine (use it with --threads 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up step, 2 rounds, output under /tmp")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.reps = 1, 2
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; allowed: {', '.join(ALL_VARIANTS)}")
    args.variants = ["base"] + [v for v in ALL_VARIANTS[1:] if v in variants]
    return args


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


def method_settings(method: str) -> dict:
    """The method's settings from the project's config groups, with the benchmark's overrides."""
    from finetune.config.compose import compose
    from finetune.config.compose import method_settings as settings_of

    overrides = {"lora": ["method.rank=8", "method.alpha=16", "method.dropout=0.0"],
                 "mora": ["method.rank=8", "method.dropout=0.0"],
                 "vblora": ["method.rank=4", "method.dropout=0.0"]}[method]
    cfg = compose([f"method={method}", "task=memorize", *overrides])
    settings = settings_of(cfg)
    settings["targets"] = list(TARGETS)
    return settings


def load_base(model_name: str, device: str):
    import torch

    from finetune.config.compose import compose
    from finetune.models.load import load_model

    cfg = compose([f"model={model_name}", "method=lora", "task=memorize"])
    torch.manual_seed(0)
    model = load_model(cfg.model, device, dtype="float32")
    model.config.use_cache = False
    return model.to(device)


def build_variant(name: str, base, device: str):
    """(model, optimizer or None, description)."""
    import torch

    from finetune import adapters
    from finetune.training.optimizer import make_optimizer

    model = copy.deepcopy(base)
    torch.manual_seed(1)
    if name == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, no weight gradients
        return model.train(), None, "frozen base: forward + backward (input grads only)"
    if name in OUR_METHODS:
        settings = method_settings(name)
        adapter = adapters.attach(model, name, settings)
        trainer = argparse.Namespace(lr=1e-4, weight_decay=0.0)
        optimizer = make_optimizer(adapter, trainer)
        keys = ("rank", "alpha", "type", "num_vectors", "vector_length", "topk")
        desc = ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)
        return model.train(), optimizer, f"finetune {name} ({desc})"
    import peft

    if name == "peft-lora":
        s = method_settings("lora")
        config = peft.LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=TARGETS)
        desc = f"peft {peft.__version__} LoRA (rank={s['rank']}, alpha={s['alpha']})"
    else:
        s = method_settings("vblora")
        config = peft.VBLoRAConfig(r=s["rank"], num_vectors=s["num_vectors"], vector_length=s["vector_length"],
                                   topk=s["topk"], vblora_dropout=0.0, target_modules=TARGETS)
        desc = (f"peft {peft.__version__} VB-LoRA (rank={s['rank']}, num_vectors={s['num_vectors']}, "
                f"vector_length={s['vector_length']}, topk={s['topk']})")
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return model.train(), optimizer, desc


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def make_step(model, optimizer, ids, device: str, clock: str = "wall"):
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    now = time.process_time if clock == "cpu" else time.perf_counter

    def step() -> float:
        sync()
        start = now()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return now() - start

    return step


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and args.clock == "cpu":
        sys.exit("--clock cpu measures CPU time: use --clock wall with --device cuda")
    if any(v.startswith("peft") for v in args.variants):
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed: skipping the peft variants", file=sys.stderr)
            args.variants = [v for v in args.variants if not v.startswith("peft")]
    info = hardware_info(args.device)
    print_hardware(info)

    t0 = time.perf_counter()
    base = load_base(args.model, args.device)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed)).to(args.device)

    variants, descriptions = {}, {}
    for name in args.variants:
        model, optimizer, desc = build_variant(name, base, args.device)
        variants[name] = make_step(model, optimizer, ids, args.device, args.clock)
        descriptions[name] = desc
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"  {name:<12} {desc}; {trainable:,} trainable parameters", flush=True)
    del base

    for _ in range(args.warmup):
        for step in variants.values():
            step()
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position effects
        for name in order:
            times[name].append(variants[name]())
        line = "  ".join(f"{n} {times[n][-1]:.3f}" for n in names)
        print(f"round {r + 1}/{args.reps}: {line}", flush=True)

    base_times = times["base"]
    results = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base_times)]
        results[name] = {
            "description": descriptions[name],
            "median_step_s": statistics.median(times[name]),
            "min_step_s": min(times[name]),
            "ratio": statistics.median(ratios),  # median of per-round ratios
            "ratio_of_medians": statistics.median(times[name]) / statistics.median(base_times),
            "ratio_iqr": _iqr(ratios),
            "step_s": times[name],
        }
        if name in GOALS:
            results[name]["goal"] = GOALS[name]
    return {"hardware": info, "model": args.model, "batch": args.batch, "seq": args.seq,
            "warmup": args.warmup, "reps": args.reps, "dtype": "float32", "clock": args.clock,
            "results": results}


def _iqr(values: list[float]) -> list[float]:
    if len(values) < 4:
        return [min(values), max(values)]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def markdown(report: dict) -> str:
    hw = report["hardware"]
    res = report["results"]
    lines = [f"Model {report['model']}, batch {report['batch']}×{report['seq']} tokens, fp32, "
             f"{report['reps']} interleaved rounds after {report['warmup']} warm-up steps, "
             f"{'CPU' if report.get('clock') == 'cpu' else 'wall-clock'} time, {hw['torch_threads']} torch "
             f"threads. Hardware: {hardware_line(hw)}.",
             "",
             "| variant | step time (median) | × frozen base (median of per-round ratios) | IQR of ratio | goal |",
             "|---|---|---|---|---|"]
    peft_ratio = {"lora": res.get("peft-lora", {}).get("ratio"), "vblora": res.get("peft-vblora", {}).get("ratio")}
    for name, r in res.items():
        if name == "base":
            ratio = "1.00 (reference)"
            goal = ""
        else:
            ratio = f"{r['ratio']:.3f}"
            goal = ""
            if "goal" in r:
                ok = r["ratio"] <= r["goal"]
                beats = peft_ratio.get(name) is None or r["ratio"] < peft_ratio[name]
                goal = f"≤ {r['goal']:.2f}{'' if peft_ratio.get(name) is None else ' and < peft'}: " + \
                       ("met" if ok and beats else "not met")
        iqr = "" if name == "base" else f"{r['ratio_iqr'][0]:.3f}–{r['ratio_iqr'][1]:.3f}"
        lines.append(f"| {r['description']} | {r['median_step_s'] * 1000:.0f} ms | {ratio} | {iqr} | {goal} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    report = run(args)
    table = markdown(report)
    print()
    print(table)
    write_outputs(output_path(args, "adapters"), report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
