"""The training loop, top to bottom, on Hugging Face Accelerate (one CPU/GPU up to multi-node).

    train:     run directory (decided once by the main process: new, or continued —
               finetune.training.resume) → Accelerator, trackers, signal handlers → the three
               stages below, around one :class:`Session` → run.json says finished
    set_up:    seed → tokenizer + task data → base model → method attached → AdamW (parameter
               groups from the method) → warmup + decay schedule → checkpoint restored, if resuming
    run_steps: per optimizer step, ``grad_accum`` micro-batches; the loss is the sum of token losses
               over the whole window (all micro-batches, all processes) divided by the window's
               token count, so batch 8 × accumulation 1 == batch 1 × accumulation 8; every
               ``save_every`` steps a checkpoint (finetune.training.checkpoint); on SIGINT/SIGTERM a
               checkpoint, then stop (finetune.training.signals)
    finish:    evaluate the task metric → save adapter, tokenizer (and a base the run changed)
               → merged model
"""

from __future__ import annotations

import gc
import inspect
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune import adapters, progress
from finetune.adapters.base import unfreeze_modules
from finetune.allocator import KeptMemoryWatch
from finetune.config.compose import method_settings, to_container
from finetune.data.batching import ExampleStream, collate, count_loss_tokens
from finetune.environment import (
    environment_info,
    in_launched_process,
    peak_memory_mb,
    process_identity,
    reset_peak_memory,
)
from finetune.errors import RunInterrupted, TrainingError, UserError
from finetune.models.attention import use_for_training
from finetune.models.device import base_dtype, device_type, mixed_precision
from finetune.models.gated_mlp import keep_less_for_training
from finetune.models.lean_layer import keep_less_in_layers
from finetune.models.load import count_params, load_model
from finetune.models.loss import causal_lm_loss_sum
from finetune.models.tokenizer import load_tokenizer
from finetune.outputs.merge import merge_run
from finetune.run.checkpoints import step_number as checkpoints_step
from finetune.run.directory import RunDir
from finetune.tasks import build_task
from finetune.training import checkpoint, flops, tracking
from finetune.training.distributed import any_rank, broadcast_object
from finetune.training.fsdp import FSDP
from finetune.training.launch import warn_if_not_launched
from finetune.training.optimizer import make_optimizer
from finetune.training.parallel import Parallel
from finetune.training.resume import Start, abandon, open_run, resume_command
from finetune.training.schedule import apply_restart, make_scheduler
from finetune.training.signals import StopSignals
from finetune.training.zero3 import Zero3

# --------------------------------------------------------------------------------------------
# One accumulation window
# --------------------------------------------------------------------------------------------


def accumulate_gradients(model, micro_batches: list[dict], parallel, loss_chunk: int = 0
                         ) -> tuple[float, int]:
    """Forward and backward over one accumulation window (this process's micro-batches).

    Each micro-batch's summed token loss is divided by the token count of the *whole* window
    across all processes (times the process count, since DDP averages gradients), so the
    gradient is Σ token-loss gradients / Σ tokens however the window is split.
    ``loss_chunk > 0``: the cross-entropy over chunks of that many tokens (finetune.models.loss).
    ``parallel``: a :class:`finetune.training.parallel.Parallel`.
    Returns (mean token loss over the window, input tokens processed by all processes)."""
    device = parallel.device
    world = parallel.num_processes
    local = torch.tensor([sum(count_loss_tokens(b) for b in micro_batches),
                          sum(int(b["attention_mask"].sum()) for b in micro_batches)], device=device)
    window_tokens, input_tokens = (int(v) for v in parallel.reduce(local, reduction="sum").tolist())
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with parallel.no_sync(model) if (world > 1 and not last) else nullcontext():
            with parallel.forward_context():
                loss_sum = causal_lm_loss_sum(model, batch, loss_chunk)
            parallel.backward(loss_sum * world / max(window_tokens, 1))
        total += loss_sum.detach()
    loss = parallel.reduce(total, reduction="sum").item() / max(window_tokens, 1)
    return loss, input_tokens


# --------------------------------------------------------------------------------------------
# The run: set-up → loop → finish, around one Session
# --------------------------------------------------------------------------------------------


PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision -> dtype


