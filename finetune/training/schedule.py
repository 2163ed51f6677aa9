"""Learning-rate schedules: linear warmup, then linear / cosine decay to 0 or constant, with
optional "jagged" restarts and optimizer-state resets (ReMoRA/ReLoRA, methods.md §3 steps 4-5).

:class:`WarmupDecay` is a picklable callable for ``torch.optim.lr_scheduler.LambdaLR``: it maps the
0-based optimizer step to a factor of each group's base LR. Its attributes (including restarts) are
saved in the scheduler's ``state_dict``, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math


class WarmupDecay:
    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        if kind not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind = kind
        self.warmup = warmup_steps
        self.total = total_steps
        self.restarts: list[tuple[int, float, int]] = []  # (trigger step, peak factor, warmup)

    def _decay(self, peak: float, j: int, span: int) -> float:
        """Factor j steps into a decay of length ``span`` starting from ``peak``."""
        if self.kind == "constant" or span <= 0:
            return peak
        frac = min(max(j / span, 0.0), 1.0)
        if self.kind == "linear":
            return peak * (1.0 - frac)
        return peak * 0.5 * (1.0 + math.cos(math.pi * frac))

    def __call__(self, step: int) -> float:
        if self.restarts and step >= self.restarts[-1][0]:
            t0, peak, w = self.restarts[-1]
            j = step - t0 + 1  # the j-th step after the trigger, j = 1, 2, ...
            if j < w:
                return peak * j / w
            return self._decay(peak, j - w, self.total - t0 - w)
        if step < self.warmup:
            return (step + 1) / self.warmup
        return self._decay(1.0, step - self.warmup, self.total - self.warmup)

    def restart(self, step: int, warmup: int) -> None:
        """Restart after ``step`` optimizer steps: re-warm to the current LR, then decay to 0."""
        self.restarts.append((step, self(step), warmup))


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, total_steps))


def reset_optimizer_state(optimizer, params) -> None:
    """Delete the optimizer state (moments, step count) of ``params`` only; other parameters keep
    theirs (methods.md §3 step 4, pretraining mode)."""
    for p in params:
        optimizer.state.pop(p, None)


def restart_schedule(scheduler, step: int, warmup: int) -> None:
    """Jagged restart (methods.md §3 step 5) of a LambdaLR over :class:`WarmupDecay`: each group
    re-warms linearly over ``warmup`` steps to its LR at the trigger, then decays to 0 at the end of
    the run. The groups' current LR is refreshed at once, so no step runs at the old LR."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or not all(hasattr(f, "restart") for f in lambdas):
        raise TypeError("ReMoRA needs a LambdaLR over finetune.training.schedule.WarmupDecay "
                        f"(got {type(scheduler).__name__})")
    for f in {id(f): f for f in lambdas}.values():  # LambdaLR shares one callable across groups:
        f.restart(step, warmup)                      # restart each schedule once
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def apply_restart(restart, optimizer=None, scheduler=None) -> None:
    """Carry out an adapter's :class:`finetune.adapters.base.Restart` (None: nothing to do). Works
    whether the scheduler has already stepped for this step or not."""
    if restart is None:
        return
    if optimizer is not None:
        reset_optimizer_state(getattr(optimizer, "optimizer", optimizer), restart.reset)
    if scheduler is not None:
        restart_schedule(scheduler, restart.step, restart.warmup)
