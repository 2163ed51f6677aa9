"""Writing a merged model tensor by tensor (``finetune merge``), so that its peak memory stays near
one copy of the model.

The base model stays as loaded (frozen weights, memory-mapped from their safetensors file where
transformers does that) and the adapter stays unmerged: its layers step aside (the model's own modules
are put back, as ``Adapter.unwrap`` does) but still compute ΔW. For every tensor of the state dict,
in order, :func:`save_merged` computes ``W + ΔW`` in fp32 for the adapted weights (``ΔW`` from the
adapter layers, :meth:`AdapterLayer.delta_weight`) or takes ``W`` as it is, converts it to the output
dtype, writes it to the open safetensors shard and lets it go: the only extra memory is one tensor.
No merged fp32 model, no converted copy of the model, no whole-shard buffer ever exists.

The files are ordinary safetensors (8-byte header length, JSON header with dtype, shape and data
offsets, then the data; shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``
when there is more than one), written next to ``config.json`` and ``generation_config.json`` exactly
as ``save_pretrained`` lays them out; tied weights are written once (transformers' own rule when it
has one). Models whose saved format differs from their modules (transformers' weight conversions,
e.g. fused experts) and remote-code models fall back to the in-place merge plus ``save_pretrained``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from finetune.adapters.base import replace_module

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def adapter_deltas(adapter) -> dict[int, list]:
    """``id(base weight) -> [adapter layers]``: where ΔW goes, computed later one layer at a time."""
    out: dict[int, list] = {}
    for layer in getattr(adapter, "layers", {}).values():
        out.setdefault(id(layer.root_layer().weight), []).append(layer)
    return out


def step_aside(model, adapter) -> tuple[dict[str, torch.Tensor] | None, dict[int, list]]:
    """Put the model's own modules back in place of the adapter layers (which still compute ΔW) and
    return ``(state, deltas)``: the tensors to write under their saved names (None when only
    ``save_pretrained`` knows how: weight conversions, remote code) and :func:`adapter_deltas`.
    ``merged_tensor(state[name], deltas)`` is then each merged tensor, one at a time."""
    deltas = adapter_deltas(adapter)
    for name, layer in getattr(adapter, "layers", {}).items():
        replace_module(model, name, layer.base_layer)
    shared = {id(p) for p in getattr(adapter, "shared", {}).values()}
    state = None if getattr(model.config, "auto_map", None) else _state_to_save(model, shared)
    return state, deltas


def _state_to_save(model, exclude: set[int]) -> dict[str, torch.Tensor] | None:
    """The tensors ``save_pretrained`` would write, under its names, or None when they are not the
    model's own tensors (weight conversions to revert: use ``save_pretrained`` then). Tensors whose
    id is in ``exclude`` (an adapter's shared tensors registered on the model) are left out."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in exclude}
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None:
        state = remove_tied_weights_from_state_dict(dict(state), model)
    else:  # older transformers: keep the first name of tensors that share storage
        seen, kept = set(), {}
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                kept[name] = t
        state = kept
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    reverted = revert_weight_conversion(model, dict(state))
    if set(reverted) != set(state) or any(reverted[k] is not state[k] for k in state):
        return None  # renamed, split or fused tensors: only save_pretrained knows how to write them
    return state


def _write_config(model, directory: Path, dtype: torch.dtype) -> None:
    import transformers

    name = str(dtype).split(".")[1]
    model.config.dtype = name
    if int(transformers.__version__.split(".")[0]) < 5:
        model.config.torch_dtype = name
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


def _out_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.is_floating_point() else t.dtype


def _shards(items: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, dt) in enumerate(items):
        n = _nbytes(shape, dt)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _nbytes(shape, dt: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dt).element_size()


def save_merged(model, adapter, directory: str | Path, dtype: str | torch.dtype = "float32",
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write ``model`` with ``adapter`` (attached, unmerged) merged into it, in ``dtype``, as a Hugging
    Face model directory; afterwards the model is plain (the adapter unwrapped, as after
    ``adapter.merge(); adapter.unwrap()``, but its weights stay unmerged in memory). Returns
    ``"streamed"``, or ``"save_pretrained"`` when the model needs the in-place fallback."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state, deltas = step_aside(model, adapter)
    items = [] if state is None else [(k, tuple(v.shape), _out_dtype(v, dtype)) for k, v in state.items()]
    with torch.no_grad():
        if state is None or any(dt not in SAFETENSORS_DTYPES for _, _, dt in items):
            adapter.merge()
            adapter.unwrap()
            model.to(dtype)
            model.save_pretrained(directory, safe_serialization=True)
            return "save_pretrained"
        shards = _shards(items, max_shard_bytes)
        files = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        _write_config(model, directory, dtype)
        weight_map, total = {}, 0
        for file, shard in zip(files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for i in shard:
                name, shape, dt = items[i]
                n = _nbytes(shape, dt)
                header[name] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
                weight_map[name] = file
            total += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(directory / file, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                for i in shard:
                    name, shape, dt = items[i]
                    t = merged_tensor(state[name], deltas).to(dt).contiguous().cpu()
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    del t
        if len(files) > 1:
            (directory / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    adapter.unwrap()
    return "streamed"


def merged_tensor(t: torch.Tensor, deltas: dict[int, list]) -> torch.Tensor:
    """``t`` itself, or ``t + Σ ΔW`` in fp32 (fp64 kept) when adapter layers sit on it."""
    layers = deltas.get(id(t))
    t = t.detach()
    if not layers:
        return t
    merged = None
    for layer in layers:
        delta = layer.delta_weight().to(t.device)
        merged = (t.to(delta.dtype) if merged is None else merged) + delta
    if not torch.isfinite(merged.sum(dtype=torch.float64)):  # one pass; NaN and ±inf propagate, no overflow
        raise RuntimeError("merge produced non-finite weights; nothing was written for this model")
    return merged
