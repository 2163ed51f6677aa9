"""Training checkpoints: everything needed to continue a run exactly — the trained tensors, the
optimizer and LR-schedule state, every rank's RNG states — gathered from the training processes,
handed to the run's checkpoint folder (finetune.run.checkpoints, which writes it atomically), and
restored from it. The data position needs no file: the example stream is a function of the step
(finetune.data.batching).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.config.compose import to_yaml
from finetune.errors import UserError
from finetune.run.checkpoints import (
    CONFIG,
    DIR,
    MARKER,
    META,
    OPTIMIZER,
    RNG,
    STATE,
    WEIGHTS,
    is_complete,
    prune,
    write,
)
from finetune.training.distributed import gather_objects, on_main

# --------------------------------------------------------------------------------------------
# State pieces: optimizer, scheduler, RNG
# --------------------------------------------------------------------------------------------


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def optimizer_state(model, optimizer) -> tuple[dict, dict]:
    """(tensors, JSON part) of the optimizer state, keyed by parameter name so that it loads into
    any wrapping of the same model (plain, DDP, FSDP2: gathered in full). Every rank must call it."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, _raw(optimizer),
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors, scalars = {}, {}
    for name, state in sd.get("state", {}).items():  # ranks other than 0 get an empty dict
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": sd.get("param_groups", []), "scalars": scalars}


