"""Model FLOPs utilisation (MFU): the FLOP/s a run achieves on the model's own arithmetic, over the
device's peak.

What one trained token costs (:class:`Cost`), counted from the modules, forward and backward:

- a frozen linear layer (k → d): ``2·k·d`` forward and ``2·k·d`` backward for the input's gradient;
  its weight gets no gradient, so no third product (the base of every adapter method);
- a trained linear layer (full fine-tuning): ``6·k·d`` (the weight's gradient too);
- an adapter branch: its forward FLOPs (each method's ``branch_flops``: LoRA and VB-LoRA
  ``2·r·(k + d)``, MoRA ``2·r̂²`` per used block) times three (forward, input and weight gradients),
  as each layer's ``step_flops`` says (MoRA type 6 over a frozen dense base without dropout: once,
  its forward and input gradient being the base's GEMMs with W + ΔW);
- attention: ``4·T·d_attn`` per token and layer forward (``QKᵀ`` and ``A·V`` over a context of T
  tokens, counted whole as is the convention: no halving for the causal mask), three times that
  with the backward; T is the example's length (a packed row's examples attend within themselves
  only, so each is its own context, finetune.models.attention), else the row's;
- the output projection (``lm_head``) as a frozen or trained linear layer, on the tokens with a
  target only: the loss needs no other logits (finetune's chunked loss computes no others; the
  plain path's extra logits are not credited); embeddings: none.

Padding is not counted: tokens are the batch's real tokens. The peak (:func:`peak_flops`) is a
measured fp32 matrix-multiply peak on the CPU (the best rate over a few square sizes, as the
fastest size depends on the caches, with this process's threads, cached per machine), and the
datasheet dense bf16/fp16 tensor-core peak on the GPUs in :data:`GPU_PEAKS` (else measured there
too).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from finetune.adapters.base import AdapterLayer, layer_shape
from finetune.data.batching import count_loss_tokens
from finetune.environment import cache_dir, cpu_model
from finetune.models.attention import example_starts

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; matched on the
# device name, first match wins (so the more specific names come first).
GPU_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
             ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12)]


class Cost:
    """FLOPs per trained token of ``model`` with ``adapter`` attached (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter=None):
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.forward = 0  # per token, attention excluded: forward only, and forward + backward
        self.linear = 0
        self.head = 0  # the output projection's part of ``linear``: spent on target tokens only
        inside: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in inside):
                continue
            is_head = output is not None and module is output
            branch = branch_step = 0
            if isinstance(module, AdapterLayer):
                inside.append(name)
                branch, branch_step = module.step_flops()
                module = module.root_layer()
            elif not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                continue
            k, d, _ = layer_shape(module)
            step = (6 if id(module.weight) in trained else 4) * k * d + branch_step
            self.forward += 2 * k * d + branch
            self.linear += step
            self.head += step if is_head else 0
        config = getattr(model, "config", None)
        layers = getattr(config, "num_hidden_layers", 0) or 0
        heads = getattr(config, "num_attention_heads", 0) or 0
        head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
        self.attention = 3 * 4 * layers * heads * head_dim  # per token and token of context, with the backward

    def step(self, micro_batches: list[dict]) -> float:
        """FLOPs of this process's micro-batches: every real token at its example's real length,
        the output projection on the tokens with a target."""
        total = 0.0
        for batch in micro_batches:
            contexts = context_lengths(batch)
            tokens = float(contexts.sum())
            targets = tokens if batch.get("labels") is None else count_loss_tokens(batch)
            total += ((self.linear - self.head) * tokens + self.head * targets
                      + self.attention * float((contexts * contexts).sum()))
        return total


def context_lengths(batch: dict) -> torch.Tensor:
    """The lengths of the batch's attention contexts: one per row of real tokens, or in packed rows
    (``position_ids``) one per example. Padding (``attention_mask`` 0) belongs to none."""
    real = batch["attention_mask"].detach().bool().cpu()
    positions = batch.get("position_ids")
    if positions is None:
        return real.sum(dim=1).double()
    starts = example_starts(positions.cpu())  # where the attention cuts the rows
    context = starts.flatten().cumsum(0).view_as(real)  # a number per (row, example), rising along the batch
    counts = torch.bincount(context[real])
    return counts[counts > 0].double()


CPU_SIZES = (256, 512, 1024, 2048)  # square products the CPU peak is the best of


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """The best FLOP/s of n×n matrix products over about ``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS:
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return value, f"datasheet dense bf16 peak of the {name}"
        return _measure_matmul(device, dtype, n=4096), f"measured {str(dtype).split('.')[1]} matmul peak of the {name}"
    threads = torch.get_num_threads()
    sizes = "/".join(map(str, CPU_SIZES))
    key = f"cpu|{cpu_model()}|{threads}|{torch.__version__}|{dtype}|n={sizes}"
    path = cache_dir() / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = max(_measure_matmul(device, dtype, n=n, seconds=0.25) for n in CPU_SIZES)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
    return known[key], (f"measured fp32 matmul peak (the best n×n product, n = {sizes}), {threads} threads "
                        f"(cached in {path})")

