"""Fully sharded data parallel with PyTorch's FSDP2 (``fully_shard``), applied by finetune itself on
any device torch runs it on (CPU over gloo, GPUs over NCCL).

Units: one per decoder layer (the model's ``_no_split_modules`` classes), then the root, which keeps
what no layer holds: embeddings, the final norm, ``lm_head`` (tied or not) and VB-LoRA's vector bank,
which every layer reads. A layer's frozen base weights and its trainable adapter tensors share its
unit. Parameters of bitsandbytes 4/8-bit layers are left out of the sharding (``ignored_params``):
each rank keeps the small quantized base whole, and only the rest is sharded. The optimizer is built
after sharding, over the sharded parameters, so its state is sharded too.

Each rank holds a 1/N slice (along the first dimension) of every sharded parameter, its gradient and
its optimizer state. A unit's parameters are gathered for its forward and backward and freed again
(``reshard_after_forward``); gradients are reduce-scattered after the window's last micro-batch
(``set_requires_gradient_sync`` skips the earlier ones). On CUDA with ``trainer.precision=bf16`` the
forward runs under autocast, as with DDP, over fp32 (or frozen bf16) parameters.
"""

from __future__ import annotations

import contextlib

import torch

from finetune.errors import UserError
from finetune.training.distributed import broadcast_trainable, ensure_process_group
from finetune.training.parallel import Parallel


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class is in ``_no_split_modules`` (transformers'
    own list of what must not be split across devices)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"launcher=fsdp: cannot find the decoder layers of {type(model).__name__} (it names no "
                        "_no_split_modules); use launcher=ddp")
    return layers


def quantized_parameters(model) -> set[torch.nn.Parameter]:
    """The parameters of bitsandbytes 4/8-bit layers (kept whole on every rank)."""
    from finetune.adapters.base import is_quantized

    return {p for m in model.modules() if is_quantized(m) for p in m.parameters(recurse=False)}


def shard(model, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every decoder layer, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    ignored = quantized_parameters(model) or None
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, reshard_after_forward=reshard_after_forward, ignored_params=ignored)


def is_sharded(tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # a DTensor


class FSDP(Parallel):
    def prepare(self, model, adapter, make_optimizer):
        ensure_process_group(self.device)
        broadcast_trainable(model)
        adapter.set_sharded()
        shard(model)
        return model, make_optimizer()

    def unwrap(self, model):
        return model  # fully_shard changes the model's class in place: nothing wraps it

    def forward_context(self):
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return float(norm.full_tensor() if is_sharded(norm) else norm)

    @contextlib.contextmanager
    def whole_parameters(self, model):
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if is_sharded(tensor):
            tensor = tensor.full_tensor()
        return tensor.detach().cpu()

    # A sharded tensor is split along its first dimension into chunks of ceil(rows / ranks) rows
    # (the last ones shorter or empty), so each rank holds one contiguous range of elements.
    def local_range(self, tensor: torch.Tensor) -> tuple[int, int]:
        if not is_sharded(tensor):
            return super().local_range(tensor)
        _check_row_sharding(tensor)
        rows = tensor.shape[0]
        per_rank = -(-rows // tensor.device_mesh.size())
        first = min(tensor.device_mesh.get_local_rank() * per_rank, rows)
        row_numel = tensor.numel() // rows if rows else 0
        local = tensor.to_local()
        if local.shape[0] != min(per_rank, rows - first):
            raise RuntimeError(f"unexpected FSDP2 shard of a {tuple(tensor.shape)} tensor: {tuple(local.shape)}")
        return first * row_numel, local.numel()

    def piece(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        if not is_sharded(tensor):
            return super().piece(tensor)
        start, length = self.local_range(tensor)
        return (tensor.to_local().detach().reshape(-1), start) if length else None

    def from_range(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not is_sharded(like):
            return super().from_range(flat, like)
        from torch.distributed.tensor import DTensor

        local = like.to_local()
        local = flat.reshape(local.shape).to(device=local.device, dtype=local.dtype)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                                  run_check=False)


def _check_row_sharding(tensor) -> None:
    from torch.distributed.tensor import Shard

    if tensor.device_mesh.ndim != 1 or len(tensor.placements) != 1 or tensor.placements[0] != Shard(0):
        raise RuntimeError(f"finetune's checkpoints expect FSDP2's row sharding, got {tensor.placements}")

