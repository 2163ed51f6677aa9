"""Training checkpoints: everything needed to continue a run exactly — the trained tensors, the
optimizer and LR-schedule state, every rank's RNG states — gathered from the training processes,
handed to the run's checkpoint folder (finetune.run.checkpoints, which writes it atomically), and
restored from it. The data position needs no file: the example stream is a function of the step
(finetune.data.batching).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.config.compose import to_yaml
from finetune.errors import UserError, first_line
from finetune.run import checkpoints
from finetune.run.checkpoints import CONFIG, DIR, MARKER, META, OPTIMIZER, RNG, STATE, WEIGHTS, is_complete
from finetune.training.distributed import gather_objects, on_main

# --------------------------------------------------------------------------------------------
# What a checkpoint holds: trained tensors, optimizer state, RNG states
# --------------------------------------------------------------------------------------------

EXTRA = "trainable::"  # name prefix of trained parameters outside the adapter (e.g. task.train_modules)


def training_tensors(parallel, model, adapter) -> dict:
    """The tensors a checkpoint restores the run's weights from, by name: the adapter's trainable
    tensors (the parameters themselves, sharded or not), the base weights a ReMoRA/ReLoRA run
    changed, and every other trainable parameter of the model (prefixed ``trainable::``)."""
    named = dict(adapter.named_trainable())
    named.update({k: v for k, v in adapter.training_state_dict().items() if k not in named})
    own = {id(p) for p in adapter.parameters()}
    for name, p in parallel.unwrap(model).named_parameters():
        if p.requires_grad and id(p) not in own:
            named[EXTRA + name] = p
    return named


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


def _pieces_of(parallel, named: dict) -> dict:
    """This rank's pieces of the tensors ``named`` (see finetune.run.checkpoints)."""
    out = {}
    for name, tensor in named.items():
        piece = parallel.piece(tensor)
        if piece is not None:
            out[name] = (*piece, tuple(parallel.whole_shape(tensor)))
    return out


def optimizer_groups(optimizer) -> list[dict]:
    """The optimizer's hyper-parameters per group (learning rates, betas, ...), without the tensors."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_optimizer_groups(optimizer, groups: list[dict]) -> None:
    if len(groups) != len(optimizer.param_groups):
        raise UserError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's "
                        f"{len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})


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


def checkpoint_texts(step: int, adapter_meta: dict, optimizer_info: dict, rng_records: list[dict],
                     scheduler_state: dict, info: dict, config_yaml: str) -> dict[str, str]:
    """The text files of checkpoint ``step`` (the pieces and RNG tensors are written apart)."""
    state = {"step": step, **info, "optimizer": optimizer_info, "scheduler": scheduler_state, "rng": rng_records,
             "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return {META: json.dumps(adapter_meta, indent=2, default=str) + "\n",
            STATE: json.dumps(state, default=_json_default) + "\n", CONFIG: config_yaml}


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
        """Every rank calls this: each writes its own pieces into the checkpoint's temporary folder,
        then the main process writes the rest and completes it."""
        p = self.parallel
        tmp = on_main(p, lambda: str(checkpoints.begin(self.root, step) or ""))
        rng_states = gather_objects(p, rng_state())
        error, digests = None, {}
        if tmp:
            named = training_tensors(p, self.model, self.adapter)
            try:
                for path in (checkpoints.write_pieces(Path(tmp), WEIGHTS, p.process_index, _pieces_of(p, named)),
                             checkpoints.write_pieces(Path(tmp), OPTIMIZER, p.process_index,
                                                      p.optimizer_pieces(self.optimizer, named))):
                    if path is not None:  # each rank checksums its own files, all at once
                        digests[path.name] = checkpoints.file_digest(path)
            except Exception as e:  # reported by the main process below, so no rank is left waiting
                error = f"{type(e).__name__}: {first_line(e)}"
        written = gather_objects(p, (error, digests))
        errors = [e for e, _ in written if e]
        meta = {"method": self.adapter.method, "settings": self.adapter.settings}
        info = {"tokens_seen": tokens_seen, "num_processes": p.num_processes, "global_batch": self.global_batch}

        def complete():
            if not tmp:
                return str(checkpoints.step_dir(self.root, step))
            if errors:
                checkpoints.abort(Path(tmp))
                raise UserError(f"cannot write checkpoint step-{step} in {self.root}: {errors[0]}")
            rng_tensors, rng_records = _split_rng(rng_states)
            texts = checkpoint_texts(step, meta, {"param_groups": optimizer_groups(self.optimizer)}, rng_records,
                                     self.scheduler.state_dict(), info, self.config_yaml)
            all_digests = {name: sha for _, d in written for name, sha in d.items()}
            path = checkpoints.finish(self.root, step, Path(tmp), {RNG: rng_tensors}, texts, all_digests)
            checkpoints.prune(self.root, self.keep)
            return str(path)

        self.last = Path(on_main(p, complete))
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
    from the checkpoint, whole; call before the model is prepared (wrapped or sharded)."""
    meta = json.loads((ckpt.path / META).read_text())
    if meta.get("method") != adapter.method:
        raise UserError(f"trainer.resume={ckpt.path}: the checkpoint is a {meta.get('method')} run, "
                        f"this config trains {adapter.method}")
    with _readable(ckpt):
        pieces = checkpoints.Pieces(ckpt.path, WEIGHTS)
        state = {name: pieces.whole(name) for name in pieces.names()}
    load_training_tensors(state, model, adapter, meta.get("settings") or {})


@contextlib.contextmanager
def _readable(ckpt: Loaded):
    """A checkpoint file that cannot be read (one written before checksums, damaged since) is one line."""
    try:
        yield
    except (UserError, KeyError):
        raise
    except Exception as e:
        raise UserError(f"trainer.resume={ckpt.path}: cannot read the checkpoint ({first_line(e)}); resume from an "
                        "earlier checkpoint") from None


def restore_training(ckpt: Loaded, parallel, model, adapter, optimizer, scheduler) -> None:
    """Optimizer state (each rank reads the part it holds), LR schedule, and this rank's RNG
    states; call after ``prepare``."""
    from safetensors.torch import load_file

    named = training_tensors(parallel, model, adapter)
    with _readable(ckpt):
        parallel.load_optimizer(optimizer, named, checkpoints.Pieces(ckpt.path, OPTIMIZER))
        rng = load_file(str(ckpt.path / RNG))
    load_optimizer_groups(optimizer, ckpt.state["optimizer"]["param_groups"])
    scheduler.load_state_dict(dict(ckpt.state["scheduler"]))
    set_rng_state(_join_rng(rng, ckpt.state["rng"], parallel.process_index))
