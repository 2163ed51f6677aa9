"""Helpers shared by the benchmark scripts (bench_throughput, bench_merge, bench_startup,
reproduce_memorization): the hardware a result was measured on, child processes measured one by
one (wall time and peak resident set size from the kernel's own accounting), and results written
as JSON next to a Markdown table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "docs" / "bench"


def hardware_info(device: str) -> dict:
    """Where a benchmark ran: CPU model and cores, memory, GPU, library versions, git commit and the
    load average (a busy machine makes every number here slower and noisier)."""
    from finetune.environment import git_state, hardware, versions

    info = {"device": device, **hardware(), **versions(), **git_state(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible to torch")
    return info


def print_hardware(info: dict) -> None:
    gpu = f", GPU {info['gpu']} ({info.get('gpu_memory_gb')} GiB)" if info.get("gpu") else ""
    print(f"hardware: {info.get('cpu')}, {info.get('cpu_cores_usable')} usable cores "
          f"(torch threads {info.get('torch_threads')}), {info.get('memory_gb')} GiB RAM{gpu}; "
          f"load average {info.get('load_average_1m_at_start')}", flush=True)
    print(f"software: torch {info.get('torch')}, transformers {info.get('transformers')}, "
          f"peft {info.get('peft', '-')}, python {info.get('python')}, commit "
          f"{str(info.get('git_commit', '?'))[:10]}{' (dirty)' if info.get('git_dirty') else ''}", flush=True)


def child_env(threads: int | None = None, **extra) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None,
                 cwd: Path | None = None) -> dict:
    """Run ``cmd`` as its own process; return its exit code, wall time and peak RSS (MiB, the
    kernel's ru_maxrss of that child: separate for every run). Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # blocks; the rusage of this child only
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "log": str(log)}


def check_ok(result: dict, what: str) -> None:
    if result["returncode"] != 0:
        tail = Path(result["log"]).read_text(errors="replace").strip().splitlines()[-15:]
        sys.exit(f"{what} failed (exit {result['returncode']}); last lines of {result['log']}:\n"
                 + "\n".join(tail))


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def hardware_line(info: dict) -> str:
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return (f"{info.get('cpu')} ({info.get('cpu_cores_usable')} cores, {info.get('memory_gb')} GiB){gpu}; "
            f"torch {info.get('torch')}, transformers {info.get('transformers')}, peft {info.get('peft', '-')}; "
            f"load average {info.get('load_average_1m_at_start')} at start")


def md_heading(title: str, info: dict, *more: str) -> str:
    """A result page's title, then the command that made it (this script and its arguments), the date,
    the hardware and any ``more`` lines."""
    command = " ".join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", f"Hardware: {hardware_line(info)}", *more]
    return f"# {title}\n\n" + "  \n".join(lines) + "\n\n"


def write_outputs(out: Path, data: dict, markdown: str) -> tuple[Path, Path]:
    """``out``.json and ``out``.md (``out`` without suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**data, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    print(f"\nwrote {json_path} and {md_path}", flush=True)
    return json_path, md_path


def median(values):
    import statistics

    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The argument parser every script starts from: the first paragraph of its docstring as the
    description, ``--device`` and ``--out`` (default ``docs/bench/<name>-<device>``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None,
                   help=f"output path without suffix: writes .json and .md (default docs/bench/{name}-<device>)")
    return p


def output_path(args, name: str) -> Path:
    """``--out``, else ``docs/bench/<name>-<device>`` (``--quick``: under the temporary directory)."""
    if args.out:
        return Path(args.out)
    if getattr(args, "quick", False):
        return Path(tempfile.gettempdir()) / "finetune-bench" / f"{name}-{args.device}-quick"
    return DEFAULT_OUT / f"{name}-{args.device}"
