#!/usr/bin/env python
"""Merge time and peak memory: `finetune merge` against peft's merge_and_unload + save_pretrained,
on the same LoRA adapter, each run in its own process, alternating.

    finetune   `finetune merge RUN --out DIR --dtype D`: base + adapter loaded, ΔW added in fp32,
               the merged weights converted and written tensor by tensor (finetune.outputs.merge).
    peft       the same adapter exported with `finetune export --format peft`, then what a peft user
               runs: AutoModelForCausalLM.from_pretrained(base) -> PeftModel.from_pretrained ->
               merge_and_unload() -> .to(D) -> save_pretrained (+ the tokenizer, as finetune does).
               The base loads in fp32 by default (--peft-load-dtype), so that both add ΔW in fp32
               and write the same weights (checked); `--peft-load-dtype output` loads it directly in
               D, as many users do (less memory, ΔW rounded in D).

Measured per run: wall time of the whole command (Python start-up and imports included) and peak
memory: the process's peak resident set size from the kernel (ru_maxrss via wait4); on --device
cuda peft's base loads on the GPU and its CUDA peak is reported too (finetune merge works on the
CPU, streaming, whatever the device). Summary: medians over --reps runs and the ratios. The
merged outputs are compared tensor by tensor.

Without --run, a LoRA run on the embedded model is made first (`finetune train`, 1 step at a
large learning rate so that ΔW is not zero; a minute or two).

    python scripts/bench_merge.py --quick
    python scripts/bench_merge.py --reps 3 --dtype bfloat16
    python scripts/bench_merge.py --run outputs/memorize/lora/<timestamp> --dtype float32

Writes docs/bench/merge-<device>.json and .md (--quick: under /tmp unless --out is given).
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


def parse_args(argv=None):
    p = bench_parser(__doc__, "merge")
    p.add_argument("--run", default=None, help="an existing finetune LoRA run directory (default: make one)")
    p.add_argument("--model", default="smollm2-135m", help="model for the run made without --run")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the run made without --run")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                   help="dtype of the merged weights (both sides)")
    p.add_argument("--peft-load-dtype", choices=("float32", "output"), default="float32",
                   help="dtype peft loads the base in: float32 (same arithmetic as finetune) or the output dtype")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 rep")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", choices=("peft",), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.reps == p.get_default("reps"):
        args.reps = 1
    return args


# --------------------------------------------------------------------------------------------
# The peft side (a worker process)
# --------------------------------------------------------------------------------------------


def worker_peft(spec: dict) -> None:
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter()
    cuda = spec["device"] == "cuda"
    out_dtype = getattr(torch, spec["dtype"])
    load_dtype = torch.float32 if spec["load_dtype"] == "float32" else out_dtype
    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=load_dtype,
                                                device_map={"": 0} if cuda else None)
    model = PeftModel.from_pretrained(base, spec["adapter"])
    t_load = time.perf_counter()
    merged = model.merge_and_unload()
    merged = merged.to(out_dtype)
    t_merge = time.perf_counter()
    merged.save_pretrained(spec["out"], safe_serialization=True)
    AutoTokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(spec["out"])
    t_save = time.perf_counter()
    Path(spec["result"]).write_text(json.dumps({
        "import_s": t_import - t0, "load_s": t_load - t_import, "merge_s": t_merge - t_load,
        "save_s": t_save - t_merge, "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


# --------------------------------------------------------------------------------------------
# Preparation and comparison
# --------------------------------------------------------------------------------------------


def make_run(args, work: Path, env: dict) -> Path:
    run = work / "run"
    overrides = [f"model={args.model}", "method=lora", f"method.rank={args.rank}", "task=memorize",
                 "task.num_pairs=8", "task.eval_limit=1", "task.max_new_tokens=1", "trainer.max_steps=1",
                 "trainer.batch_size=2", "trainer.lr=1e-2", "trainer.schedule=constant", "trainer.merge=false",
                 "trainer.device=cpu", f"output_dir={run}", "trainer.overwrite=true"]
    print("making a LoRA run to merge (finetune train, 1 step) ...", flush=True)
    res = run_measured([sys.executable, "-m", "finetune", "train", "-q", *overrides], work / "train.log", env=env,
                       timeout=args.timeout)
    check_ok(res, "finetune train")
    return run


def base_and_tokenizer(run: Path) -> tuple[str, str]:
    """Where the run's base weights and tokenizer are (what a peft user would load)."""
    from finetune.models.load import source_dir
    from finetune.run.directory import read_config

    if (run / "base").is_dir():
        base = str(run / "base")
    else:
        base = source_dir(read_config(run).model)
    tokenizer = str(run / "tokenizer") if (run / "tokenizer").is_dir() else base
    return base, tokenizer


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return [directory / "model.safetensors"]


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two merged model directories."""
    from safetensors import safe_open

    def handles(directory):
        out = {}
        for f in weight_files(directory):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                out[k] = h
        return out

    ha, hb = handles(a), handles(b)
    keys_a, keys_b = set(ha), set(hb)
    worst, worst_key, dtypes = 0.0, None, set()
    for k in sorted(keys_a & keys_b):
        x, y = ha[k].get_tensor(k), hb[k].get_tensor(k)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            return {"same_keys": keys_a == keys_b, "shape_mismatch": k}
        d = (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
        if d > worst:
            worst, worst_key = d, k
    return {"same_keys": keys_a == keys_b, "only_finetune": sorted(keys_a - keys_b)[:5],
            "only_peft": sorted(keys_b - keys_a)[:5], "max_abs_diff": worst, "worst_tensor": worst_key,
            "dtypes": sorted(dtypes)}


def dir_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in weight_files(directory)) / 2**20


def fp32_mb(directory: Path) -> float:
    """The model's size in fp32 (how `finetune merge` and the peft baseline hold it in memory)."""
    from safetensors import safe_open

    n = 0
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
    return n * 4 / 2**20


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_peft(json.loads(args.spec))
        return
    info = hardware_info(args.device)
    print_hardware(info)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    env = child_env(args.threads)
    run = Path(args.run).resolve() if args.run else make_run(args, work, env)
    adapter_meta = json.loads((run / "adapter.json").read_text())
    if adapter_meta.get("method") != "lora":
        sys.exit(f"--run {run}: a {adapter_meta.get('method')} run; peft can only merge the LoRA ones")
    peft_dir = work / "peft-adapter"
    res = run_measured([sys.executable, "-m", "finetune", "export", str(run), "--format", "peft", "--out",
                        str(peft_dir)], work / "export.log", env=env)
    check_ok(res, "finetune export --format peft")
    base, tokenizer = base_and_tokenizer(run)

    runs = []
    for rep in range(args.reps):
        order = ("finetune", "peft") if rep % 2 == 0 else ("peft", "finetune")
        for system in order:
            out = work / f"merged-{system}"
            if system == "finetune":
                cmd = [sys.executable, "-m", "finetune", "merge", str(run), "--out", str(out), "--dtype", args.dtype]
                res = run_measured(cmd, work / f"finetune-{rep}.log", env=env, timeout=args.timeout)
                check_ok(res, "finetune merge")
                extra = {}
            else:
                result = work / f"peft-{rep}.json"
                spec = {"device": args.device, "dtype": args.dtype, "load_dtype": args.peft_load_dtype,
                        "base": base, "adapter": str(peft_dir), "tokenizer": tokenizer, "out": str(out),
                        "result": str(result)}
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "peft", "--spec", json.dumps(spec)]
                res = run_measured(cmd, work / f"peft-{rep}.log", env=env, timeout=args.timeout)
                check_ok(res, "peft merge_and_unload + save_pretrained")
                extra = json.loads(result.read_text())
            r = {"system": system, "rep": rep, "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], **extra}
            runs.append(r)
            print(f"rep {rep + 1}/{args.reps}: {system:8s} {r['wall_s']:6.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MiB",
                  flush=True)

    check = compare(work / "merged-finetune", work / "merged-peft")
    size = dir_mb(work / "merged-finetune")
    summary = {}
    for system in ("finetune", "peft"):
        mine = [r for r in runs if r["system"] == system]
        summary[system] = {"wall_s": median([r["wall_s"] for r in mine]),
                           "peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
                           "cuda_peak_mb": median([r.get("cuda_peak_mb") for r in mine])}
    f, p = summary["finetune"], summary["peft"]
    summary["time_ratio"] = f["wall_s"] / p["wall_s"]
    summary["memory_ratio"] = f["peak_rss_mb"] / p["peak_rss_mb"]
    summary["merged_weights_mb"] = size
    summary["model_fp32_mb"] = fp32 = fp32_mb(work / "merged-finetune")
    summary["finetune_peak_minus_fp32_model_mb"] = f["peak_rss_mb"] - fp32

    rows = [["`finetune merge`", f"{f['wall_s']:.1f}", f"{f['peak_rss_mb']:,.0f}", "-"],
            [f"peft merge_and_unload + save_pretrained (base in {args.peft_load_dtype})", f"{p['wall_s']:.1f}",
             f"{p['peak_rss_mb']:,.0f}", f"{p['cuda_peak_mb']:,.0f}" if p["cuda_peak_mb"] else "-"],
            ["**ratio finetune / peft**", f"**{summary['time_ratio']:.2f}x**", f"**{summary['memory_ratio']:.2f}x**", ""]]
    diff = check.get("max_abs_diff")
    md = "\n".join([
        f"# Merge: finetune vs peft ({args.device})", "",
        f"Hardware: {hardware_line(info)}.", "",
        f"Adapter: {adapter_meta.get('method')} r={adapter_meta.get('settings', {}).get('rank')} on "
        f"{adapter_meta.get('base_model', {}).get('name', '?')}; merged weights written in {args.dtype} "
        f"({size:,.0f} MiB on disk). Median of {args.reps} alternating runs, each command in its own process "
        "(wall time includes Python start-up and imports).", "",
        md_table(["command", "wall s", "peak RSS MiB", "CUDA peak MiB"], rows), "",
        f"The model in fp32, as both load it: {fp32:,.0f} MiB; finetune's peak is that plus "
        f"{summary['finetune_peak_minus_fp32_model_mb']:,.0f} MiB (Python, torch, transformers, tokenizer, "
        "one tensor in flight). "
        f"Outputs: same tensors: {check.get('same_keys')}, largest difference "
        f"{diff if diff is not None else '?'} ({check.get('worst_tensor')}).", "",
        "Per run:", "",
        md_table(["rep", "system", "wall s", "peak RSS MiB"],
                 [[r["rep"], r["system"], f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:,.0f}"] for r in runs]), "",
        "Command: `python scripts/bench_merge.py " + " ".join(sys.argv[1:]) + "`"])
    print()
    print(md)
    write_outputs(output_path(args, "merge"),
                  {"benchmark": "merge", "hardware": info, "settings": vars(args), "run": str(run),
                   "summary": summary, "comparison": check, "runs": runs, "work_dir": str(work)}, md)


if __name__ == "__main__":
    main()
