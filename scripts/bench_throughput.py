#!/usr/bin/env python
"""Training throughput and peak memory: `finetune train` against peft + transformers Trainer and
against TRL's SFTTrainer + peft in its three ways of batching.

The same fine-tuning job several ways, each run in its own process, alternating:

    finetune   `finetune train` (a subprocess): GSM8K from a local file in finetune's gsm8k
               format (Alpaca layout, loss on the answer + EOS), packed rows of --max-length
               tokens (task.packing=true, examples never attend to each other), the chunked
               cross-entropy (trainer.loss_chunk), LoRA.
    baseline   what users would pick instead: peft's LoRA (same rank, alpha, targets, dropout)
               with transformers' Trainer, the same tokenized examples (unpacked), padded per
               batch to the longest example (DataCollatorForSeq2Seq, labels -100 on padding), the
               model's standard cross-entropy.
    finetune-recompute  the same with trainer.gradient_checkpointing=true: each decoder layer's
               activations recomputed in the backward instead of kept (TRL's default, below).
    finetune-partial  the same with trainer.checkpoint_every_n_layers=--partial (4): one layer in
               that many recomputed (the first, then every n-th), the others keeping their (lean)
               activations; its loss chunk is --partial-loss-chunk where given.
    trl-bfd    TRL's SFTTrainer + peft (`pip install trl`), the same tokenized examples (their labels:
               loss on the answer), `packing=True, packing_strategy="bfd"`: best-fit packing,
               padding-free (examples kept apart by position ids), as many packed rows per step
               as finetune. SFTConfig's defaults are kept, among them gradient_checkpointing=True
               (activations recomputed; transformers' Trainer defaults to False).
    trl-wrapped  the same with `packing_strategy="wrapped"`: rows cut at max length, examples
               attending to each other across their boundaries.
    trl-nopack   the same without packing: --batch-size examples per step, padded per batch.

Shared: the embedded SmolLM2-135M, method LoRA r=8, alpha=16, dropout 0, all seven projections,
learning rate, linear decay without warmup, AdamW (torch defaults, weight decay 0), gradient
clipping 1.0, seed, the sequence budget (--max-length tokens per sequence: longer examples are
truncated for both) and the number of optimizer steps. The token budget per step is matched: the
baseline takes --batch-size examples per step; finetune takes --rows packed rows, by default
(``--rows auto``) as many as hold the same number of tokens on average
(round(batch_size x mean example length / max_length)). Both report their tokens per step.

Measured per run: non-padding tokens per second over the optimizer steps after --warmup-steps
(the per-step clock of each system: finetune's metrics.jsonl, a Trainer callback; from the end of
the last warm-up step to the end of the last step, so data loading, collation, forward, backward
and optimizer step are all inside), and peak memory: on CPU the peak resident set size of the
whole process from the kernel (ru_maxrss via wait4, model loading included), on CUDA
torch.cuda.max_memory_allocated. `finetune train` runs with jemalloc where one is installed (its
default, finetune.allocator; FINETUNE_ALLOCATOR=system in this script's environment turns it off),
the baselines with the C library's malloc as their users run them, or with jemalloc preloaded too
under --baseline-allocator jemalloc; every run records the allocator it had. The summary is the median over --reps runs of each, and the
ratios finetune / each other system. Goals: >= 1.5x peft + Trainer's tokens/s at <= 0.6x its peak
memory; >= 2.5x TRL's padding-free (bfd) packing and >= 2x its wrapped packing, at <= 0.5x their
peak memory.

    python scripts/bench_throughput.py --quick                    # a 2-minute smoke test
    python scripts/bench_throughput.py --device cpu               # the full measurement
    python scripts/bench_throughput.py --device cuda --steps 50 --batch-size 16

Writes docs/bench/throughput-<device>.json and .md (--quick: under /tmp unless --out is given).
Use a quiet machine: every other process on the cores slows both sides unevenly.
"""

from __future__ import annotations

import argparse
import json
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

