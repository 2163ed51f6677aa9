"""Small collective helpers on top of an ``accelerate.Accelerator``, so that every rank takes the same
decision (run directory, stop request, success or failure of a main-process step) and no rank is
left waiting in a collective for a peer that raised.

With one process every helper is a plain function call.
"""

from __future__ import annotations

import socket

from finetune.errors import UserError


def broadcast_object(accelerator, obj):
    """The main process's ``obj`` on every rank (picklable Python values)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather_objects(accelerator, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if accelerator.num_processes == 1:
        return bool(flag)
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def on_main(accelerator, fn, *args, **kwargs):
    """Run ``fn`` on the main process only and share its outcome: its return value on every rank,
    or the same exception (UserError keeps its message; anything else becomes a RuntimeError naming
    it) raised on every rank, so a failure on the main process never strands the others."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # re-raised below, on every rank
            error = e
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return result
    shared = broadcast_object(accelerator, (result, _describe(error)))
    if error is not None:
        raise error
    result, described = shared
    if described is not None:
        kind, message = described
        raise UserError(message) if kind == "UserError" else RuntimeError(message)
    return result


def _describe(error):
    if error is None:
        return None
    return type(error).__name__, str(error)


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device) -> None:
    """FSDP2 and ZeRO-3 work on a process group even in one process: without a launcher, make a
    group of one (gloo on the CPU, NCCL on CUDA) on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if getattr(device, "type", device) == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def broadcast_trainable(model) -> None:
    """Every trainable parameter as rank 0 has it, on every rank. Sharding keeps each rank's own
    slice of its own tensors (DDP, by contrast, broadcasts when it wraps), so a tensor drawn at
    random on each rank — an adapter's initialisation — must agree before it is sharded."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
