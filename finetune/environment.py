"""The machine and the process: what a run ran on, so that a report can be trusted later (hardware:
CPU model and cores, memory, GPU name and memory; library versions; the git commit of the code),
the process (pid, host, start time: lets ``finetune runs`` tell a live run from one whose process
died; whether it is one rank of a launch, and the main one), where caches go, and peak memory (CUDA
allocator peak on GPU, the process's peak resident set size on CPU, reset at the start of each run
so runs of one sweep process are measured separately).

Nothing here imports torch at module scope: the CLI and ``finetune runs`` use these helpers.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "hydra-core", "safetensors",
            "finetune")


# --------------------------------------------------------------------------------------------
# Ranks and the cache
# --------------------------------------------------------------------------------------------


def in_launched_process() -> bool:
    """True in a process started by torchrun / accelerate launch (one of several ranks)."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """True unless a launcher (torchrun, accelerate launch) says this is not global rank 0."""
    return os.environ.get("RANK", "0") == "0"


def cache_dir() -> Path:
    """Where finetune caches converted models and tokenized data: FINETUNE_CACHE, else
    ``$XDG_CACHE_HOME/finetune`` or ``~/.cache/finetune``."""
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune")
    return Path(root)


# --------------------------------------------------------------------------------------------
# Versions and code
# --------------------------------------------------------------------------------------------


def versions() -> dict:
    """Installed versions of the libraries that change results (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state(path: Path | None = None) -> dict:
    """The commit of the finetune source tree and whether it had uncommitted changes ({} outside git)."""
    cwd = path or Path(__file__).parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=5)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {"git_commit": commit.stdout.strip()}
    if status.returncode == 0:
        out["git_dirty"] = bool(status.stdout.strip())
    return out


# --------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}


def hardware() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable_cores(),
            "torch_threads": torch.get_num_threads(), "memory_gb": memory_total_gb(),
            "platform": platform.platform(), "host": socket.gethostname(), **gpu_info()}


def allocator_in_use() -> str:
    """``jemalloc``, ``tcmalloc`` or ``mimalloc`` when such a library is mapped into this process,
    else ``system`` (the C library's malloc)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if f"lib{name}" in maps), "system")


def environment_info(device: str) -> dict:
    """Versions, hardware and git state for run.json's ``environment``."""
    return {**versions(), "device": device, **hardware(), "allocator": allocator_in_use(), **git_state()}


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def process_status_kb(field: str) -> float | None:
    """A kB figure of this process from Linux's /proc/self/status (``VmRSS``: resident now,
    ``VmHWM``: its high-water mark); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: str) -> None:
    """Start measuring the peak afresh (CUDA allocator stats; Linux resident-set high-water mark)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux or not allowed: the peak covers the whole process


def peak_memory_mb(device: str) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocated bytes, or CPU resident set size."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    kb = process_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


# --------------------------------------------------------------------------------------------
# The training process (live or gone)
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_identity() -> dict:
    """pid, host and start time of this process, recorded in run.json while a run trains."""
    pid = os.getpid()
    out = {"pid": pid, "host": socket.gethostname()}
    start = _process_start(pid)
    if start is not None:
        out["pid_start"] = start
    return out


def process_alive(info: dict) -> bool | None:
    """Is the process recorded in ``info`` still running? None when this cannot be told (no pid
    recorded, or another host)."""
    pid, host = info.get("pid"), info.get("host")
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = info.get("pid_start")
    if recorded is not None:
        current = _process_start(int(pid))
        if current is not None and current != recorded:
            return False  # the pid now belongs to another process
    return True
