"""The training loop, top to bottom, on Hugging Face Accelerate (one CPU/GPU up to multi-node).

    set-up:  run directory (decided once by the main process: new, or continued — finetune.training.resume)
             → seed → tokenizer + task data → base model → method attached → AdamW (parameter
             groups from the method) → warmup + decay schedule → checkpoint restored, if resuming
    loop:    per optimizer step, ``grad_accum`` micro-batches; the loss is the sum of token losses
             over the whole window (all micro-batches, all processes) divided by the window's
             token count, so batch 8 × accumulation 1 == batch 1 × accumulation 8;
             every ``save_every`` steps a checkpoint (finetune.training.checkpoint); on SIGINT/SIGTERM a
             checkpoint, then stop (finetune.training.signals)
    end:     evaluate the task metric → save adapter, tokenizer (and random-init base)
             → merged model → run.json says finished
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext

import torch

from finetune import adapters, progress
from finetune.adapters.base import unfreeze_modules
from finetune.config.compose import method_settings, to_container
from finetune.data.batching import ExampleStream, collate, count_loss_tokens
from finetune.environment import (environment_info, in_launched_process, peak_memory_mb, process_identity,
                                  reset_peak_memory)
from finetune.errors import RunInterrupted, TrainingError, UserError
from finetune.models.device import base_dtype, device_type, mixed_precision
from finetune.models.load import count_params, load_model
from finetune.models.loss import causal_lm_loss_sum
from finetune.models.tokenizer import load_tokenizer
from finetune.run.directory import RunDir
from finetune.tasks import build_task
from finetune.training import checkpoint, tracking
from finetune.training.distributed import any_rank, broadcast_object, whole_parameters
from finetune.training.launch import warn_if_not_launched
from finetune.training.optimizer import make_optimizer
from finetune.training.resume import Start, abandon, open_run, resume_command
from finetune.training.schedule import apply_restart, make_scheduler
from finetune.training.signals import StopSignals


# --------------------------------------------------------------------------------------------
# Building blocks (also used by eval and merge)
# --------------------------------------------------------------------------------------------


def accumulate_gradients(model, micro_batches: list[dict], accelerator, loss_chunk: int = 0
                         ) -> tuple[float, int]:
    """Forward and backward over one accumulation window (this process's micro-batches).

    Each micro-batch's summed token loss is divided by the token count of the *whole* window
    across all processes (times the process count, since DDP averages gradients), so the
    gradient is Σ token-loss gradients / Σ tokens however the window is split.
    ``loss_chunk > 0``: the cross-entropy over chunks of that many tokens (finetune.models.loss).
    Returns (mean token loss over the window, input tokens processed by all processes)."""
    device = accelerator.device
    world = accelerator.num_processes
    local = torch.tensor([sum(count_loss_tokens(b) for b in micro_batches),
                          sum(int(b["attention_mask"].sum()) for b in micro_batches)], device=device)
    window_tokens, input_tokens = (int(v) for v in accelerator.reduce(local, reduction="sum").tolist())
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with accelerator.no_sync(model) if (world > 1 and not last) else nullcontext():
            loss_sum = causal_lm_loss_sum(model, batch, loss_chunk)
            accelerator.backward(loss_sum * world / max(window_tokens, 1))
        total += loss_sum.detach()
    loss = accelerator.reduce(total, reduction="sum").item() / max(window_tokens, 1)
    return loss, input_tokens


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(cfg, overrides: list[str] = (), quiet: bool = False, config_dir: str | None = None) -> dict:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.trainer
    device = device_type(t)
    warn_if_not_launched(cfg)
    # One run directory for all ranks, decided and written by the main process only.
    start = open_run(cfg, PartialState(cpu=device == "cpu"), overrides, method=cfg.method.name,
                     task=cfg.task.name, model=cfg.model.name, config_dir=config_dir, **process_identity())
    run = start.run
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision(t, device),
                              log_with=tracking.log_with(cfg, run.path))
    main = accelerator.is_main_process
    say = (lambda *a: print(*a, flush=True)) if (main and not quiet) else (lambda *a: None)
    reset_peak_memory(device)
    start_time = time.time()
    stop = StopSignals(escalate=not in_launched_process()).install()
    failure = None
    try:
        tracking.start(accelerator, cfg, run.path)
        run.observers.append(tracking.Recorder(accelerator))  # metrics.jsonl records → TensorBoard
        with progress.quiet_if(quiet):
            summary = _train(cfg, accelerator, run, device, say, quiet, tqdm, set_seed, start=start, stop=stop)
    except BaseException as e:
        failure = e
        raise
    finally:
        stop.uninstall()
        tracking.finish(accelerator)  # flush TensorBoard / W&B, also after a failure
        if failure is not None and main:
            abandon(start, failure)  # interrupted, failed, or (a mistake before training) removed
    summary["wall_time_s"] = time.time() - start_time
    if main:
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **summary)
    return {"run_dir": str(run.path), **summary}


def _train(cfg, accelerator, run: RunDir, device: str, say, quiet: bool, tqdm, set_seed,
           start: Start | None = None, stop: StopSignals | None = None) -> dict:
    t = cfg.trainer
    main = accelerator.is_main_process
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg.task, tokenizer)
    examples = task.train_examples()
    if not examples:
        raise UserError(f"task {cfg.task.name}: no training examples")

    # A random-init base is saved in full precision (before any 4/8-bit quantization), so that a
    # merge can re-quantize it exactly as here or use the original weights (`merge --base original`).
    save_base = run.base if (main and cfg.model.init == "random") else None
    model = load_model(cfg.model, device, dtype=base_dtype(cfg, device), save_base=save_base)
    base_params = count_params(model)
    adapter = adapters.attach(model, cfg.method.name, method_settings(cfg))
    # Base modules the task trains in full next to the adapter (pretraining: embeddings, norms,
    # lm_head); they are saved with the base in RUN_DIR/base at the end.
    full = unfreeze_modules(model, getattr(task, "train_modules", None), adapter)
    params = adapter.summary(base_params)
    say(f"{cfg.method.name}: {params['trainable_params']:,} trainable / {params['stored_params']:,} stored "
        f"parameters ({params['trainable_pct_of_base']:.3f}% of the {base_params:,}-parameter base)")
    if full:
        params["fully_trained_params"] = sum(p.numel() for p in full.values())
        say(f"trained in full: {params['fully_trained_params']:,} parameters of the base "
            f"({len(full)} tensors: {', '.join(list(full)[:3])}{', ...' if len(full) > 3 else ''})")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    resumed = checkpoint.open_checkpoint(start.checkpoint) if start and start.checkpoint else None
    if resumed:  # trained weights (ReMoRA: also its base weights and layer types) before wrapping
        checkpoint.restore_weights(resumed, model, adapter)

    optimizer = make_optimizer(adapter, t, full)
    scheduler = make_scheduler(optimizer, t.schedule.value if hasattr(t.schedule, "value") else t.schedule,
                               t.warmup_steps, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    saver = checkpoint.Checkpointer(run.path, cfg, accelerator, model, adapter, optimizer, scheduler)
    first_step, tokens_seen = 0, 0
    if resumed:  # optimizer, LR schedule, RNG; the data position is the step number
        checkpoint.restore_training(resumed, model, optimizer, scheduler, accelerator.process_index)
        first_step, tokens_seen, saver.last = resumed.step, resumed.tokens_seen, resumed.path
        say(f"resumed from {resumed.path} at step {first_step}")

    stream = ExampleStream(len(examples), t.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(total=t.max_steps, initial=first_step, desc="train", disable=quiet or not main,
               dynamic_ncols=True)
    loss_value = float("nan")
    for step in range(first_step, t.max_steps):
        step_start = time.time()
        micro = [collate([examples[i] for i in idx], pad_id)
                 for idx in stream.micro_batches(step, t.batch_size, t.grad_accum, rank, world)]
        loss_value, tokens_step = accumulate_gradients(model, micro, accelerator, t.loss_chunk)
        if not math.isfinite(loss_value):
            last_good = (f"; the last good checkpoint {saver.last} stays (continue from it with "
                         "trainer.resume=auto)") if saver.last else ""
            raise TrainingError(f"loss became {loss_value} at step {step + 1}; lower trainer.lr or check the "
                                f"data{last_good}")
        grad_norm = None
        if t.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        apply_restart(adapter.on_optimizer_step(step + 1), optimizer, scheduler)

        tokens_seen += tokens_step
        tps = tokens_step / max(time.time() - step_start, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if main and ((step + 1) % t.log_every == 0 or step + 1 == t.max_steps):
            run.log({"step": step + 1, "loss": loss_value, "lr": lr, "tokens_per_s": tps,
                     "tokens": tokens_seen, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                     "time": time.time()})
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
            metrics = _evaluate(task, accelerator, model, device)
            if main:
                run.log({"step": step + 1, "eval": metrics})
                if not quiet:
                    bar.write(f"step {step + 1}: " + _fmt(metrics))
        if t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == t.max_steps):
            saver.save(step + 1, tokens_seen)
        if stop is not None and any_rank(accelerator, stop.received is not None):
            raise _interrupted(stop, saver.save(step + 1, tokens_seen), step + 1, start, main)
    bar.close()
    if stop is not None:
        stop.abort_on_next()  # from here on (evaluation, saving, merging) a signal stops at once

    metrics = _evaluate(task, accelerator, model, device)
    summary = {"final_loss": loss_value, "steps": t.max_steps, "tokens_seen": tokens_seen,
               "metric": task.metric, "metrics": metrics, "params": params,
               "peak_memory_mb": peak_memory_mb(device), "environment": environment_info(device)}
    with whole_parameters(accelerator, model):  # FSDP / ZeRO-3: gather the shards to save them
        if main:
            adapters.save_adapter(adapter, run.path, meta={"base_model": to_container(cfg.model),
                                                             "base_params": base_params})
            if full or adapter.merges_into_base():  # ReMoRA/ReLoRA merges, fully trained modules
                adapter.save_base(run.base)  # the base the adapter now belongs to (load_run prefers it)
    if main:
        run.log({"step": t.max_steps, "eval": metrics})
        tokenizer.save_pretrained(run.tokenizer)
        say(f"{task.metric} = {metrics[task.metric]:.4f}  ({_fmt(metrics)})")
        say(f"run directory: {run.path}")
        if t.merge:
            from finetune.outputs.merge import merge_run

            out = merge_run(run.path, quiet=quiet)
            summary["merged"] = str(out)
            say(f"merged model:  {out}")
    # No barrier after the merge: the other ranks are done, and waiting for a long merge of a big
    # model would run into the collectives' timeout.
    return summary


def _interrupted(stop: StopSignals, path, step: int, start: Start | None, main: bool) -> RunInterrupted:
    """The exception that ends a run stopped by a signal, once its checkpoint is written."""
    sig = stop.received or signal.SIGTERM  # another rank may have received it
    hint = f"; continue with: {resume_command(start.overrides, start.run_dir)}" if (main and start) else ""
    return RunInterrupted(f"interrupted by {sig.name} after step {step}; checkpoint saved in {path}{hint}", sig)


def _evaluate(task, accelerator, model, device) -> dict:
    """The task metric, the same on every rank. Every rank evaluates (with sharded parameters, FSDP
    or ZeRO-3, each forward pass needs all ranks) and the main process's result is shared."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    with accelerator.autocast():
        metrics = task.evaluate(unwrapped, accelerator.device)
    unwrapped.train(was_training)
    return broadcast_object(accelerator, metrics)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
