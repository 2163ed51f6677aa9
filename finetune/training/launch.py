"""Multi-process training through Hugging Face Accelerate's launcher.

``finetune train launcher=ddp launcher.num_processes=4 ...`` does not train in the process the user
started: it checks the config and the run directory, decides the run directory, and hands
``python -m finetune train <the same overrides>`` to Accelerate's launcher (``accelerate launch``,
which runs torchrun), with an Accelerate config file from ``conf/accelerate/`` (or
``launcher.config_file``). Every process it starts trains; the main one writes the run directory.

A process started by a launcher (torchrun's ``LOCAL_RANK`` is set) never launches again, so
``accelerate launch -m finetune train ...`` and ``torchrun -m finetune train ...`` work as well.

This module imports no torch at import time (``finetune config`` validates launcher settings).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from finetune.environment import in_launched_process
from finetune.errors import UserError, warn
from finetune.models.device import device_type, mixed_precision
from finetune.training.distributed import free_port
from finetune.training.resume import RUN_DIR_ENV, decide_output_dir, plan

LAUNCH_CONFIG = "launch.yaml"  # conf/accelerate/: processes only; finetune shards (or not) itself
MULTI_NODE_PORT = 29500


def warn_if_not_launched(cfg) -> None:
    """``finetune.training.loop.train`` called directly (a sweep, a script) trains in this one process."""
    if cfg.launcher.name != "none" and not in_launched_process() and (cfg.launcher.num_processes or 1) > 1:
        warn(f"launcher={cfg.launcher.name} is not applied here: this run trains in one process "
             "(`finetune train` launches several)")


# --------------------------------------------------------------------------------------------
# The launch
# --------------------------------------------------------------------------------------------


def config_file(launcher) -> str:
    """The Accelerate config of the launch: ``launcher.config_file``, else the shipped one. It only
    describes the processes: finetune applies FSDP2 or ZeRO-3 itself (finetune.training.parallel),
    so a file that turns on Accelerate's own FSDP or DeepSpeed is refused."""
    if not launcher.config_file:
        from importlib.resources import files

        return str(files("finetune.conf").joinpath("accelerate", LAUNCH_CONFIG))
    path = Path(launcher.config_file).expanduser().resolve()
    import yaml

    try:
        kind = str((yaml.safe_load(path.read_text()) or {}).get("distributed_type", "")).upper()
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"launcher.config_file={launcher.config_file}: cannot read it ({e})") from None
    if kind in ("FSDP", "DEEPSPEED"):
        raise UserError(f"launcher.config_file={launcher.config_file}: distributed_type {kind} is not used; "
                        f"finetune shards itself: set launcher={'fsdp' if kind == 'FSDP' else 'deepspeed'} and keep "
                        "distributed_type MULTI_GPU (or MULTI_CPU) in the file")
    return str(path)


def plan_processes(cfg, device: str, gpus: int) -> int:
    """The total number of processes; checks what this machine can run."""
    l = cfg.launcher
    if l.name == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("launcher=deepspeed needs the deepspeed package: pip install 'finetune[deepspeed]'")
    if l.num_processes is None:
        if device != "cuda":
            raise UserError(f"launcher={l.name} on the CPU: set launcher.num_processes (no GPUs to count)")
        return gpus * l.num_machines
    per_machine = l.num_processes // l.num_machines
    if device == "cuda" and per_machine > gpus:
        raise UserError(f"launcher.num_processes={l.num_processes}: {per_machine} per machine, but this machine "
                        f"has {gpus} GPU(s); one process per GPU")
    return l.num_processes


def accelerate_args(cfg, num_processes: int, port: int, precision: str, script_args: list[str]) -> list[str]:
    """``accelerate launch`` arguments that run ``python -m finetune <script_args>``."""
    l = cfg.launcher
    args = ["--config_file", config_file(l), "--num_processes", str(num_processes),
            "--num_machines", str(l.num_machines), "--machine_rank", str(l.machine_rank),
            "--main_process_port", str(port), "--mixed_precision", precision, "--dynamo_backend", "no"]
    if l.main_process_ip:
        args += ["--main_process_ip", l.main_process_ip]
    return args + ["-m", "finetune", *script_args]


def child_args(overrides: list[str], config_dir: str | None, quiet: bool) -> list[str]:
    return ["train", *overrides, *(["--config-dir", config_dir] if config_dir else []), *(["-q"] if quiet else [])]


def launch_training(cfg, overrides: list[str], config_dir: str | None = None, quiet: bool = False) -> int | None:
    """Start the run's processes on this machine through Accelerate; wait; return the exit code
    (that of the first process that failed, else 0). None: one process in all, which needs no
    launcher (train here)."""
    import torch

    device = device_type(cfg.trainer)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    n = plan_processes(cfg, device, gpus)
    if n == 1 and cfg.launcher.num_machines == 1:
        return None
    env = {}
    if cfg.launcher.machine_rank == 0:
        run_dir = decide_output_dir(cfg)
        plan(cfg, run_dir, n)  # refuse here, before any process starts (a finished run, ...)
        env[RUN_DIR_ENV] = str(run_dir)
    port = cfg.launcher.main_process_port or (MULTI_NODE_PORT if cfg.launcher.num_machines > 1 else free_port())
    per_machine = max(1, n // cfg.launcher.num_machines)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_machine))
    args = accelerate_args(cfg, n, port, mixed_precision(cfg.trainer, device),
                           child_args(overrides, config_dir, quiet))
    return run_accelerate(args, env)


def run_accelerate(args: list[str], env: dict[str, str]) -> int:
    """Accelerate's launcher in this process, with its failure report reduced to the exit code
    (the failing process has printed its own one-line error)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    for name in ("torch.distributed.elastic", "torch.distributed.run", "accelerate"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        launch_command(launch_command_parser().parse_args(args))
        return 0
    except Exception as e:
        if not any(hasattr(e, a) for a in ("failures", "sigval", "returncode")):
            raise  # not a process that failed or a signal: a bug, with its traceback
        return _exit_code(e)  # torchrun's ChildFailedError / SignalException, CalledProcessError
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_code(error: Exception) -> int:
    signum = getattr(error, "sigval", None)  # torchrun's SignalException: the launcher got a signal
    if signum is not None:
        return 128 + int(signum)
    failures = getattr(error, "failures", None)
    if failures:
        first = min(failures.values(), key=lambda f: getattr(f, "timestamp", 0))
        code = getattr(first, "exitcode", 1)
        return code if isinstance(code, int) and code > 0 else 128 + abs(code or 1)
    code = getattr(error, "returncode", 1)
    return code if isinstance(code, int) and code > 0 else 1
