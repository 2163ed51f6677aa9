"""DeepSpeed ZeRO stage 3 (``launcher=deepspeed``; ``pip install finetune[deepspeed]``), set up by
finetune itself with ``deepspeed.initialize`` on any device DeepSpeed runs on (CPU over gloo, GPUs
over NCCL).

Parameters, gradients and optimizer state are partitioned over the ranks; the optimizer is the same
torch AdamW (and parameter groups) as everywhere else, which DeepSpeed drives over its fp32
partitions. finetune keeps the loop: DeepSpeed's gradient accumulation is unmanaged
(``managed_gradient_accumulation: false``), so every micro-batch's backward only accumulates and
the one ``step()`` per window reduces, clips (``gradient_clipping`` = ``trainer.max_grad_norm``) and
updates; the loss is finetune's token-normalised sum, never rescaled by DeepSpeed. The base model is
built and loaded whole before DeepSpeed partitions it (no ``zero.Init``): a random-init base is drawn
exactly as in one process and saved in full. The one-time C++ shared-memory communication op that
DeepSpeed would compile on the CPU is not used (plain gloo is).
"""

from __future__ import annotations

import contextlib
import os

import torch

from finetune.errors import UserError
from finetune.training.distributed import broadcast_trainable, ensure_process_group
from finetune.training.parallel import Parallel


def deepspeed_config(cfg, num_processes: int, device: str) -> dict:
    """The DeepSpeed config finetune uses: ZeRO-3, micro-batches and accumulation from ``trainer``."""
    t = cfg.trainer
    precision = t.precision if t.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return {
        "train_micro_batch_size_per_gpu": int(t.batch_size),
        "gradient_accumulation_steps": int(t.grad_accum),
        "train_batch_size": int(t.batch_size * t.grad_accum * num_processes),
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(t.max_grad_norm),
        "zero_optimization": {"stage": 3, "contiguous_gradients": True, "overlap_comm": device == "cuda"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _skip_shm_op() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op on the CPU at its first use (minutes of C++
    build); gloo does the same job. Mark the op unavailable before DeepSpeed looks for it."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class Zero3(Parallel):
    def prepare(self, model, adapter, make_optimizer):
        try:
            import deepspeed
        except ImportError:
            raise UserError("launcher=deepspeed needs the deepspeed package: pip install 'finetune[deepspeed]'") from None
        if self.device.type == "cpu":
            _skip_shm_op()
        ensure_process_group(self.device)
        broadcast_trainable(model)
        adapter.set_sharded()
        optimizer = make_optimizer()
        config = deepspeed_config(self.cfg, self.num_processes, self.device.type)
        # DeepSpeed reads LOCAL_RANK (at start-up and in its forward hooks), which only a launcher
        # sets; a process of one without a launcher is local rank 0.
        os.environ.setdefault("LOCAL_RANK", "0")
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                          dist_init_required=False)
        if getattr(engine, "managed_gradient_accumulation", lambda: True)():
            raise UserError(f"launcher=deepspeed: deepspeed {deepspeed.__version__} cannot leave gradient accumulation "
                            "to finetune (managed_gradient_accumulation); pip install 'finetune[deepspeed]'")
        self.engine = engine
        return engine, ds_optimizer

    def unwrap(self, model):
        return model.module

    def no_sync(self, model):
        return contextlib.nullcontext()  # unmanaged accumulation: backward never reduces

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer, parameters, max_norm: float) -> float | None:
        self.engine.step()  # reduce, clip to gradient_clipping, update, zero the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if (norm is not None and max_norm > 0) else None

    @contextlib.contextmanager
    def whole_parameters(self, model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A trained parameter from its fp32 master partitions; anything else gathered as it is."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        if not hasattr(tensor, "ds_id"):
            return tensor.detach().cpu()
        if tensor.requires_grad:
            return safe_get_full_fp32_param(tensor).detach().cpu()
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone().cpu()

    # -- checkpoints: each rank its partition of every flattened trained tensor ---------------------
    def whole_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(tensor.ds_shape) if hasattr(tensor, "ds_id") else tuple(tensor.shape)

    def local_range(self, tensor: torch.Tensor) -> tuple[int, int]:
        if not hasattr(tensor, "ds_id"):
            return super().local_range(tensor)
        per_rank = tensor.ds_tensor.ds_numel
        start = min(self.process_index * per_rank, tensor.ds_numel)
        return start, min(per_rank, tensor.ds_numel - start)

    def piece(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        from deepspeed.utils import safe_get_local_fp32_param

        if not hasattr(tensor, "ds_id"):
            return super().piece(tensor)
        start, length = self.local_range(tensor)
        return (safe_get_local_fp32_param(tensor).reshape(-1)[:length], start) if length else None

    def optimizer_pieces(self, optimizer, named: dict) -> dict:
        from deepspeed.utils import safe_get_local_optimizer_state

        out = {}
        for name, param in named.items():
            if not (hasattr(param, "ds_id") and param.requires_grad):
                continue
            start, length = self.local_range(param)
            state = optimizer.optimizer.state[self._flat(optimizer, param)]
            for key, value in state.items():
                if key == "step":
                    if self.process_index == 0:
                        out[f"{name}/step"] = (value.detach().reshape(-1).float().cpu(), 0, ())
                elif length:
                    local = safe_get_local_optimizer_state(param, key).reshape(-1)[:length]
                    out[f"{name}/{key}"] = (local, start, self.whole_shape(param))
        return out

    def load_optimizer(self, optimizer, named: dict, pieces) -> None:
        from deepspeed.utils import safe_set_local_optimizer_state

        from finetune.training.parallel import _state_keys

        saved = _state_keys(pieces)
        for name, param in named.items():
            if name not in saved or not hasattr(param, "ds_id"):
                continue
            start, length = self.local_range(param)
            flat = self._flat(optimizer, param)
            state = optimizer.optimizer.state[flat]  # empty before the first step: AdamW makes it lazily
            for key in saved[name]:
                if key == "step":
                    state["step"] = pieces.whole(f"{name}/step").reshape(()).float()
                    continue
                state.setdefault(key, torch.zeros_like(flat))
                local = torch.zeros(param.ds_tensor.ds_numel, dtype=torch.float32, device=param.ds_tensor.device)
                if length:
                    local[:length] = pieces.range(f"{name}/{key}", start, length)
                safe_set_local_optimizer_state(param, local, key)

    @staticmethod
    def _flat(optimizer, param) -> torch.Tensor:
        """The flat fp32 partition (of its group) that holds ``param``'s part: what the client
        optimizer updates and keeps its state for."""
        group = optimizer.grad_position[optimizer.get_param_id(param)][0]
        return optimizer.fp32_partitioned_groups_flat[group]