DATA = "/work/shared/data/gsm8k/train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# finetune's three ways: system -> (what it adds to the job's overrides, label suffix); {partial}: --partial
FINETUNE = {"finetune": ([], ""),
            "finetune-partial": (["trainer.gradient_checkpointing=true", "trainer.checkpoint_every_n_layers={partial}"],
                                 ", 1 layer in {partial} recomputed"),
            "finetune-recompute": (["trainer.gradient_checkpointing=true"], ", activations recomputed")}
# system -> (label, speed goal: finetune's tokens/s at least this multiple, memory goal: at most this fraction)
BASELINES = {"baseline": ("peft + Trainer (padding per batch)", 1.5, 0.6),
             "trl-bfd": ("TRL SFTTrainer + peft, packing bfd (padding-free)", 2.5, 0.5),
             "trl-wrapped": ("TRL SFTTrainer + peft, packing wrapped", 2.0, 0.5),
             "trl-nopack": ("TRL SFTTrainer + peft, no packing (padding per batch)", None, None)}


def parse_args(argv=None):
    p = bench_parser(__doc__, "throughput")
    p.add_argument("--data", default=DATA, help="GSM8K training records, jsonl {question, answer}")
    p.add_argument("--model", default="smollm2-135m", help="a `model` config option")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--reps", type=int, default=3, help="runs of each system, alternating")
    p.add_argument("--batch-size", type=int, default=8, help="baseline: examples per step")
    p.add_argument("--rows", default="auto", help="finetune: packed rows per step (auto: same tokens)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (packed row)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--loss-chunk", type=int, default=128, help="finetune's trainer.loss_chunk (its default)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    p.add_argument("--baseline-allocator", choices=("system", "jemalloc"), default="system",
                   help="the baselines' malloc: the C library's (as their users run them) or jemalloc preloaded")
    p.add_argument("--partial", type=int, default=4, metavar="N",
                   help="finetune-partial: trainer.checkpoint_every_n_layers (1 decoder layer in N recomputed)")
    p.add_argument("--partial-loss-chunk", type=int, default=None, metavar="N",
                   help="finetune-partial's trainer.loss_chunk (default: --loss-chunk)")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `finetune train` override (repeatable), e.g. trainer.gradient_checkpointing=true")
    p.add_argument("--systems", nargs="+", default=[*FINETUNE, *BASELINES], choices=[*FINETUNE, *BASELINES],
                   help="which systems to run (default: all; TRL's need `pip install trl`)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4 steps (1 warm-up), 1 rep, batch 2, max length 256")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    # internal: the worker processes
    p.add_argument("--worker", choices=("prepare", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        for key, value in dict(steps=4, warmup_steps=1, reps=1, batch_size=2, max_length=256).items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.warmup_steps >= args.steps:
        p.error("--warmup-steps must be smaller than --steps")
    return args


# --------------------------------------------------------------------------------------------
# Data: finetune's gsm8k task builds the examples for both sides
# --------------------------------------------------------------------------------------------


def task_overrides(spec: dict, packing: bool) -> list[str]:
    return [f"model={spec['model']}", "method=lora", "task=gsm8k", f"task.data.path={spec['data']}",
            f"task.max_length={spec['max_length']}", f"task.packing={'true' if packing else 'false'}",
            "task.on_overflow=truncate"]


def build_examples(spec: dict, packing: bool):
    from finetune.config.compose import compose
    from finetune.models.tokenizer import load_tokenizer
    from finetune.tasks import build_task

    cfg = compose(task_overrides(spec, packing))
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, build_task(cfg.task, tokenizer).train_examples()


def worker_prepare(spec: dict) -> None:
    """Tokenize once (finetune's data cache) and report the lengths that size the packed batch."""
    _, _, plain = build_examples(spec, packing=False)
    _, _, packed = build_examples(spec, packing=True)
    lengths, rows = plain.lengths(), packed.lengths()
    stats = {"examples": int(len(lengths)), "mean_example_tokens": float(lengths.mean()),
             "max_example_tokens": int(lengths.max()), "packed_rows": int(len(rows)),
             "mean_row_tokens": float(rows.mean()), "max_length": spec["max_length"]}
    Path(spec["result"]).write_text(json.dumps(stats))


# --------------------------------------------------------------------------------------------
# The baseline: peft + transformers Trainer
# --------------------------------------------------------------------------------------------


def worker_baseline(spec: dict) -> None:
    """One run of a baseline: ``spec["system"]`` is ``baseline`` (peft + Trainer) or ``trl-*``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from finetune.environment import allocator_in_use
    from finetune.models.load import source_dir

    cfg, tokenizer, examples = build_examples(spec, packing=False)
    rows = [dict(ex, attention_mask=[1] * len(ex["input_ids"])) for ex in examples]
    cuda = spec["device"] == "cuda"
    model = AutoModelForCausalLM.from_pretrained(source_dir(cfg.model),
                                                 dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    trl = spec["system"].startswith("trl")
    if not trl:
        model = get_peft_model(model, lora)
    batches = []  # (non-padding tokens, padded tokens) of each collated batch, in order

    def counted(collator):
        def collate(features):
            batch = collator(features)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())  # padding-free: all real
            batches.append((real, int(batch["input_ids"].numel())))
            return batch
        return collate

    step_ends, losses = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_ends.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    out_dir = tempfile.mkdtemp(prefix="bench-baseline-")
    common = dict(
        output_dir=out_dir, gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to=[], seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
        use_cpu=not cuda, bf16=cuda, disable_tqdm=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if trl:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        packing = spec["system"] in ("trl-bfd", "trl-wrapped")
        targs = SFTConfig(**common, per_device_train_batch_size=spec["rows"] if packing else spec["batch_size"],
                          max_length=spec["max_length"], packing=packing,
                          gradient_checkpointing=True,  # SFTConfig's own default, spelled out
                          packing_strategy="wrapped" if spec["system"] == "trl-wrapped" else "bfd")
        data = Dataset.from_list([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples])
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora, callbacks=[Clock()])
        trainer.data_collator = counted(trainer.data_collator)
    else:
        targs = TrainingArguments(**common, per_device_train_batch_size=spec["batch_size"], remove_unused_columns=False)
        collate = counted(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    n = spec["steps"]
    result = {"step_end_times": step_ends[1:n + 1], "train_begin": step_ends[0],
              "tokens_per_step": [b[0] for b in batches[:n]], "padded_tokens_per_step": [b[1] for b in batches[:n]],
              "losses": losses[:n], "trainable_params": trainable, "allocator": allocator_in_use(),
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def throughput(times: list[float], tokens: list[int], warmup: int) -> float | None:
    """Tokens of steps warmup+1..N over the time from the end of step ``warmup`` to the end of N."""
    if len(times) <= warmup or warmup < 1:
        return None
    elapsed = times[-1] - times[warmup - 1]
    return sum(tokens[warmup:len(times)]) / elapsed if elapsed > 0 else None


def timed_mfu(steps: list[dict], tokens: list[int], warmup: int) -> float | None:
    """MFU over the steps tokens/s counts (after the warm-up): each step's logged MFU weighted by
    the step's own seconds (its tokens over its tokens/s), i.e. its FLOPs over their time."""
    window = [(r["mfu"], n / r["tokens_per_s"]) for r, n in zip(steps[warmup:], tokens[warmup:])
              if r.get("mfu") and r.get("tokens_per_s")]
    seconds = sum(sec for _, sec in window)
    return sum(m * sec for m, sec in window) / seconds if seconds else None


def loss_chunk(args, system: str) -> int:
    partial = system == "finetune-partial" and args.partial_loss_chunk is not None
    return args.partial_loss_chunk if partial else args.loss_chunk


def run_finetune(args, spec: dict, system: str, rows: int, rep: int, work: Path, env: dict) -> dict:
    out = work / f"{system}-{rep}"
    overrides = task_overrides(spec, packing=True) + [
        f"method.rank={args.rank}", f"method.alpha={args.alpha}", "method.dropout=0.0",
        "task.eval_limit=1", "task.max_new_tokens=1",  # a trivial end-of-run evaluation
        f"trainer.batch_size={rows}", "trainer.grad_accum=1", f"trainer.max_steps={args.steps}",
        f"trainer.lr={args.lr}", "trainer.schedule=linear", "trainer.warmup_steps=0",
        "trainer.weight_decay=0.0", "trainer.max_grad_norm=1.0", f"trainer.loss_chunk={loss_chunk(args, system)}",
        f"trainer.seed={spec['seed']}", f"trainer.device={args.device}", "trainer.merge=false", "logger=none",
        "trainer.overwrite=true", f"output_dir={out}", *(o.format(partial=args.partial) for o in FINETUNE[system][0]),
        *args.finetune_override]
    cmd = [sys.executable, "-m", "finetune", "train", "-q", *overrides]
    res = run_measured(cmd, work / f"{system}-{rep}.log", env=env, timeout=args.timeout)
    check_ok(res, "finetune train")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens" in r and "time" in r and "loss" in r]
    info = json.loads((out / "run.json").read_text())
    cumulative = [r["tokens"] for r in steps]
    tokens = [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]
    times = [r["time"] for r in steps]
    params = info.get("params") or {}
    mfu = info.get("mfu") or {}
    return {"system": system, "rep": rep, "tokens_per_s": throughput(times, tokens, args.warmup_steps),
            "mfu": mfu.get("mfu"), "mfu_timed_steps": timed_mfu(steps, tokens, args.warmup_steps),
            "peak_flops_per_s": mfu.get("peak_flops_per_s"),
            "tokens_per_step": sum(tokens) / max(len(tokens), 1), "padding_pct": None,
            "peak_rss_mb": res["peak_rss_mb"],
            "cuda_peak_mb": info.get("peak_memory_mb") if args.device == "cuda" else None,
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "steps": len(steps), "trainable_params": params.get("trainable_params"),
            "process_wall_s": res["wall_s"], "log": res["log"], "command": "finetune train " + " ".join(overrides),
            "allocator": info.get("environment", {}).get("allocator")}


def run_baseline(args, spec: dict, system: str, rows: int, rep: int, work: Path, env: dict) -> dict:
    result_file = work / f"{system}-{rep}.json"
    bspec = dict(spec, result=str(result_file), system=system, rows=rows)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "baseline", "--spec", json.dumps(bspec)]
    if args.baseline_allocator == "jemalloc":
        from finetune.allocator import find_jemalloc, with_jemalloc

        if find_jemalloc() is None:
            sys.exit("--baseline-allocator jemalloc: no jemalloc library found (Debian/Ubuntu: apt install libjemalloc2)")
        env = with_jemalloc(env, find_jemalloc())  # as finetune train sets it up
    res = run_measured(cmd, work / f"{system}-{rep}.log", env=env, timeout=args.timeout)
    check_ok(res, BASELINES[system][0])
    r = json.loads(result_file.read_text())
    tokens, padded = r["tokens_per_step"], r["padded_tokens_per_step"]
    return {"system": system, "rep": rep,
            "tokens_per_s": throughput(r["step_end_times"], tokens, args.warmup_steps),
            "tokens_per_step": sum(tokens) / max(len(tokens), 1),
            "padding_pct": 100.0 * (1 - sum(tokens) / max(sum(padded), 1)),
            "peak_rss_mb": res["peak_rss_mb"], "cuda_peak_mb": r["cuda_peak_mb"],
            "first_loss": r["losses"][0] if r["losses"] else None,
            "last_loss": r["losses"][-1] if r["losses"] else None, "steps": len(r["step_end_times"]),
            "trainable_params": r["trainable_params"], "process_wall_s": res["wall_s"], "log": res["log"],
            "allocator": r["allocator"]}


def summarise(runs: list[dict], device: str) -> dict:
    memory_key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
    out = {}
    for system in (*FINETUNE, *BASELINES):
        mine = [r for r in runs if r["system"] == system]
        if mine:
            out[system] = {"tokens_per_s": median([r["tokens_per_s"] for r in mine]),
                           "peak_memory_mb": median([r[memory_key] for r in mine]),
                           "peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
                           "tokens_per_step": median([r["tokens_per_step"] for r in mine]),
                           "padding_pct": median([r["padding_pct"] for r in mine]),
                           "last_loss": median([r["last_loss"] for r in mine]),
                           "trainable_params": mine[0]["trainable_params"], "runs": len(mine)}
    out["ratios"] = {}  # "finetune system / baseline" -> ratios and goals
    for mine, (system, (_, speed_goal, memory_goal)) in ((m, b) for m in FINETUNE for b in BASELINES.items()):
        if mine not in out or system not in out:
            continue
        f, b = out[mine], out[system]
        speed = f["tokens_per_s"] / b["tokens_per_s"] if f["tokens_per_s"] and b["tokens_per_s"] else None
        memory = f["peak_memory_mb"] / b["peak_memory_mb"] if f["peak_memory_mb"] and b["peak_memory_mb"] else None
        out["ratios"][f"{mine}/{system}"] = {
            "finetune": mine, "baseline": system, "speed": speed, "memory": memory,
            "speed_goal": speed_goal, "speed_goal_met": None if speed_goal is None else bool(speed and speed >= speed_goal),
            "memory_goal": memory_goal,
            "memory_goal_met": None if memory_goal is None else bool(memory and memory <= memory_goal)}
    out["memory_measure"] = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS of the process (ru_maxrss)"
    return out


def mfu_line(runs: list[dict]) -> list[str]:
    """What finetune's MFU column is measured against (its run.json: training steps only, the
    model's own FLOPs per token over the device's peak; the baselines have none)."""
    peaks = sorted({r["peak_flops_per_s"] for r in runs if r.get("peak_flops_per_s")})
    if not peaks:
        return []
    return [f"MFU: finetune's run.json over all its training steps, and over the steps tokens/s counts "
            f"(the warm-up left out, as for tokens/s), against a peak of "
            f"{' / '.join(f'{p / 1e9:,.0f}' for p in peaks)} GFLOP/s (finetune.training.flops).", ""]


def markdown(args, spec, rows, stats, summary, runs, info) -> str:
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    table = []
    labels = {**{k: f"`finetune train` (packing, loss_chunk={loss_chunk(args, k)}{suffix.format(partial=args.partial)})"
                 for k, (_, suffix) in FINETUNE.items()},
              **{k: v[0] for k, v in BASELINES.items()}}
    for system, label in labels.items():
        s = summary.get(system)
        if s:
            pad = "0 (packed)" if system in FINETUNE else f"{s['padding_pct']:.1f}"
            table.append([label, f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "-",
                          f"{s['peak_memory_mb']:,.0f}", f"{s['tokens_per_step']:,.0f}", pad,
                          f"{s['last_loss']:.3f}" if s["last_loss"] is not None else "-",
                          f"{s['trainable_params']:,}" if s["trainable_params"] else "-"])
    def ratio(value, goal, met, sign):
        if value is None:
            return "-"
        return f"**{value:.2f}x**" + ("" if goal is None else f" (goal {sign} {goal}x: {'met' if met else 'not met'})")

    for r in summary.get("ratios", {}).values():
        table.append([f"**{r['finetune']} / {labels[r['baseline']]}**", ratio(r["speed"], r["speed_goal"], r["speed_goal_met"], ">="),
                      ratio(r["memory"], r["memory_goal"], r["memory_goal_met"], "<="), "", "", "", ""])
    lines = [f"# Training throughput: finetune vs peft + Trainer and TRL ({args.device})", "",
             f"Hardware: {hardware_line(info)}.", "",
             f"Job: {args.model}, LoRA r={args.rank} alpha={args.alpha:g} on all 7 projections, lr {args.lr:g} "
             f"linear, AdamW, {args.steps} optimizer steps (tokens/s over the last {args.steps - args.warmup_steps}), "
             f"GSM8K train ({stats['examples']} examples, mean {stats['mean_example_tokens']:.0f} tokens), "
             f"max length {args.max_length}; {args.batch_size} examples per step without packing, {rows} packed rows "
             f"per step with it (finetune: mean {stats['mean_row_tokens']:.0f} tokens per row). Median of {args.reps} alternating "
             "runs each, every run in its own process.", "",
             md_table(["system", "non-padding tokens/s", mem, "tokens/step", "padding %", "last loss",
                       "trainable params"], table), "",
             "Per run:", "",
             md_table(["rep", "system", "tokens/s", "MFU (all steps)", "MFU (timed steps)", "peak RSS MiB",
                       "CUDA peak MiB", "process wall s", "allocator"],
                      [[r["rep"], r["system"], f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-",
                        f"{r['mfu']:.0%}" if r.get("mfu") else "-",
                        f"{r['mfu_timed_steps']:.0%}" if r.get("mfu_timed_steps") else "-",
                        f"{r['peak_rss_mb']:,.0f}", f"{r['cuda_peak_mb']:,.0f}" if r["cuda_peak_mb"] else "-",
                        f"{r['process_wall_s']:.0f}", r["allocator"]] for r in runs]), "",
             *mfu_line(runs),
             "Command: `python scripts/bench_throughput.py " + " ".join(sys.argv[1:]) + "`"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        {"prepare": worker_prepare, "baseline": worker_baseline}[args.worker](spec)
        return
    if not Path(args.data).is_file():
        sys.exit(f"--data {args.data}: no such file (GSM8K train split as jsonl with question/answer)")
    info = hardware_info(args.device)
    print_hardware(info)
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    env = child_env(args.threads)
    spec = {"model": args.model, "data": str(Path(args.data).resolve()), "max_length": args.max_length,
            "device": args.device, "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank,
            "alpha": args.alpha, "lr": args.lr, "seed": 42}

    print("preparing the data (tokenized once into finetune's cache) ...", flush=True)
    stats_file = work / "data.json"
    prep = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", "prepare", "--spec",
                         json.dumps(dict(spec, result=str(stats_file)))], work / "prepare.log", env=env)
    check_ok(prep, "data preparation")
    stats = json.loads(stats_file.read_text())
    if args.rows == "auto":
        rows = max(1, round(args.batch_size * stats["mean_example_tokens"] / args.max_length))
    else:
        rows = int(args.rows)
    print(f"data: {stats['examples']} examples, mean {stats['mean_example_tokens']:.0f} tokens -> "
          f"{stats['packed_rows']} packed rows of <= {args.max_length} (mean {stats['mean_row_tokens']:.0f}); "
          f"baseline {args.batch_size} examples/step, finetune {rows} rows/step", flush=True)

    runs = []
    systems = args.systems
    for rep in range(args.reps):
        order = systems if rep % 2 == 0 else systems[::-1]
        for system in order:
            print(f"rep {rep + 1}/{args.reps}: {system} ...", end=" ", flush=True)
            r = (run_finetune(args, spec, system, rows, rep, work, env) if system in FINETUNE
                 else run_baseline(args, spec, system, rows, rep, work, env))
            mem = r["cuda_peak_mb"] if args.device == "cuda" else r["peak_rss_mb"]
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
            print(f"{tps} tokens/s, peak {mem:,.0f} MiB, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} "
                  f"({r['process_wall_s']:.0f} s)", flush=True)
            runs.append(r)

    summary = summarise(runs, args.device)
    md = markdown(args, spec, rows, stats, summary, runs, info)
    print()
    print(md)
    write_outputs(output_path(args, "throughput"),
                  {"benchmark": "throughput", "hardware": info, "settings": vars(args) | {"rows": rows},
                   "data": stats, "summary": summary, "runs": runs, "work_dir": str(work)}, md)


if __name__ == "__main__":
    main()
