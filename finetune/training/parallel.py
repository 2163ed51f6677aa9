"""How the processes of a run share one model: the parts of the training loop that differ between
one process or data parallel (DDP), fully sharded data parallel (FSDP2, ``finetune.training.fsdp``)
and DeepSpeed ZeRO-3 (``finetune.training.zero3``). The loop talks to a :class:`Parallel` only:

    parallel = FSDP(accelerator, cfg)                            # or Parallel (DDP), Zero3
    model, optimizer = parallel.prepare(model, adapter, make_optimizer)  # wrap or shard, then optimize
    with parallel.forward_context():  loss = ...                 # autocast where nothing else does it
    with parallel.no_sync(model):     parallel.backward(loss)    # micro-batches before the last
    norm = parallel.step(optimizer, params, max_norm)           # clip, step, zero the gradients
    with parallel.whole_parameters(model): ...                   # every tensor whole, e.g. to save it

Every kind shards (or not) itself, on any device torch runs it on: FSDP2 and ZeRO-3 run on the CPU
over gloo as on GPUs over NCCL. Accelerate's own FSDP and DeepSpeed modes are not used: on the CPU
it would silently run plain data parallel instead, and one code path is tested everywhere.
"""

from __future__ import annotations

import contextlib

import torch


class Parallel:
    """One process, or data parallel through Accelerate (every rank holds the whole model; the
    gradients are averaged by DDP)."""

    def __init__(self, accelerator, cfg=None):
        self.accelerator = accelerator
        self.cfg = cfg

    # -- the processes --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction=reduction)

    # -- the model --------------------------------------------------------------------------------
    def prepare(self, model, adapter, make_optimizer):
        """Wrap ``model`` (with ``adapter`` attached) for the processes and build its optimizer
        (``make_optimizer()``, called once the parameters are final: after sharding for the
        sharded kinds)."""
        return self.accelerator.prepare(model, make_optimizer())

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def forward_context(self):
        """Around the training forward pass: Accelerate's prepared model autocasts by itself."""
        return contextlib.nullcontext()

    def autocast(self):
        """Around evaluation forward passes."""
        return self.accelerator.autocast()

    def no_sync(self, model):
        """Around the backward passes of the micro-batches before a window's last one: gradients
        stay local until the last one (only entered with several processes)."""
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, optimizer, parameters, max_norm: float) -> float | None:
        """Clip the gradients of ``parameters`` to ``max_norm`` (0: no clipping), take the optimizer
        step and zero the gradients; returns the total gradient norm before clipping (None
        without clipping)."""
        norm = self.clip_grad_norm(parameters, max_norm) if max_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    @contextlib.contextmanager
    def whole_parameters(self, model):
        """Inside the block every parameter of ``model`` is whole on every rank (all ranks enter)."""
        yield

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor behind ``tensor`` (a parameter or its optimizer state), on the CPU;
        a collective for the sharded kinds, so every rank calls it in the same order."""
        return tensor.detach().cpu()

    # -- checkpoints: each rank writes and reads the part of each tensor it holds ----------------
    def whole_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def local_range(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(start, length): the elements of ``tensor`` (row-major) this rank holds."""
        return 0, tensor.numel()

    def piece(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """(flat elements, start) of ``tensor`` for this rank to write; None: another rank writes
        them (replicated tensors are written once, by rank 0)."""
        if self.process_index != 0:
            return None
        return tensor.detach().reshape(-1), 0

    def from_range(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a tensor (read back from pieces) as a tensor laid out like ``like``."""
        return flat.reshape(like.shape).to(device=like.device, dtype=like.dtype)

    def optimizer_pieces(self, optimizer, named: dict) -> dict:
        """This rank's pieces of the optimizer state of the parameters ``named``, keyed
        ``<name>/<state key>`` (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
        state = _raw(optimizer).state
        out = {}
        for name, param in named.items():
            for key, value in state.get(param, {}).items():
                piece = self.piece(value) if torch.is_tensor(value) else None
                if piece is not None:
                    out[f"{name}/{key}"] = (*piece, tuple(self.whole_shape(value)))
        return out

    def load_optimizer(self, optimizer, named: dict, pieces) -> None:
        """Set the optimizer state of the parameters ``named`` from ``pieces``
        (finetune.run.checkpoints.Pieces), each rank reading the elements it holds."""
        state = _raw(optimizer).state
        saved = _state_keys(pieces)
        for name, param in named.items():
            if name not in saved:
                continue
            entry = {}
            for key in saved[name]:
                full = f"{name}/{key}"
                if pieces.shapes[full] == tuple(self.whole_shape(param)):  # moments: laid out like the parameter
                    start, length = self.local_range(param)
                    entry[key] = self.from_range(pieces.range(full, start, length), param)
                else:  # the step count
                    entry[key] = pieces.whole(full)
            state[param] = entry


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _state_keys(pieces) -> dict[str, list[str]]:
    """``{parameter name: [state keys]}`` of an optimizer's pieces."""
    out: dict[str, list[str]] = {}
    for full in pieces.names():
        name, _, key = full.rpartition("/")
        out.setdefault(name, []).append(key)
    return out