@dataclass
class Session:
    """What one run's loop works with. ``set_up`` builds it; ``run_steps`` advances ``step`` (optimizer
    steps done), ``tokens_seen`` and ``loss``; ``finish`` saves, evaluates and merges."""

    cfg: Any
    accelerator: Any
    parallel: Parallel
    run: RunDir
    start: Start
    stop: StopSignals
    device: str
    quiet: bool
    tokenizer: Any = None
    task: Any = None
    examples: Any = None
    model: Any = None
    adapter: Any = None
    full: dict = field(default_factory=dict)  # base modules trained in full (task.train_modules)
    params: dict = field(default_factory=dict)  # parameter counts for run.json
    base_params: int = 0
    optimizer: Any = None
    scheduler: Any = None
    saver: checkpoint.Checkpointer | None = None
    step: int = 0
    tokens_seen: int = 0
    loss: float = float("nan")
    cost: flops.Cost | None = None  # FLOPs per trained token (MFU)
    peak: tuple[float, str] = (0.0, "")  # the device's peak FLOP/s and where it comes from
    flops_done: float = 0.0  # this process's model FLOPs and training seconds in this session
    train_seconds: float = 0.0
    kept_memory: KeptMemoryWatch | None = None  # jemalloc's kept pages, handed back when they grow
    before: list | None = None  # the base model's answers to a few prompts (shown next to the trained ones)
    phase: str = "set-up"  # set-up | training | saving | evaluation | merging (what a signal interrupts)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, *args) -> None:
        if self.main and not self.quiet:
            print(*args, flush=True)


def train(cfg, overrides: list[str] = (), quiet: bool = False, config_dir: str | None = None) -> dict:
    """Train ``cfg`` into its run directory; returns ``{"run_dir", **summary}`` (see ``finish``)."""
    from accelerate import Accelerator, PartialState

    t = cfg.trainer
    device = device_type(t)
    warn_if_not_launched(cfg)
    # One run directory for all ranks, decided and written by the main process only.
    start = open_run(cfg, PartialState(cpu=device == "cpu"), overrides, method=cfg.method.name,
                     task=cfg.task.name, model=cfg.model.name, config_dir=config_dir, **process_identity())
    run = start.run
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision(t, device),
                              log_with=tracking.log_with(cfg, run.path))
    reset_peak_memory(device)
    start_time = time.time()
    stop = StopSignals(escalate=not in_launched_process()).install()
    parallel = {"fsdp": FSDP, "deepspeed": Zero3}.get(cfg.launcher.name, Parallel)(accelerator, cfg)
    session = Session(cfg, accelerator, parallel, run, start, stop, device, quiet)
    failure = None
    try:
        tracking.start(accelerator, cfg, run.path)
        run.observers.append(tracking.Recorder(accelerator))  # metrics.jsonl records → TensorBoard
        with progress.quiet_if(quiet):
            set_up(session)
            run_steps(session)
            summary = finish(session)
    except KeyboardInterrupt:  # a signal where nothing had to be finished first: say what was kept
        failure = _stopped(session, stop.received or signal.SIGINT)
        raise failure from None
    except BaseException as e:
        failure = e
        raise
    finally:
        stop.uninstall()
        tracking.finish(accelerator)  # flush TensorBoard / W&B, also after a failure
        if failure is not None and session.main:
            abandon(start, failure)  # interrupted, failed, or (a mistake before training) removed
    summary["wall_time_s"] = time.time() - start_time
    if session.main:
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **summary)
    return {"run_dir": str(run.path), **summary}


