#!/usr/bin/env python
"""The MoRA paper's memorization experiment (experiments.md §1, small-hardware variant §1.6) on the
embedded SmolLM2-135M: LoRA r=8, MoRA r=8 (same trainable-parameter budget), VB-LoRA and full
fine-tuning learn the same random UUID key:value pairs for the same number of steps; character
accuracy of the greedily generated values at fixed step checkpoints, as a table and a PNG curve,
with trainable and stored parameters per method.

Every method is one `finetune train` run (a subprocess) of task=memorize with trainer.eval_every:
the run evaluates every --eval-every steps and at the end, and writes the evaluation records to
its metrics.jsonl, which this script reads. Step 0 is the untrained base model (`finetune eval` on
the base weights; the same for every method). The protocol is the paper's (§1.1-1.4): one example
per pair, `key:value`, no template, no EOS, loss on all tokens; prompts are the training tokens up
to the value; the metric is the accuracy of the 32 hex digits (a model that learned only the UUID
format scores about 9.8 %).

Default settings (the 2-CPU-core budget: the whole comparison in <= 60 minutes, see --help of
each flag) and why:

    pairs 32, batch 8, 150 steps   = 37.5 epochs over the pairs (the paper: 10k pairs, batch 1024,
                                     1,000 steps = 100 epochs). A step of batch 8 took 3.9-4.7 s
                                     on 2 quiet cores for every method, full fine-tuning
                                     included: 4 methods x 150 steps + 6 evaluations each took
                                     44 minutes (2026-11-23)
    warm-up 10 % then linear decay  the paper's 100 of 1,000 steps, linear to 0
    lr 2e-3 for LoRA and MoRA       one learning rate for both, as in the paper (3e-4 there, for
                                     1,000 steps of batch 1024 on a 7B model; a 135M model and
                                     6x fewer steps need a larger one)
    lr 1e-4 for full fine-tuning    the paper does not give one; a common small-model value
    VB-LoRA: the method config      its rank and its two lrs, relative to --lr (conf/method/vblora.yaml);
                                     the paper's rank and lrs: --methods vblora:4 --lr-bank 1e-3
                                     --lr-logits 1e-2
    alpha 16 at r=8, dropout 0.05   the MoRA scripts' defaults (§1.3); MoRA type auto -> 6 at r=8
    AdamW, weight decay 0, seed 42, all seven projections, eval every 25 steps on all pairs

32 pairs are far fewer facts than the paper's 10,000, so rank 8 is a much weaker constraint here:
the comparison shows whether the ordering survives at this size, and the script reports it either
way. After every method it prints the projected total time.

    python scripts/reproduce_memorization.py --quick               # 2-minute smoke test
    python scripts/reproduce_memorization.py                        # the <= 60 min CPU comparison
    python scripts/reproduce_memorization.py --device cuda --paper  # 10k pairs, the paper's schedule
    python scripts/reproduce_memorization.py --methods lora:8,mora:8,lora:256,mora:256,full

Writes docs/bench/memorization-<device>.json, .md and .png (--quick: under /tmp unless --out).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    bench_parser,
    child_env,
    hardware_info,
    hardware_line,
    md_table,
    output_path,
    print_hardware,
    run_measured,
    write_outputs,
)

FORMAT_ONLY = 100 * (1 + 0.25 + 30 / 16) / 32  # ≈ 9.8 %: the version digit, a 1-in-4 variant, chance
LABELS = {"lora": "LoRA", "mora": "MoRA", "vblora": "VB-LoRA", "full": "Full FT"}
RANKED = ("lora", "mora")


def parse_args(argv=None):
    p = bench_parser(__doc__, "memorization")
    p.add_argument("--model", default="smollm2-135m", help="a `model` config option")
    p.add_argument("--methods", default="lora:8,mora:8,vblora,full",
                   help="comma-separated: lora:RANK, mora:RANK, vblora, full")
    p.add_argument("--pairs", type=int, default=32, help="UUID pairs (the paper: 10,000)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="intermediate evaluations on the first N pairs (the final one: see --final-all)")
    p.add_argument("--final-all", action="store_true",
                   help="with --eval-limit: evaluate the finished runs again on all pairs (finetune eval)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="LR warm-up as a fraction of --steps")
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA and MoRA learning rate")
    p.add_argument("--lr-full", type=float, default=1e-4, help="full fine-tuning learning rate")
    p.add_argument("--lr-bank", type=float, default=None, help="VB-LoRA bank lr (default: the method config's, relative to --lr; the paper: 1e-3)")
    p.add_argument("--lr-logits", type=float, default=None, help="VB-LoRA logits lr (default: the method config's, relative to --lr; the paper: 1e-2)")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="LoRA alpha = ratio x rank (16 at r=8)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (MoRA scripts' default)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="a value is at most 36 tokens")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--no-step0", action="store_true", help="skip the evaluation of the untrained base")
    p.add_argument("--paper", action="store_true",
                   help="the paper's scale (GPU): 10k pairs, 1,000 steps of batch 1024 (128 x 8 accumulation), "
                        "lr 3e-4 for LoRA and MoRA, 100 warm-up steps, evaluations every 100 steps on 1,000 "
                        "pairs and at the end on all, plus LoRA and MoRA at r=256")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 pairs, 4 steps, evaluation every 2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a new temporary directory)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs in --work-dir that have the same settings (resume a comparison)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run before it is killed")
    args = p.parse_args(argv)
    if args.paper:
        args.pairs, args.steps, args.batch_size, args.grad_accum = 10_000, 1_000, 128, 8
        args.lr, args.eval_every, args.eval_limit, args.final_all = 3e-4, 100, 1_000, True
        args.warmup_ratio = 0.1
        if args.methods == p.get_default("methods"):
            args.methods = "lora:8,mora:8,lora:256,mora:256,vblora,full"
    if args.quick:  # smaller defaults; flags given explicitly still win
        for key, value in dict(pairs=8, steps=4, eval_every=2, batch_size=4).items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def parse_methods(text: str) -> list[tuple[str, int | None]]:
    out = []
    for item in text.split(","):
        name, _, rank = item.strip().partition(":")
        if name not in LABELS:
            sys.exit(f"--methods: unknown method {name!r}; use lora:R, mora:R, vblora, full")
        if name in RANKED:
            out.append((name, int(rank or 8)))
        else:
            out.append((name, int(rank) if rank else None))
    return out


def label(name: str, rank: int | None) -> str:
    return f"{LABELS[name]} r={rank}" if rank else LABELS[name]


def last_json(log: Path) -> dict:
    """The JSON object `finetune eval` prints last (its log also holds warnings)."""
    text = Path(log).read_text(errors="replace")
    start = text.rfind("\n{\n") + 1 if not text.startswith("{\n") else 0
    return json.loads(text[start:text.rindex("}") + 1])


def task_overrides(args) -> list[str]:
    out = [f"model={args.model}", "task=memorize", f"task.num_pairs={args.pairs}",
           f"task.seed={args.data_seed}", f"task.max_new_tokens={args.max_new_tokens}",
           f"task.eval_batch_size={args.eval_batch_size}"]
    if args.eval_limit:
        out.append(f"task.eval_limit={args.eval_limit}")
    return out


def run_overrides(args, name: str, rank: int | None, out_dir: Path) -> list[str]:
    method = [f"method={name}"]
    if name in RANKED:
        method.append(f"method.rank={rank}")
    if name == "lora":
        method.append(f"method.alpha={args.alpha_ratio * rank:g}")
    if name == "vblora":
        if rank:
            method.append(f"method.rank={rank}")
        if args.lr_bank is not None:
            method.append(f"method.lr_bank={args.lr_bank}")
        if args.lr_logits is not None:
            method.append(f"method.lr_logits={args.lr_logits}")
    if name != "full":
        method.append(f"method.dropout={args.dropout}")
    lr = args.lr_full if name == "full" else args.lr
    warmup = int(round(args.warmup_ratio * args.steps))
    return [*method, *task_overrides(args), f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.batch_size}", f"trainer.grad_accum={args.grad_accum}",
            f"trainer.lr={lr}", "trainer.schedule=linear", f"trainer.warmup_steps={warmup}",
            "trainer.weight_decay=0.0", f"trainer.eval_every={args.eval_every}", f"trainer.seed={args.seed}",
            f"trainer.device={args.device}", "trainer.merge=false", "trainer.overwrite=true", "logger=none",
            f"output_dir={out_dir}"]


def finetune_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "finetune", *args]


def read_curve(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [{"step": r["step"], **r["eval"]} for r in records if "eval" in r]
    steps = [r for r in records if "loss" in r and "time" in r]
    return evals, steps


def base_eval(args, work: Path, env: dict) -> dict | None:
    """Step 0: the untrained base model (finetune eval on the base weights)."""
    from finetune.config.compose import compose
    from finetune.models.load import source_dir

    model_dir = source_dir(compose([f"model={args.model}"]).model)
    res = run_measured(finetune_cmd("eval", model_dir, *task_overrides(args)), work / "base-eval.log",
                       env=env, timeout=args.timeout)
    if res["returncode"] != 0:
        print(f"  base evaluation failed (see {res['log']}); step 0 left out", flush=True)
        return None
    return {"step": 0, **last_json(res["log"])["metrics"], "wall_s": res["wall_s"]}


def final_all(args, run_dir: Path, env: dict) -> dict | None:
    """The finished run evaluated on all pairs (when intermediate evaluations used a subset)."""
    overrides = [o for o in task_overrides(args) if not o.startswith("task.eval_limit")]
    res = run_measured(finetune_cmd("eval", str(run_dir), *overrides, "task.eval_limit=null"),
                       run_dir.with_suffix(".final-eval.log"), env=env, timeout=args.timeout)
    if res["returncode"] != 0:
        return None
    return last_json(res["log"])["metrics"]


def run_method(args, name: str, rank: int | None, work: Path, env: dict) -> dict:
    tag = f"{name}-r{rank}" if rank else name
    out = work / tag
    overrides = run_overrides(args, name, rank, out)
    result = {"method": name, "rank": rank, "label": label(name, rank), "command": "finetune train " + " ".join(overrides),
              "lr": args.lr_full if name == "full" else args.lr, "run_dir": str(out)}
    info_file = out / "run.json"
    reused = False
    if args.reuse and info_file.is_file():
        info = json.loads(info_file.read_text())
        reused = info.get("status") == "finished" and list(info.get("overrides", [])) == overrides
    if not reused:
        res = run_measured(finetune_cmd("train", "-q", *overrides), work / f"{tag}.log", env=env,
                           timeout=args.timeout)
        result["process_wall_s"] = res["wall_s"]
        if res["returncode"] != 0:
            tail = Path(res["log"]).read_text(errors="replace").strip().splitlines()[-3:]
            result["error"] = " / ".join(tail)
            return result
    info = json.loads(info_file.read_text())
    evals, steps = read_curve(out)
    params = info.get("params") or {}
    result.update(curve=evals, reused=reused, trainable_params=params.get("trainable_params"),
                  stored_params=params.get("stored_params"), final_loss=info.get("final_loss"),
                  train_wall_s=info.get("wall_time_s"))
    if len(steps) > 1:
        result["s_per_step"] = (steps[-1]["time"] - steps[0]["time"]) / (len(steps) - 1)
    if args.final_all and args.eval_limit:
        metrics = final_all(args, out, env)
        if metrics:
            result["final_all"] = metrics
    return result


def checkpoints(results: list[dict], step0: dict | None) -> list[int]:
    steps = sorted({e["step"] for r in results for e in r.get("curve", [])})
    return ([0] if step0 else []) + steps


def markdown(args, results, step0, info) -> str:
    cps = checkpoints(results, step0)
    rows = []
    for r in results:
        by_step = {e["step"]: e for e in r.get("curve", [])}
        accs = []
        for s in cps:
            e = step0 if s == 0 else by_step.get(s)
            accs.append(f"{100 * e['char_acc']:.1f}" if e else "-")
        if "error" in r:
            accs = ["failed"] + [""] * (len(cps) - 1)
        rows.append([r["label"], f"{r['lr']:g}" if r["method"] != "vblora" else "bank/logits",
                     *accs, f"{r['trainable_params']:,}" if r.get("trainable_params") else "-",
                     f"{r['stored_params']:,}" if r.get("stored_params") else "-",
                     f"{r['s_per_step']:.1f}" if r.get("s_per_step") else "-"])
    warm = int(round(args.warmup_ratio * args.steps))
    lines = [f"# Memorization of random UUID pairs ({args.model}, {args.device})", "",
             f"Hardware: {hardware_line(info)}.", "",
             f"{args.pairs} pairs (data seed {args.data_seed}), batch {args.batch_size} x accumulation "
             f"{args.grad_accum}, {args.steps} steps ({args.steps * args.batch_size * args.grad_accum / args.pairs:.0f} "
             f"epochs), warm-up {warm} steps then linear decay, AdamW, dropout {args.dropout} (adapters), "
             f"seed {args.seed}. Character accuracy (%) of the 32 hex digits of the greedily generated value "
             f"(format only: {FORMAT_ONLY:.1f} %)"
             + (f", intermediate points on the first {args.eval_limit} pairs" if args.eval_limit else ", on all pairs")
             + (". Step 0: the untrained base model." if step0 else "."), "",
             md_table(["method", "lr", *[f"step {s}" for s in cps], "trainable params", "stored params",
                       "s/step"], rows)]
    finals = [r for r in results if r.get("final_all")]
    if finals:
        lines += ["", "Final accuracy on all pairs: " + ", ".join(
            f"{r['label']} {100 * r['final_all']['char_acc']:.1f} %" for r in finals)]
    lines += ["", "Exact match at the last step: " + ", ".join(
        f"{r['label']} {100 * r['curve'][-1].get('exact_match', 0):.0f} %" for r in results if r.get("curve")),
        "", f"Curve: {Path(args.out_base).with_suffix('.png').name}", "",
        "Command: `python scripts/reproduce_memorization.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines)


def plot(args, results, step0, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        points = ([(0, step0["char_acc"])] if step0 else []) + [(e["step"], e["char_acc"]) for e in r.get("curve", [])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=r["label"])
    ax.axhline(FORMAT_ONLY, color="grey", linestyle=":", linewidth=1, label="format only (9.8 %)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("character accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"UUID memorization: {args.pairs} pairs, {args.model}, batch {args.batch_size * args.grad_accum}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    info = hardware_info(args.device)
    print_hardware(info)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="memorization-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    args.out_base = str(output_path(args, "memorization"))
    epochs = args.steps * args.batch_size * args.grad_accum / args.pairs
    print(f"{len(methods)} methods x {args.steps} steps, {args.pairs} pairs, batch {args.batch_size} x "
          f"{args.grad_accum} ({epochs:.0f} epochs); runs in {work}", flush=True)

    start = time.time()
    step0 = None
    if not args.no_step0:
        print("step 0: evaluating the base model ...", end=" ", flush=True)
        step0 = base_eval(args, work, env)
        if step0:
            print(f"char_acc {100 * step0['char_acc']:.1f} % ({step0['wall_s']:.0f} s)", flush=True)
    results = []
    for name, rank in methods:
        print(f"{label(name, rank)} ...", end=" ", flush=True)
        r = run_method(args, name, rank, work, env)
        results.append(r)
        if "error" in r:
            print(f"FAILED: {r['error']}", flush=True)
            continue
        curve = ", ".join(f"{e['step']}: {100 * e['char_acc']:.1f}" for e in r["curve"])
        print(f"{'(reused) ' if r['reused'] else ''}char_acc % at steps {curve}; "
              f"{r.get('s_per_step') or 0:.1f} s/step, {r.get('process_wall_s', 0):.0f} s", flush=True)
        done = len(results)
        if done < len(methods):
            elapsed = time.time() - start
            print(f"  {elapsed / 60:.1f} min so far; projected total ≈ "
                  f"{elapsed / 60 * len(methods) / done:.0f} min", flush=True)

    total = time.time() - start
    md = markdown(args, results, step0, info) + f"\n\nTotal wall time: {total / 60:.1f} min."
    print()
    print(md)
    png = Path(args.out_base).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(args, results, step0, png)
    settings = {k: v for k, v in vars(args).items() if k != "out_base"}
    write_outputs(Path(args.out_base), {"benchmark": "memorization", "hardware": info, "settings": settings,
                                        "step0": step0, "results": results, "total_wall_s": total,
                                        "work_dir": str(work), "png": str(png)}, md)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
