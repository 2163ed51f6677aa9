#!/usr/bin/env python
"""Where a training step's memory goes: `finetune train` in this process (the jobs of
profile_step.py), and during one optimizer step after a warm-up

- the tensors autograd keeps from the forward for the backward (each storage once, parameters
  left out), grouped by the module whose forward kept them (layer index as *) and by their size
  in values per position, and
- the process's memory: its peak resident set size (the kernel's high-water mark) and, with glibc,
  the peak of the bytes its heap has handed out and not yet taken back (live tensors and everything
  else malloc'd, sampled every 2 ms), so that the difference shows what the allocator holds on to.

    python scripts/memory_step.py --job gsm8k                      # bench_throughput's job
    python scripts/memory_step.py --job gsm8k -- trainer.gradient_checkpointing=true

The project's own saved-tensor hooks (the lean gated MLP's down_proj, the decoder layers that
recompute their norms' outputs) are chained to the counting one, so what they keep is counted and
what they replace by a recipe is not; tensors saved under gradient checkpointing's hooks are kept
by its own rules and are not seen here. Writes docs/bench/memory-<job>-<device>.json
and .md.
"""

from __future__ import annotations

import ctypes
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import JOBS, job_overrides  # noqa: E402

from benchlib import bench_parser, hardware_info, md_heading, md_table, output_path, print_hardware, write_outputs  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use():
    """glibc's bytes in use (heap + mmapped chunks) in MiB, or None where there is no mallinfo2."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None

    def read() -> float:
        m = libc.mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20
    return read


class HeapSampler:
    """The peak of glibc's bytes in use while running, sampled on a thread (``peak`` None without glibc)."""

    def __init__(self):
        self.heap = heap_in_use()
        self.peak = 0.0 if self.heap else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.heap())
            time.sleep(0.002)

    def __enter__(self):
        if self.heap:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.heap:
            self._thread.join()


def main() -> None:
    p = bench_parser(__doc__, "memory")
    p.add_argument("--job", choices=list(JOBS), default="gsm8k")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured one")
    p.add_argument("overrides", nargs="*", help="extra config overrides (after --)")
    args = p.parse_args()
    import torch

    from finetune.config.compose import compose
    from finetune.environment import peak_memory_mb, process_status_kb, reset_peak_memory
    from finetune.models import gated_mlp, lean_layer
    from finetune.training import loop

    info = hardware_info(args.device)
    print_hardware(info)
    overrides = job_overrides(args.job, args.overrides, args.device, args.warmup + 1,
                              tempfile.mkdtemp(prefix="memory-"))
    cfg = compose(overrides)
    seen: dict[int, tuple[int, int, str]] = {}  # storage -> (bytes, values, kept by)
    measured = {"calls": 0, "positions": 0, "layers": 0}
    original = loop.accumulate_gradients

    def accumulate(model, micro, parallel, loss_chunk=0):
        measured["calls"] += 1
        if measured["calls"] != args.warmup + 1:
            return original(model, micro, parallel, loss_chunk)
        params = {q.untyped_storage().data_ptr() for q in model.parameters()}
        positions = sum(b["input_ids"].numel() for b in micro)
        config = getattr(getattr(model, "module", model), "config", None)
        measured.update(positions=positions, layers=getattr(config, "num_hidden_layers", 0))
        running = ["(outside any module)"]  # the modules whose forward is running, innermost last

        def pack(t):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in seen:
                seen[key] = (storage.nbytes(), storage.nbytes() // t.element_size(), running[-1])
            return t

        # Module names with the layer index as *, pushed and popped around every forward; plain
        # nn.Linear modules get no hooks (a hooked base layer would leave the adapters' fast path).
        handles = []
        for name, module in model.named_modules():
            if name and type(module) is not torch.nn.Linear:
                label = re.sub(r"\.\d+(\.|$)", r".*\1", name.removeprefix("module.").removeprefix("model."))
                handles.append(module.register_forward_pre_hook(lambda m, a, label=label: running.append(label)))
                handles.append(module.register_forward_hook(lambda m, a, o: running.pop() and None, always_call=True))
        # Inner saved-tensor hooks replace this one while they run: count what they keep as it is.
        inner = [(gated_mlp._Recipe, gated_mlp._Recipe.pack), (lean_layer._Recipes, lean_layer._Recipes.pack)]
        for cls, inner_pack in inner:
            cls.pack = lambda self, t, inner_pack=inner_pack: (pack(t) if (kept := inner_pack(self, t)) is t else kept)
        reset_peak_memory("cpu")
        measured["rss_before"] = (process_status_kb("VmRSS") or 0) / 1024
        try:
            with HeapSampler() as heap, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = original(model, micro, parallel, loss_chunk)
        finally:
            for handle in handles:
                handle.remove()
            for cls, inner_pack in inner:
                cls.pack = inner_pack
        measured.update(peak_rss=peak_memory_mb("cpu"), peak_heap=heap.peak)
        return result

    loop.accumulate_gradients = accumulate
    try:
        loop.train(cfg, overrides, quiet=True)
    finally:
        loop.accumulate_gradients = original
    layers, positions = max(measured["layers"], 1), measured["positions"]
    groups: dict[tuple[str, int], list] = {}
    for nbytes, values, kept_by in seen.values():
        entry = groups.setdefault((kept_by, round(values / positions)), [0, 0])
        entry[0] += 1
        entry[1] += nbytes
    total = sum(b for _, b in groups.values())
    values = sum(v for _, v, _ in seen.values())
    rows = [[f"`{kept_by}`", f"{per_position:,}", f"{count:,}", f"{nbytes / 2**20:,.0f}"]
            for (kept_by, per_position), (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1])]
    result = {"job": args.job, "overrides": overrides, "hardware": info, "positions": positions, "layers": layers,
              "saved_mb": total / 2**20, "saved_values_per_position_layer": values / max(positions, 1) / layers,
              "rss_before_step_mb": measured.get("rss_before"), "peak_rss_mb": measured.get("peak_rss"),
              "peak_heap_in_use_mb": measured.get("peak_heap"),
              "groups": [{"kept_by": m, "values_per_position": f, "tensors": c, "bytes": b}
                         for (m, f), (c, b) in groups.items()]}
    heap = measured.get("peak_heap")
    md = (md_heading(f"Where the memory goes: {args.job} ({args.device})", info)
          + f"One optimizer step of {positions:,} positions (padding included) after {args.warmup} warm-up steps. Autograd keeps "
          f"**{total / 2**20:,.0f} MiB** from the forward for the backward "
          f"(≈ {result['saved_values_per_position_layer']:,.0f} values per position and layer over {layers} layers), "
          "each storage counted once, under the module whose forward kept it first. "
          f"Process: {measured.get('rss_before', 0):,.0f} MiB resident before the step, "
          f"**{measured.get('peak_rss', 0):,.0f} MiB** at its peak"
          + (f"; glibc's heap had at most {heap:,.0f} MiB handed out (the rest of the resident set is the "
             "model's weights, libraries, and memory the allocator holds on to)" if heap else "")
          + ".\n\n"
          + md_table(["kept by", "values per position", "tensors", "MiB"], rows) + "\n")
    print(md)
    write_outputs(output_path(args, f"memory-{args.job}"), result, md)


if __name__ == "__main__":
    main()