def recompute_layers(model, reentrant: bool = False, every_n_layers: int = 1) -> None:
    """Gradient checkpointing of every ``every_n_layers``-th decoder layer (the first, then every
    n-th), non-reentrant unless asked (transformers 5 calls it activation checkpointing; the old
    name warns, and goes in v6). transformers also makes the embeddings' output require a gradient,
    which only the reentrant kind needs (its checkpointed layers would otherwise get no gradient);
    non-reentrant, that hook goes again, so the backward stops at the first layer's input as it
    does without checkpointing (same gradients, the first layer's input gradient not computed)."""
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        (enable or model.gradient_checkpointing_enable)(kwargs)
    else:
        raise UserError(f"trainer.checkpoint_every_n_layers={every_n_layers} needs a transformers whose "
                        "activation_checkpointing_enable takes every_n_layers (5.24 does); use 1 with this one")
    if not reentrant and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def set_up(s: Session) -> None:
    """Seed → tokenizer and training examples → base model → method attached (and base modules
    trained in full) → optimizer and schedule → wrapped for the processes → checkpoint restored."""
    from accelerate.utils import set_seed

    cfg, t = s.cfg, s.cfg.trainer
    set_seed(t.seed)
    s.tokenizer = load_tokenizer(cfg.model)
    s.task = build_task(cfg.task, s.tokenizer)
    s.examples = s.task.train_examples()
    if not s.examples:
        raise UserError(f"task {cfg.task.name}: no training examples")

    # A random-init base is saved in full precision (before any 4/8-bit quantization), so that a
    # merge can re-quantize it exactly as here or use the original weights (`merge --base original`).
    save_base = s.run.base if (s.main and cfg.model.init == "random") else None
    model = load_model(cfg.model, s.device, dtype=base_dtype(cfg, s.device), save_base=save_base)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.task.get("max_length") and cfg.task.max_length > context:
        raise UserError(f"task.max_length={cfg.task.max_length} is longer than model={cfg.model.name}'s context of "
                        f"{context} positions (max_position_embeddings); use task.max_length <= {context}")
    s.base_params = count_params(model)
    use_for_training(model)  # packed rows: attention within each example only (sdpa models)
    if t.gradient_checkpointing:  # the layers it recomputes whole keep their own forward
        recompute_layers(model, every_n_layers=t.checkpoint_every_n_layers)
    keep_less_for_training(model)  # Llama-style MLPs: two activations kept for the backward, not four
    if cfg.launcher.name not in ("fsdp", "deepspeed"):
        keep_less_in_layers(model)  # norm and attention outputs recomputed in the backward (needs the norm weights there)
    s.adapter = adapters.attach(model, cfg.method.name, method_settings(cfg))
    # Base modules the task trains in full next to the adapter (pretraining: embeddings, norms,
    # lm_head); they are saved with the base in RUN_DIR/base at the end.
    s.full = unfreeze_modules(model, getattr(s.task, "train_modules", None), s.adapter)
    _count_params(s)
    s.before = _base_answers(s, model)
    s.cost = flops.Cost(model, s.adapter)
    s.peak = flops.peak_flops(torch.device(s.device), PRECISION_DTYPES[mixed_precision(t, s.device)])
    model.config.use_cache = False
    resumed = checkpoint.open_checkpoint(s.start.checkpoint) if s.start.checkpoint else None
    if resumed:  # trained weights (ReMoRA: also its base weights and layer types) before wrapping
        checkpoint.restore_weights(resumed, model, s.adapter)

    def optimizer():  # over the parameters as they are once prepared (sharded: new tensors)
        s.full = {name: model.get_parameter(name) for name in s.full}
        return make_optimizer(s.adapter, t, s.full)

    s.model, s.optimizer = s.parallel.prepare(model, s.adapter, optimizer)
    s.scheduler = make_scheduler(getattr(s.optimizer, "optimizer", s.optimizer),
                                 getattr(t.schedule, "value", t.schedule), t.warmup_steps, t.max_steps)
    s.model.train()
    s.saver = checkpoint.Checkpointer(s.run.path, cfg, s.parallel, s.model, s.adapter, s.optimizer,
                                      s.scheduler)
    if resumed:  # optimizer, LR schedule, RNG; the data position is the step number
        checkpoint.restore_training(resumed, s.parallel, s.model, s.adapter, s.optimizer, s.scheduler)
        s.step, s.tokens_seen, s.saver.last = resumed.step, resumed.tokens_seen, resumed.path
        s.say(f"resumed from {resumed.path} at step {s.step}")


SHOWN = 4  # pairs in the before/after table


def _base_answers(s: Session, model) -> list | None:
    """What the base model (the adapter switched off) answers to the first few prompts, for the
    before/after table of tasks that have one; only on a new run, shown by the main process."""
    if not (hasattr(s.task, "before_after") and s.main and not s.quiet and not s.start.checkpoint):
        return None
    s.adapter.set_enabled(False)
    model.eval()
    try:
        with torch.no_grad(), s.parallel.autocast():
            return s.task.predictions(model, s.parallel.device, limit=SHOWN)
    finally:
        s.adapter.set_enabled(True)
        model.train()


