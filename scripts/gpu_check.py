#!/usr/bin/env python
"""GPU acceptance: in one command (a few minutes on one GPU), everything the CPU suite cannot run.

    1. bf16 autocast: every method (LoRA, MoRA types 6 and 1, VB-LoRA, full) trains --steps steps on
       the embedded SmolLM2-135M; the loss must stay finite and end below where it started; each run
       merges, and the merged model (loaded by plain transformers) must give the adapted model's
       logits (bf16 bound).
    2. bitsandbytes CUDA kernels: LoRA, MoRA and VB-LoRA on a 4-bit (NF4) and an 8-bit (LLM.int8)
       base, trained and merged; the merged dense model must give the adapted quantized model's
       logits (4-bit: the bf16 bound; 8-bit: int8 activation rounding, a looser bound).
    3. FSDP2 and ZeRO-3 with one process on CUDA (their sharding code runs at world size 1): LoRA
       and full fine-tuning must follow the one-process (launcher=none) run's losses.
    4. Per method: non-padding tokens/s over the steps after the first, model FLOPs utilisation
       (MFU: 6 FLOPs per trained parameter and token, 4 per frozen one — forward plus the input
       gradient —, over the GPU's datasheet dense bf16 peak), peak CUDA memory.

Prints one table, writes JSON and Markdown (default docs/bench/gpu-check.{json,md}), and exits 1
when any check failed. Needs CUDA, bitsandbytes with CUDA kernels, and deepspeed. ``--smoke`` runs
the same checks on the CPU with the tiny model (a test of the script, not of a GPU).

    python scripts/gpu_check.py
    python scripts/gpu_check.py --steps 30 --out /tmp/gpu-check
    python scripts/gpu_check.py --smoke --out /tmp/gpu-check-smoke
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_OUT, hardware_info, hardware_line, md_table, print_hardware, write_outputs  # noqa: E402

# Datasheet dense bf16 tensor-core peaks (FLOP/s), by a substring of the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "B200": 2250e12, "GH200": 989e12}
METHODS = {"lora": ["method=lora"], "mora6": ["method=mora", "method.type=6"],
           "mora1": ["method=mora", "method.type=1", "method.rank=64"], "vblora": ["method=vblora"],
           "full": ["method=full", "method.lr=2e-5"]}
COMMON = ["task.eval_limit=4", "task.max_new_tokens=8", "logger=none", "trainer.warmup_steps=2"]
GPU = ["model=smollm2-135m", "trainer.device=cuda"]
SMOKE = ["model=tiny", "trainer.device=cpu", "trainer.precision=bf16"]


def peak_flops() -> float | None:
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in sorted(BF16_PEAK.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def train_run(out: Path, overrides: list[str]) -> dict:
    """Train in this process; return run.json plus the per-step records."""
    from accelerate.state import AcceleratorState

    from finetune.config.compose import compose
    from finetune.training.loop import train

    overrides = [*overrides, f"output_dir={out}"]
    try:
        train(compose(overrides), overrides, quiet=True)
    finally:
        AcceleratorState._reset_state()
    info = json.loads((out / "run.json").read_text())
    info["steps_log"] = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return info


def speed(info: dict, peak: float | None) -> dict:
    """Tokens/s after the first step, MFU, peak memory."""
    log = info["steps_log"]
    tokens = log[-1]["tokens"] - log[0]["tokens"]
    seconds = log[-1]["time"] - log[0]["time"]
    tps = tokens / seconds if seconds > 0 else float("nan")
    params = info["params"]
    total = params["base_params"]
    trained = params["trainable_params"]
    frozen = max(total - trained, 0) if info.get("method") != "full" else 0
    flops_per_token = 6 * trained + 4 * frozen
    mfu = tps * flops_per_token / peak if peak else None
    return {"tokens_per_s": tps, "mfu": mfu, "peak_memory_mb": info.get("peak_memory_mb")}


def merged_matches(run: Path, atol: float, device: str) -> float:
    """Largest |logit| difference between the adapted run (finetune) and its merged model (plain
    transformers), on a fixed batch; raises when above ``atol``."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.run.load import load_run

    model, _, tokenizer, _ = load_run(run, device)
    ids = torch.randint(0, min(len(tokenizer), 2000), (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    if next(model.parameters()).device.type != device:  # quantized bases load on the device already
        model = model.to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        adapted = model(input_ids=ids).logits.float()
    del model
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).to(device).eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        plain = merged(input_ids=ids).logits.float()
    diff = (adapted - plain).abs().max().item()
    if not diff <= atol:
        raise AssertionError(f"merged logits differ from the adapted model's by {diff:.3g} (> {atol})")
    return diff


def check_loss(info: dict) -> None:
    losses = [r["loss"] for r in info["steps_log"]]
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(DEFAULT_OUT / "gpu-check"))
    p.add_argument("--smoke", action="store_true", help="the same checks on the CPU with the tiny model")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    info = hardware_info(device)
    print_hardware(info)
    peak = None if args.smoke else peak_flops()
    work = Path(tempfile.mkdtemp(prefix="finetune-gpu-check-"))
    base = [*COMMON, *(SMOKE if args.smoke else GPU)]
    steps = [f"trainer.max_steps={6 if args.smoke else args.steps}"]
    results = []

    def check(name: str, fn):
        start = time.time()
        print(f"{name} ...", flush=True)
        try:
            detail = fn() or {}
            results.append({"check": name, "ok": True, **detail, "seconds": time.time() - start})
        except Exception as e:  # every failure is reported, the others still run
            traceback.print_exc()
            results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                            "seconds": time.time() - start})
        print(f"  {'ok' if results[-1]['ok'] else 'FAILED: ' + results[-1]['error']}", flush=True)

    def bf16(method):
        def run():
            out = work / f"bf16-{method}"
            info_ = train_run(out, [*base, *METHODS[method], *steps])
            check_loss(info_)
            return {**speed(info_, peak), "merged_max_logit_diff": merged_matches(out, 0.25, device)}
        return run

    def quantized(method, bits):
        def run():
            out = work / f"{bits}-{method}"
            info_ = train_run(out, [*base, *METHODS[method], f"model.quantize={bits}", *steps])
            check_loss(info_)
            atol = 0.25 if bits == "4bit" else 1.0
            return {**speed(info_, peak), "merged_max_logit_diff": merged_matches(out, atol, device)}
        return run

    reference = {}  # method -> the one-process losses

    def sharded(method, launcher):
        def run():
            if method not in reference:
                reference[method] = [r["loss"] for r in train_run(
                    work / f"none-{method}", [*base, *METHODS[method], *steps, "trainer.merge=false"])["steps_log"]]
            one = reference[method]
            info_ = train_run(work / f"{launcher}-{method}", [*base, *METHODS[method], *steps, "trainer.merge=false",
                                                             f"launcher={launcher}", "launcher.num_processes=1"])
            got = [r["loss"] for r in info_["steps_log"]]
            worst = max(abs(a - b) for a, b in zip(one, got, strict=True))
            if worst > 0.05:
                raise AssertionError(f"{launcher} losses differ from one process by up to {worst:.3g}")
            return {**speed(info_, peak), "max_loss_diff_vs_one_process": worst}
        return run

    for method in METHODS:
        check(f"bf16 {method}", bf16(method))
    for bits in ("4bit", "8bit"):
        for method in ("lora", "mora6", "vblora"):
            check(f"{bits} {method}", quantized(method, bits))
    for launcher in ("fsdp", "deepspeed"):
        for method in ("lora", "full"):
            check(f"{launcher} x1 {method}", sharded(method, launcher))

    headers = ["check", "ok", "tokens/s", "MFU %", "peak MiB (CUDA; --smoke: RSS)", "detail", "s"]
    rows = []
    for r in results:
        detail = r.get("error") or ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k.startswith(("merged", "max_")))
        rows.append([r["check"], "yes" if r["ok"] else "NO", f"{r.get('tokens_per_s', float('nan')):,.0f}",
                     f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-",
                     f"{r['peak_memory_mb']:,.0f}" if r.get("peak_memory_mb") is not None else "-", detail,
                     f"{r['seconds']:.0f}"])
    table = md_table(headers, rows)
    print("\n" + table)
    markdown = (f"# GPU acceptance check\n\n{hardware_line(info)}; bf16 peak {peak or 'unknown'} FLOP/s\n\n"
                f"`python scripts/gpu_check.py --steps {args.steps}`\n\n{table}\n")
    write_outputs(Path(args.out), {"hardware": info, "peak_bf16_flops": peak, "results": results}, markdown)
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
