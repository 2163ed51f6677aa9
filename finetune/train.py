"""The training loop, top to bottom, on Hugging Face Accelerate (one CPU/GPU up to multi-node).

    set-up:  run directory → seed → tokenizer + task data → base model → method attached
             → AdamW (parameter groups from the method) → warmup + decay schedule
    loop:    per optimizer step, ``grad_accum`` micro-batches; the loss is the sum of token losses
             over the whole window (all micro-batches, all processes) divided by the window's
             token count, so batch 8 × accumulation 1 == batch 1 × accumulation 8
    end:     evaluate the task metric → save adapter, tokenizer (and random-init base)
             → merged model → run.json says finished
"""

from __future__ import annotations

import math
import resource
from contextlib import nullcontext
import time
from pathlib import Path

import torch

from finetune import adapters
from finetune.config import method_settings, to_container, to_yaml
from finetune.data import ExampleStream, collate, count_loss_tokens
from finetune.errors import UserError
from finetune.loss import causal_lm_loss_sum
from finetune.models import load_model, load_tokenizer
from finetune.rundir import RunDir, default_output_dir
from finetune.schedule import make_scheduler
from finetune.tasks import build_task


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss). Reported in one line, exit code 1."""


# --------------------------------------------------------------------------------------------
# Building blocks (also used by eval and merge)
# --------------------------------------------------------------------------------------------


def device_type(trainer_cfg) -> str:
    if trainer_cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if trainer_cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu")
    return trainer_cfg.device


def mixed_precision(trainer_cfg, device: str) -> str:
    p = trainer_cfg.precision
    if p == "auto":
        return "bf16" if device == "cuda" else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def base_dtype(cfg, device: str) -> str:
    """Frozen bases may be 16-bit on GPU; trained weights (method=full) stay fp32 masters."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if device == "cuda" and cfg.method.name != "full" and not cfg.model.quantize:
        return "bfloat16"
    return "float32"


def build_model(cfg, device: str, base_dir: str | None = None):
    """Base model with the configured method attached: returns (model, adapter)."""
    model = load_model(cfg.model, device, base_dir=base_dir, dtype=base_dtype(cfg, device))
    adapter = adapters.attach(model, cfg.method.name, method_settings(cfg))
    return model, adapter


def make_optimizer(adapter, trainer_cfg):
    groups = adapter.param_groups(trainer_cfg.lr, trainer_cfg.weight_decay)
    for g in groups:
        g.setdefault("lr", trainer_cfg.lr)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                             lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay)


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def environment_info(device: str) -> dict:
    import platform

    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device,
            "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def accumulate_gradients(model, micro_batches: list[dict], accelerator) -> tuple[float, int]:
    """Forward and backward over one accumulation window (this process's micro-batches).

    Each micro-batch's summed token loss is divided by the token count of the *whole* window
    across all processes (times the process count, since DDP averages gradients), so the
    gradient is Σ token-loss gradients / Σ tokens however the window is split.
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
            loss_sum = causal_lm_loss_sum(model, batch)
            accelerator.backward(loss_sum * world / max(window_tokens, 1))
        total += loss_sum.detach()
    loss = accelerator.reduce(total, reduction="sum").item() / max(window_tokens, 1)
    return loss, input_tokens


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(cfg, overrides: list[str] = (), quiet: bool = False, config_dir: str | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.trainer
    device = device_type(t)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision(t, device))
    main = accelerator.is_main_process
    run = RunDir(cfg.output_dir or default_output_dir(cfg.task.name, cfg.method.name))
    if main:
        run.create(to_yaml(cfg), overrides, t.overwrite, method=cfg.method.name, task=cfg.task.name,
                   model=cfg.model.name, output_dir=str(run.path), config_dir=config_dir)
    accelerator.wait_for_everyone()
    say = (lambda *a: print(*a, flush=True)) if (main and not quiet) else (lambda *a: None)
    start_time = time.time()
    try:
        summary = _train(cfg, accelerator, run, device, say, quiet, tqdm, set_seed)
    except KeyboardInterrupt:
        if main:
            run.update(status="interrupted")
        raise
    except BaseException as e:
        if main:
            run.update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    summary["wall_time_s"] = time.time() - start_time
    if main:
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **summary)
    return {"run_dir": str(run.path), **summary}


def _train(cfg, accelerator, run: RunDir, device: str, say, quiet: bool, tqdm, set_seed) -> dict:
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
    params = adapter.summary(base_params)
    say(f"{cfg.method.name}: {params['trainable_params']:,} trainable / {params['stored_params']:,} stored "
        f"parameters ({params['trainable_pct_of_base']:.3f}% of the {base_params:,}-parameter base)")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

    optimizer = make_optimizer(adapter, t)
    scheduler = make_scheduler(optimizer, t.schedule.value if hasattr(t.schedule, "value") else t.schedule,
                               t.warmup_steps, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    stream = ExampleStream(len(examples), t.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    world, rank = accelerator.num_processes, accelerator.process_index
    tokens_seen = 0
    bar = tqdm(total=t.max_steps, desc="train", disable=quiet or not main, dynamic_ncols=True)
    loss_value = float("nan")
    for step in range(t.max_steps):
        step_start = time.time()
        micro = [collate([examples[i] for i in idx], pad_id)
                 for idx in stream.micro_batches(step, t.batch_size, t.grad_accum, rank, world)]
        loss_value, tokens_step = accumulate_gradients(model, micro, accelerator)
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {step + 1}; lower trainer.lr or check the data")
        grad_norm = None
        if t.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        adapter.on_optimizer_step(step + 1, optimizer, scheduler)

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
    bar.close()

    metrics = _evaluate(task, accelerator, model, device)
    summary = {"final_loss": loss_value, "steps": t.max_steps, "tokens_seen": tokens_seen,
               "metric": task.metric, "metrics": metrics, "params": params,
               "peak_memory_mb": peak_memory_mb(device), "environment": environment_info(device)}
    if main:
        run.log({"step": t.max_steps, "eval": metrics})
        adapters.save_adapter(adapter, run.path, meta={"base_model": to_container(cfg.model),
                                                         "base_params": base_params})
        tokenizer.save_pretrained(run.tokenizer)
        say(f"{task.metric} = {metrics[task.metric]:.4f}  ({_fmt(metrics)})")
        say(f"run directory: {run.path}")
        if t.merge:
            from finetune.merge import merge_run

            out = merge_run(run.path, quiet=quiet)
            summary["merged"] = str(out)
            say(f"merged model:  {out}")
    accelerator.wait_for_everyone()
    return summary


def _evaluate(task, accelerator, model, device) -> dict:
    """Task metric on the main process's view of the model (identical weights on every rank)."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    with accelerator.autocast():
        metrics = task.evaluate(unwrapped, accelerator.device)
    unwrapped.train(was_training)
    return metrics


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