def _count_params(s: Session) -> None:
    s.params = {"base_params": s.base_params, **s.adapter.summary(s.base_params)}
    p = s.params
    if s.cfg.method.name != "full" and p["trainable_params"] > s.base_params:
        raise UserError(f"method={s.cfg.method.name} with these settings trains {p['trainable_params']:,} parameters, "
                        f"more than the whole {s.base_params:,}-parameter model has; lower method.rank (or use "
                        "method=full)")
    s.say(f"{s.cfg.method.name}: {p['trainable_params']:,} trainable / {p['stored_params']:,} stored "
          f"parameters ({p['trainable_pct_of_base']:.3f}% of the {s.base_params:,}-parameter base)")
    if s.full:
        p["fully_trained_params"] = sum(x.numel() for x in s.full.values())
        names = list(s.full)
        s.say(f"trained in full: {p['fully_trained_params']:,} parameters of the base "
              f"({len(names)} tensors: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def run_steps(s: Session) -> None:
    """Optimizer steps from ``s.step`` to ``trainer.max_steps``: one accumulation window each, then
    logging, evaluation, checkpoints and the stop check at the step boundary."""
    t = s.cfg.trainer
    s.phase = "training"
    s.stop.defer()  # a signal now finishes the step and saves a checkpoint first
    stream = ExampleStream(len(s.examples), t.seed)
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    trainable = [p for group in s.optimizer.param_groups for p in group["params"] if p.requires_grad]
    world, rank = s.parallel.num_processes, s.parallel.process_index
    s.kept_memory = KeptMemoryWatch.start()
    with progress.bar(total=t.max_steps, initial=s.step, desc="train") as bar:  # closed before any message
        while s.step < t.max_steps:
            step_start = time.time()
            micro = [collate([s.examples[i] for i in idx], pad_id)
                     for idx in stream.micro_batches(s.step, t.batch_size, t.grad_accum, rank, world)]
            s.loss, tokens_step = accumulate_gradients(s.model, micro, s.parallel, t.loss_chunk)
            if not math.isfinite(s.loss):
                kept = (f"; the newest checkpoint ({s.saver.last}) stays: continue from it, with a lower trainer.lr, "
                        f"by {resume_command(s.start.overrides, s.start.run_dir)}") if s.saver.last else ""
                raise TrainingError(f"loss became {s.loss} at step {s.step + 1}; lower trainer.lr or check the "
                                    f"data{kept}")
            lr = s.optimizer.param_groups[0]["lr"]
            grad_norm = s.parallel.step(s.optimizer, trainable, t.max_grad_norm)
            s.scheduler.step()
            s.step += 1
            apply_restart(s.adapter.on_optimizer_step(s.step), s.optimizer, s.scheduler)
            s.tokens_seen += tokens_step
            if s.kept_memory:
                s.kept_memory.check()  # in the step's time: what handing back costs is counted
            seconds = max(time.time() - step_start, 1e-9)
            tps = tokens_step / seconds
            step_flops = s.cost.step(micro)  # this process's share, against one device's peak
            s.flops_done += step_flops
            s.train_seconds += seconds
            mfu = step_flops / seconds / s.peak[0]
            bar.update(1)
            bar.set_postfix(loss=f"{s.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.0f}%")
            _after_step(s, bar, lr, grad_norm, tps, mfu)


def _after_step(s: Session, bar, lr: float, grad_norm: float | None, tps: float, mfu: float) -> None:
    """At the step boundary: the log record, an evaluation, a checkpoint, a stop request."""
    t = s.cfg.trainer
    if s.main and (s.step % t.log_every == 0 or s.step == t.max_steps):
        s.run.log({"step": s.step, "loss": s.loss, "lr": lr, "tokens_per_s": tps, "tokens": s.tokens_seen,
                   "mfu": mfu, "grad_norm": grad_norm, "time": time.time()})
    if t.eval_every and s.step % t.eval_every == 0 and s.step < t.max_steps:
        metrics = _evaluate(s)
        if s.main:
            s.run.log({"step": s.step, "eval": metrics})
            if not s.quiet:
                bar.write(f"step {s.step}: " + _fmt(metrics))
    if t.save_every and (s.step % t.save_every == 0 or s.step == t.max_steps):
        s.saver.save(s.step, s.tokens_seen)
    if any_rank(s.accelerator, s.stop.received is not None):
        s.saver.save(s.step, s.tokens_seen)
        raise _stopped(s, s.stop.received)


def finish(s: Session) -> dict:
    """Save the adapter (and a base the run changed) and the tokenizer → evaluate → merge; returns
    the summary for run.json. The weights are saved first, so that no signal loses the training."""
    cfg, t = s.cfg, s.cfg.trainer
    s.phase = "saving"  # signals wait until the weights are on disk
    # Every tensor whole (gathered one by one from the shards, on every rank), written by the main process.
    whole = {name: s.parallel.full_tensor(p) for name, p in s.adapter.named_trainable()}
    if s.main:
        adapters.save_adapter(s.adapter, s.run.path, meta={"base_model": to_container(cfg.model),
                                                             "base_params": s.base_params},
                              state=s.adapter.state_dict(values=whole))
    if s.full or s.adapter.merges_into_base():  # ReMoRA/ReLoRA merges, fully trained modules
        with s.parallel.whole_parameters(s.model):
            if s.main:  # the base the adapter now belongs to (load_run prefers it)
                s.adapter.save_base(s.run.base)
    if s.main:
        s.tokenizer.save_pretrained(s.run.tokenizer)
        s.run.update(files=s.run.digests())  # later commands check the weights against these
    if any_rank(s.accelerator, s.stop.received is not None):
        raise _stopped(s, s.stop.received)

    s.phase = "evaluation"
    s.stop.abort_on_next()  # nothing is lost by stopping from here on
    metrics = _evaluate(s)
    summary = {"final_loss": s.loss, "steps": t.max_steps, "tokens_seen": s.tokens_seen,
               "metric": s.task.metric, "metrics": metrics, "params": s.params,
               "peak_memory_mb": peak_memory_mb(s.device), "mfu": _mfu_summary(s),
               "kept_memory_handed_back": s.kept_memory.handed_back if s.kept_memory else None,
               "environment": environment_info(s.device)}
    if s.main:
        s.run.log({"step": t.max_steps, "eval": metrics})
        if s.before and getattr(s.task, "last_predictions", None):
            s.say(s.task.before_after(s.before, s.task.last_predictions))
        s.say(f"{s.task.metric} = {metrics[s.task.metric]:.4f}  ({_fmt(metrics)})")
        s.say(f"run directory: {s.run.path}")
        if t.merge:
            s.phase = "merging"
            s.run.update(metric=s.task.metric, metrics=metrics)  # kept should the merge be interrupted
            release_training_state(s)
            out = merge_run(s.run.path, quiet=s.quiet)
            summary["merged"] = str(out)
            s.say(f"merged model:  {out}")
    # No barrier after the merge: the other ranks are done, and waiting for a long merge of a big
    # model would run into the collectives' timeout.
    return summary


def release_training_state(s: Session) -> None:
    """Let go of the trained model, its optimizer and whatever holds them (Accelerate, the
    checkpointer), so that the merge, which reads the saved weights back from the run directory,
    does not hold a second model next to the first."""
    s.model = s.adapter = s.optimizer = s.scheduler = s.saver = None
    s.full = {}
    s.accelerator.free_memory()  # its references to the prepared model and optimizer
    gc.collect()  # free_memory collects before it drops them; VB-LoRA's layers and hooks refer back to the model


def _mfu_summary(s: Session) -> dict | None:
    """Model FLOPs utilisation over this session's training steps (finetune.training.flops)."""
    if not s.train_seconds:
        return None
    achieved = s.flops_done / s.train_seconds
    return {"mfu": achieved / s.peak[0], "achieved_flops_per_s": achieved, "peak_flops_per_s": s.peak[0],
            "peak_source": s.peak[1], "flops_per_token_no_attention": s.cost.linear}


def _stopped(s: Session, sig) -> RunInterrupted:
    """The one-line end of a run stopped by a signal in ``s.phase``: what was kept, how to continue."""
    sig = signal.Signals(sig or signal.SIGTERM)  # another rank may have received it
    run = s.run.path
    if s.phase == "set-up":
        what = "during set-up, before any training step; nothing new was kept; run the same command again"
    elif s.phase == "training":
        kept = s.saver.last if s.saver else None
        again = resume_command(s.start.overrides, s.start.run_dir)
        what = (f"after step {s.step}; checkpoint saved in {kept}; continue with: {again}" if kept and
                checkpoints_step(kept) == s.step else
                f"during step {s.step + 1}; " + (f"the newest checkpoint {kept} stays; continue with: {again}"
                                                 if kept else "no checkpoint was written; run the same command again"))
    elif s.phase in ("saving", "evaluation"):
        what = (f"after training all {s.step} steps; the trained weights are saved in {run}; evaluate them with: "
                f"finetune eval {run}; merge them with: finetune merge {run}")
    else:
        what = f"while merging; the trained weights and their metrics are saved in {run}; merge with: finetune merge {run}"
    return RunInterrupted(f"interrupted by {sig.name} {what}", sig, s.phase)


def _evaluate(s: Session) -> dict:
    """The task metric, the same on every rank. Every rank evaluates (with sharded parameters, FSDP
    or ZeRO-3, each forward pass needs all ranks) and the main process's result is shared."""
    unwrapped = s.parallel.unwrap(s.model)
    was_training = unwrapped.training
    unwrapped.eval()
    with s.parallel.autocast():
        metrics = s.task.evaluate(unwrapped, s.parallel.device)
    unwrapped.train(was_training)
    return broadcast_object(s.accelerator, metrics)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