def load_optimizer_state(model, optimizer, tensors: dict, info: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    for name, extra in info["scalars"].items():
        state.setdefault(name, {}).update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in info["param_groups"]]
    set_optimizer_state_dict(model, _raw(optimizer), {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"python": _jsonable(random.getstate()),
           "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(gauss)},
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _split_rng(states: list[dict]) -> tuple[dict, list[dict]]:
    """Per-rank RNG states → (tensors for safetensors, JSON records)."""
    tensors, records = {}, []
    for rank, s in enumerate(states):
        tensors[f"rank{rank}/torch"] = s["torch"]
        for i, t in enumerate(s.get("cuda") or []):
            tensors[f"rank{rank}/cuda{i}"] = t
        records.append({"python": s["python"], "numpy": s["numpy"], "cuda_devices": len(s.get("cuda") or [])})
    return tensors, records


def _join_rng(tensors: dict, records: list[dict], rank: int) -> dict:
    """The RNG state saved by ``rank`` (rank modulo the saved world size)."""
    r = rank % len(records)
    rec = records[r]
    return {"python": rec["python"], "numpy": rec["numpy"], "torch": tensors[f"rank{r}/torch"],
            "cuda": [tensors[f"rank{r}/cuda{i}"] for i in range(rec["cuda_devices"])]}


# --------------------------------------------------------------------------------------------
# Gathering the weights
# --------------------------------------------------------------------------------------------


EXTRA = "trainable::"  # key prefix of trained parameters outside the adapter (e.g. task.train_modules)


def training_tensors(parallel, model, adapter) -> dict:
    """The adapter's training tensors plus every other trainable parameter of the model (by its
    name, prefixed ``trainable::``), whole and on the CPU. Sharded FSDP2 parameters are gathered:
    a collective, so every rank calls it, in the same order."""
    named = dict(adapter.training_state_dict())
    own = {id(p) for p in adapter.parameters()}
    for name, p in parallel.unwrap(model).named_parameters():
        if p.requires_grad and id(p) not in own:
            named[EXTRA + name] = p
    out = {}
    for name, value in named.items():
        if hasattr(value, "full_tensor"):  # a DTensor shard (FSDP2)
            value = value.full_tensor()
        out[name] = value.detach().cpu().contiguous()
    return out


def load_training_tensors(state: dict, model, adapter, settings: dict) -> None:
    import torch

    extra = {k[len(EXTRA):]: state.pop(k) for k in [k for k in state if k.startswith(EXTRA)]}
    adapter.load_training_state_dict(state, settings)
    with torch.no_grad():
        for name, value in extra.items():
            try:
                p = model.get_parameter(name)
            except AttributeError:
                raise UserError(f"the checkpoint trains parameter {name}, which this model does not have") from None
            p.copy_(value.to(p.dtype))


def checkpoint_files(step: int, weights: dict, adapter_meta: dict, optim: tuple[dict, dict],
                     rng_states: list[dict], scheduler_state: dict, info: dict, config_yaml: str
                     ) -> tuple[dict[str, dict], dict[str, str]]:
    """The files of checkpoint ``step``: (tensor files, text files) for ``finetune.run.checkpoints.write``."""
    opt_tensors, opt_info = optim
    rng_tensors, rng_records = _split_rng(rng_states)
    state = {"step": step, **info, "optimizer": opt_info, "scheduler": scheduler_state, "rng": rng_records,
             "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tensors = {WEIGHTS: weights, OPTIMIZER: opt_tensors, RNG: rng_tensors}
    texts = {META: json.dumps(adapter_meta, indent=2, default=str) + "\n",
             STATE: json.dumps(state, default=_json_default) + "\n", CONFIG: config_yaml}
    return tensors, texts


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


# --------------------------------------------------------------------------------------------
# The handle the training loop uses
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves checkpoints of one run; remembers the last one written (or resumed from)."""

    def __init__(self, run_dir: Path, cfg, parallel, model, adapter, optimizer, scheduler,
                 last: Path | None = None):
        self.root = Path(run_dir) / DIR
        self.keep = int(cfg.trainer.keep_checkpoints)
        self.config_yaml = to_yaml(cfg)
        self.global_batch = cfg.trainer.batch_size * cfg.trainer.grad_accum * parallel.num_processes
        self.parallel, self.model, self.adapter = parallel, model, adapter
        self.optimizer, self.scheduler = optimizer, scheduler
        self.last = last

    def save(self, step: int, tokens_seen: int) -> Path:
        """Every rank calls this (the gathers are collective); the main process writes."""
        acc = self.parallel
        weights = training_tensors(acc, self.model, self.adapter)
        optim = optimizer_state(self.model, self.optimizer)
        rng_states = gather_objects(acc, rng_state())
        meta = {"method": self.adapter.method, "settings": self.adapter.settings}
        info = {"tokens_seen": tokens_seen, "num_processes": acc.num_processes,
                "global_batch": self.global_batch}

        def write_and_prune():
            path = write(self.root, step, *checkpoint_files(step, weights, meta, optim, rng_states,
                                                             self.scheduler.state_dict(), info, self.config_yaml))
            prune(self.root, self.keep)
            return str(path)

        self.last = Path(on_main(acc, write_and_prune))
        return self.last


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    path: Path
    step: int
    state: dict

    @property
    def tokens_seen(self) -> int:
        return int(self.state.get("tokens_seen", 0))


def open_checkpoint(path: Path) -> Loaded:
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"trainer.resume={path}: not a complete checkpoint (no valid {MARKER} marker)")
    state = json.loads((path / STATE).read_text())
    return Loaded(path, int(state["step"]), state)


def restore_weights(ckpt: Loaded, model, adapter) -> None:
    """Adapter tensors (with ReMoRA's base weights and layer types) and other trained parameters
    from the checkpoint; call before the model is prepared (wrapped) for distributed training."""
    from safetensors.torch import load_file

    meta = json.loads((ckpt.path / META).read_text())
    if meta.get("method") != adapter.method:
        raise UserError(f"trainer.resume={ckpt.path}: the checkpoint is a {meta.get('method')} run, "
                        f"this config trains {adapter.method}")
    load_training_tensors(load_file(str(ckpt.path / WEIGHTS)), model, adapter, meta.get("settings") or {})


def restore_training(ckpt: Loaded, model, optimizer, scheduler, rank: int) -> None:
    """Optimizer and LR-scheduler state, and this rank's RNG states; call after ``prepare``."""
    from safetensors.torch import load_file

    load_optimizer_state(model, optimizer, load_file(str(ckpt.path / OPTIMIZER)), ckpt.state["optimizer"])
    scheduler.load_state_dict(dict(ckpt.state["scheduler"]))
    set_rng_state(_join_rng(load_file(str(ckpt.path / RNG)), ckpt.state["rng"], rank))
