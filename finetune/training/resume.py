"""Where a run writes and where it starts: a new run directory, a replaced one
(``trainer.overwrite=true``), or the continuation of an earlier run from a checkpoint
(``trainer.resume=auto|PATH``).

The run directory is decided once, by the main process, and shared with every rank (the Hydra + DDP
pitfall is each rank making its own timestamped directory): the launcher's choice
(``FINETUNE_RUN_DIR``), else ``output_dir``, else the run of the checkpoint named by
``trainer.resume``, else ``outputs/<task>/<method>/<timestamp>``. Only the main process writes it.

    trainer.resume   output_dir holds ...          then
    null             nothing / an empty dir        a new run
    null             a run                         refused (finished: overwrite to replace;
                                                   unfinished: resume=auto to continue it)
    auto             an unfinished run             continue from its newest complete checkpoint
                                                   (from step 0 when it has none)
    auto             nothing                       a new run
    auto             a finished run                refused: nothing to resume
    PATH             (PATH's run, by default)      continue from PATH (a checkpoint, or a run's
                                                   newest); into another output_dir: a new run
                                                   that starts from that checkpoint

Resuming compares the checkpoint's config with the current one: a different model, method, task,
seed or global batch is refused (the checkpoint would not continue the same run); other changes
(learning rate, max_steps, ...) are allowed with a loud warning.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config.compose import flatten, to_container, to_yaml
from finetune.environment import in_launched_process, process_alive
from finetune.errors import RunInterrupted, UserError, first_line, warn
from finetune.run import checkpoints
from finetune.run.directory import METRICS_FILE, RunDir, default_output_dir, is_run, write_atomic
from finetune.training.distributed import on_main

RUN_DIR_ENV = "FINETUNE_RUN_DIR"

# Config keys that may change between a checkpoint and its continuation without notice.
FREE = ("output_dir", "trainer.resume", "trainer.overwrite", "trainer.save_every", "trainer.keep_checkpoints",
        "trainer.log_every", "trainer.eval_every", "trainer.merge", "trainer.loss_chunk",
        "trainer.gradient_checkpointing", "trainer.checkpoint_every_n_layers", "logger", "launcher.")
# Keys whose change makes the checkpoint another run's (checked by prefix).
FIXED = ("model.", "method.", "task.", "trainer.seed")
BATCH = ("trainer.batch_size", "trainer.grad_accum")


@dataclass
class Start:
    run_dir: str
    mode: str  # new | overwrite | continue
    checkpoint: str | None = None  # the checkpoint the run starts from
    step: int = 0
    warnings: list[str] = field(default_factory=list)
    created: bool = False  # this run made the directory (removed again if set-up fails)
    overrides: list[str] = field(default_factory=list)  # the command line's overrides

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)


# --------------------------------------------------------------------------------------------
# Deciding
# --------------------------------------------------------------------------------------------


def newest_sound(run_dir: Path, warnings: list[str]) -> Path | None:
    """The run's newest complete checkpoint whose files match their checksums; a damaged newer one
    is skipped with a warning (and left as it is)."""
    for ckpt in reversed(checkpoints.complete_checkpoints(run_dir)):
        damaged = checkpoints.damaged_file(ckpt)
        if damaged is None:
            return ckpt
        warnings.append(f"checkpoint {ckpt} is damaged ({damaged} does not match its recorded checksum) and is "
                        "skipped")
    return None


def find_checkpoint(value: str, warnings: list[str]) -> Path:
    """``trainer.resume=PATH``: a complete checkpoint that verifies, or a run directory (its newest
    one that verifies)."""
    path = Path(value).expanduser().resolve()
    if checkpoints.is_complete(path):
        damaged = checkpoints.damaged_file(path)
        if damaged is not None:
            raise UserError(f"trainer.resume={value}: the checkpoint is damaged: {damaged} does not match its recorded "
                            "checksum; resume from another checkpoint or from the run directory (its newest sound one)")
        return path
    if path.is_dir() and (is_run(path) or (path / checkpoints.DIR).is_dir()):
        if not checkpoints.complete_checkpoints(path):
            raise UserError(f"trainer.resume={value}: the run has no complete checkpoint "
                            "(trainer.save_every=N writes them)")
        newest = newest_sound(path, warnings)
        if newest is None:
            raise UserError(f"trainer.resume={value}: every checkpoint of the run is damaged (its files do not "
                            "match their recorded checksums)")
        return newest
    if path.name.startswith("step-") and path.is_dir():
        raise UserError(f"trainer.resume={value}: an incomplete checkpoint (its save was interrupted); "
                        "use an earlier one or the run directory")
    raise UserError(f"trainer.resume={value}: not a checkpoint or run directory; allowed: auto, "
                    "RUN_DIR, or RUN_DIR/checkpoints/step-N")


def checkpoint_run(ckpt: Path) -> Path | None:
    """The run directory a checkpoint belongs to (RUN_DIR/checkpoints/step-N), if any."""
    run = ckpt.parent.parent
    return run if ckpt.parent.name == checkpoints.DIR and is_run(run) else None


def decide_output_dir(cfg) -> Path:
    """Main process only: see the module docstring."""
    chosen = os.environ.get(RUN_DIR_ENV) if in_launched_process() else None
    chosen = chosen or cfg.output_dir
    resume = cfg.trainer.resume
    if not chosen and resume not in (None, "auto"):
        chosen = checkpoint_run(find_checkpoint(resume, []))
    if not chosen:
        chosen = default_output_dir(cfg.task.name, cfg.method.name)
    return Path(chosen).expanduser().resolve()


def plan(cfg, run_dir: Path, num_processes: int) -> Start:
    """How this run starts in ``run_dir`` (reads only; raises UserError when it cannot)."""
    t = cfg.trainer
    run = RunDir(run_dir)
    info = run.info() if is_run(run.path) else None
    status = (info or {}).get("status")
    if t.resume is not None and t.overwrite:
        raise UserError("trainer.resume and trainer.overwrite=true contradict each other: continue the run "
                        "or replace it, not both")
    if info is not None and status == "running":
        _refuse_if_in_use(run.path, info)
    ckpt, found = None, []  # found: warnings about damaged checkpoints
    if t.resume == "auto":
        if status == "finished":
            raise UserError(f"output_dir={run.path} already holds a finished run; nothing to resume "
                            "(choose another output_dir, or trainer.overwrite=true without trainer.resume)")
        if info is not None:
            if not checkpoints.complete_checkpoints(run.path):
                return Start(str(run.path), "overwrite", warnings=[
                    f"{run.path} has no complete checkpoint; trainer.resume=auto starts it again from step 0"])
            ckpt = newest_sound(run.path, found)
            if ckpt is None:
                raise UserError(f"output_dir={run.path}: every checkpoint is damaged (its files do not match their "
                                "recorded checksums); start over with trainer.overwrite=true")
    elif t.resume is not None:
        ckpt = find_checkpoint(t.resume, found)
    if ckpt is not None:
        step, warnings = check_drift(cfg, ckpt, num_processes)
        warnings = found + warnings
        if info is not None and checkpoint_run(ckpt) == run.path:
            if status == "finished":
                raise UserError(f"output_dir={run.path} already holds a finished run; to train on from "
                                f"{ckpt.name}, write a new run: pass another output_dir")
            return Start(str(run.path), "continue", str(ckpt), step, warnings)
        return Start(str(run.path), run.claim_mode(t.overwrite), str(ckpt), step, warnings)
    return Start(str(run.path), run.claim_mode(t.overwrite))


def _refuse_if_in_use(path: Path, info: dict) -> None:
    if info.get("pid") != os.getpid() and process_alive(info):
        raise UserError(f"output_dir={path} is being trained right now (pid {info.get('pid')} on "
                        f"{info.get('host')}); wait for it, stop it, or choose another output_dir")


# --------------------------------------------------------------------------------------------
# Config drift between a checkpoint and the current config
# --------------------------------------------------------------------------------------------


def check_drift(cfg, ckpt: Path, num_processes: int) -> tuple[int, list[str]]:
    """(checkpoint step, warnings); raises UserError when the checkpoint belongs to another run."""
    from omegaconf import OmegaConf

    state = json.loads((ckpt / checkpoints.STATE).read_text())
    step = int(state["step"])
    old = flatten(OmegaConf.to_container(checkpoints.config_of(ckpt), resolve=True))
    new = flatten(to_container(cfg))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    changed = [k for k in changed if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE)]
    fixed = [k for k in changed if k.startswith(FIXED)]
    t = cfg.trainer
    global_batch = t.batch_size * t.grad_accum * num_processes
    saved_batch = int(state.get("global_batch", global_batch))
    show = lambda keys: ", ".join(f"{k}={new.get(k)} (was {old.get(k)})" for k in keys[:3]) + (
        f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    if fixed:
        raise UserError(f"trainer.resume: {ckpt} belongs to another run: {show(fixed)}; resume with the "
                        "checkpoint's values, or start a new run (another output_dir, or trainer.overwrite=true)")
    if global_batch != saved_batch:
        raise UserError(f"trainer.resume: {ckpt} was trained with a global batch of {saved_batch} examples "
                        f"(batch_size × grad_accum × processes), this config gives {global_batch} "
                        f"({t.batch_size} × {t.grad_accum} × {num_processes}); keep the global batch to resume")
    if step > t.max_steps:
        raise UserError(f"trainer.resume: {ckpt} is at step {step}, beyond trainer.max_steps={t.max_steps}")
    loud = [k for k in changed if k not in BATCH]
    warnings = []
    if loud:
        warnings.append(f"resuming {ckpt} with changed settings: {show(loud)}; the result will differ "
                        "from an uninterrupted run")
    return step, warnings


# --------------------------------------------------------------------------------------------
# Claiming (main process) and opening (every rank)
# --------------------------------------------------------------------------------------------


def begin(start: Start, cfg, overrides: list[str], **info) -> None:
    """Main process: write the run directory for ``start``."""
    run = start.run
    extra = {"resumed_from": start.checkpoint} if start.checkpoint else {}
    if start.mode == "continue":
        truncate_log(run.path / METRICS_FILE, start.step)
        run.write_config(to_yaml(cfg))
        resumes = list(run.info().get("resumes", [])) + [{"checkpoint": start.checkpoint, "step": start.step}]
        run.update(status="running", overrides=list(overrides), error=None, resumes=resumes, **info)
        return
    start.created = not run.path.exists()
    run.create(to_yaml(cfg), overrides, start.mode == "overwrite", **info, **extra)


def truncate_log(path: Path, step: int) -> None:
    """Drop the metrics records logged after ``step`` (by the run that was interrupted), so the
    continued log reads as one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and int(json.loads(line).get("step", 0)) <= step]
    write_atomic(path, "".join(kept))


