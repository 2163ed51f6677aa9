"""The optimizer: AdamW over the method's parameter groups and the base modules a task trains in
full."""

from __future__ import annotations

import torch


def make_optimizer(adapter, trainer_cfg, full: dict | None = None):
    """AdamW over the method's parameter groups, plus the base modules trained in full (``full``,
    from ``unfreeze_modules``): matrices with the weight decay, vectors (norms, biases) without."""
    groups = adapter.param_groups(trainer_cfg.lr, trainer_cfg.weight_decay)
    full = list((full or {}).values())
    for name, params, decay in (("full_matrices", [p for p in full if p.dim() > 1], trainer_cfg.weight_decay),
                                ("full_vectors", [p for p in full if p.dim() <= 1], 0.0)):
        if params:
            groups.append({"params": params, "lr": trainer_cfg.lr, "weight_decay": decay, "name": name})
    for g in groups:
        g.setdefault("lr", trainer_cfg.lr)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                             lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay)