def open_run(cfg, state, overrides: list[str], **info) -> Start:
    """Decide and claim the run directory on the main process; every rank gets the same
    :class:`Start` (and ``cfg.output_dir`` set to it). ``state``: an accelerate PartialState."""

    def decide_and_claim() -> Start:
        run_dir = decide_output_dir(cfg)
        start = plan(cfg, run_dir, state.num_processes)
        start.overrides = list(overrides)
        cfg.output_dir = start.run_dir
        begin(start, cfg, overrides, output_dir=start.run_dir, num_processes=state.num_processes, **info)
        for message in start.warnings:
            warn(message)
        return start

    start = on_main(state, decide_and_claim)
    cfg.output_dir = start.run_dir
    return start


def abandon(start: Start, error: BaseException) -> None:
    """Main process, after the run stopped early. A user mistake or a signal before any training
    step of a run that started from nothing leaves nothing behind (the directory it made is removed,
    so a corrected rerun just works). Otherwise a signal marks the run interrupted (with the phase it
    stopped in) and anything else failed; its checkpoints and saved weights stay."""
    run = start.run
    trained = (run.path / METRICS_FILE).is_file() or checkpoints.latest(run.path) is not None
    nothing_kept = not trained and start.mode == "new" and start.checkpoint is None
    if isinstance(error, (RunInterrupted, KeyboardInterrupt)) and not nothing_kept:
        if is_run(run.path):
            run.update(status="interrupted", error=None, phase=getattr(error, "phase", None),
                       last_checkpoint=str(checkpoints.latest(run.path) or "") or None)
        return
    if isinstance(error, (UserError, RunInterrupted, KeyboardInterrupt)) and nothing_kept:
        if start.created:
            shutil.rmtree(run.path, ignore_errors=True)
        else:
            run._clear()
        return
    if is_run(run.path):
        run.update(status="failed", error=first_line(error))


def resume_command(overrides: list[str], run_dir: str) -> str:
    """The command that continues this run: its overrides, output_dir and trainer.resume=auto."""
    import shlex

    keep = [o for o in overrides if not o.lstrip("+~").startswith(("output_dir=", "trainer.resume=",
                                                                    "trainer.overwrite="))]
    return shlex.join(["finetune", "train", *keep, f"output_dir={run_dir}", "trainer.resume=auto"])

