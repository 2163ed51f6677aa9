"""The adapter-layer contract shared by every method (methods.md §0).

An adapter layer wraps a frozen base layer (``base_layer``) and adds a branch ``g(drop(x))``:

    y = base_layer(x) + g(drop(x))

Each method subclasses :class:`AdapterLayer` and implements ``branch`` (the linear map g, with the
input already cast to the adapter dtype) and ``_delta`` (the closed form of ΔW in the ``(d, k)``
layout). Everything else — dropout placement, dtype rule, merge/unmerge, disabling, fan_in_fan_out,
the identity-push ΔW — lives here once.

:class:`Adapter` is the model-level handle returned by every method's ``attach``: it owns the list
of adapted layers plus any tensors shared across layers (VB-LoRA's vector bank), and provides
parameter counting, optimizer groups, state dicts and whole-model merging.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from finetune.config.schema import ALL_LINEAR
from finetune.errors import UserError

# --------------------------------------------------------------------------------------------
# Base-layer helpers
# --------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_bnb(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name == "Linear4bit":
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def layer_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(k, d, fan_in_fan_out)`` of a supported base layer; raises for anything else."""
    if isinstance(module, AdapterLayer):
        return module.in_features, module.out_features, module.fan_in_fan_out
    if _is_conv1d(module):
        k, d = module.weight.shape
        return int(k), int(d), True
    if isinstance(module, nn.Linear):  # includes bitsandbytes Linear4bit / Linear8bitLt
        return module.in_features, module.out_features, False
    raise UserError(f"unsupported layer type {type(module).__name__}: adapters wrap nn.Linear, Conv1D "
                    "and bitsandbytes 4/8-bit linear layers only")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a dense fp32 tensor in its storage layout (dequantized for bnb layers)."""
    kind = _is_bnb(module)
    w = module.weight
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        if getattr(w.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(f"this {type(module).__name__} weight was repacked by bitsandbytes for its CPU "
                               "inference kernel and no longer dequantizes exactly; load the model with "
                               "finetune.models.load.load_model, or attach the adapter before any eval forward")
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "8bit":
        state = getattr(module, "state", None)
        scb = getattr(w, "SCB", None) if getattr(w, "SCB", None) is not None else getattr(state, "SCB", None)
        if w.dtype == torch.int8 and scb is not None:
            return (w.data.float() * scb.float().unsqueeze(1) / 127.0)
        return w.data.float()
    return w.data.float()


def is_quantized(module: nn.Module) -> bool:
    return _is_bnb(module) is not None


# --------------------------------------------------------------------------------------------
# The layer contract
# --------------------------------------------------------------------------------------------


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` and adds a method-specific branch. Subclasses implement
    :meth:`branch` and :meth:`_delta`, and list their tensors in ``adapter_param_names``."""

    method: str = ""
    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = layer_shape(base_layer)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    # -- to implement ------------------------------------------------------------------------
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """g(x): (..., k) -> (..., d). x is already dropped out and cast to the adapter dtype."""
        raise NotImplementedError

    def _delta(self) -> torch.Tensor:
        """Closed-form ΔW in the (d, k) layout, in the adapter dtype."""
        raise NotImplementedError

    def branch_flops(self) -> int:
        """FLOPs of g(x) for one token, forward (for MFU: finetune.training.flops)."""
        raise NotImplementedError

    def step_flops(self) -> tuple[int, int]:
        """What the branch adds to one token's FLOPs as it is computed: (forward, forward + backward);
        the backward computes the input's and the adapter tensors' gradients, a forward each."""
        forward = self.branch_flops()
        return forward, 3 * forward

    # -- shared behaviour ----------------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.adapter_tensors()[0].dtype

    def adapter_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.adapter_param_names]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs:
            out = self.fast_forward(x)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        h = self.dropout(x.to(self.adapter_dtype))
        return result + self.branch(h).to(result.dtype)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Optional: ``base_layer(x) + branch(drop(x))`` computed by an exact faster route
        (:mod:`finetune.adapters.fast`), or None to use the generic path above."""
        return None

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32 (or fp64 if the adapter is fp64), in the storage layout of the base weight."""
        with torch.autocast(device_type="cpu", enabled=False):
            delta = self._delta()
        delta = delta if delta.dtype == torch.float64 else delta.float()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def delta_by_identity(self, chunk: int = 2048) -> torch.Tensor:
        """ΔW computed by pushing the identity through the branch (methods.md §0.3), storage layout."""
        k = self.in_features
        dtype = self.adapter_dtype
        device = self.adapter_tensors()[0].device
        cols = []
        for start in range(0, k, chunk):
            eye = torch.eye(k, dtype=dtype, device=device)[start:start + chunk]
            cols.append(self.branch(eye).T)  # (d, chunk)
        delta = torch.cat(cols, dim=1)
        return delta.T if self.fan_in_fan_out else delta

    def root_layer(self) -> nn.Module:
        """The innermost wrapped layer (adapters may be stacked)."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        base = self.root_layer()
        if is_quantized(base):
            raise UserError(f"cannot merge in place into a quantized {type(base).__name__} layer; "
                            "use `finetune merge`, which writes a dequantized full-precision model")
        w = base.weight
        delta = self.delta_weight().to(device=w.device)
        summed = w.data.to(delta.dtype) + sign * delta
        if not torch.isfinite(summed).all():
            raise RuntimeError("merge produced non-finite weights; the adapter is not merged")
        w.data.copy_(summed.to(w.dtype))

    def merge(self) -> None:
        if self.merged:
            warnings.warn("adapter layer already merged; not merging again", stacklevel=2)
            return
        self._add_to_base(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._add_to_base(-1.0)
        self.merged = False


# --------------------------------------------------------------------------------------------
# Targets and injection
# --------------------------------------------------------------------------------------------


def matches_target(name: str, targets) -> bool:
    """peft's rule: a list entry matches a full name equal to it or ending in '.' + entry;
    a string is a regex that must match the full module name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the modules selected by ``targets``; ``lm_head`` / output embeddings never match
    "all-linear". Raises a UserError when nothing matches."""
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "base_layer" or ".base_layer." in name:
            continue  # inside a wrapper: stacking wraps the wrapper, never its base
        if targets == "all-linear":
            ok = isinstance(module, (nn.Linear, AdapterLayer)) or _is_conv1d(module)
            ok = ok and module is not output_emb and not name.endswith("lm_head")
        else:
            ok = matches_target(name, targets)
        if ok:
            names.append(name)
    if not names:
        raise UserError(f"method.targets={targets!r} matches no module of the model; "
                        f"e.g. {', '.join(ALL_LINEAR)} or 'all-linear'")
    return names


def check_rank(rank: int, shapes: dict[str, tuple[int, int]], key: str = "method.rank") -> None:
    """A rank above min(in, out) of a layer buys parameters that cannot raise the rank of its ΔW:
    refused when that holds for every adapted layer, a warning when for some."""
    from finetune.errors import warn

    over = {name: min(kd) for name, kd in shapes.items() if rank > min(kd)}
    if over and len(over) == len(shapes):
        widest = max(min(kd) for kd in shapes.values())
        raise UserError(f"{key}={rank} is wider than every adapted layer (ΔW of a layer has rank at most "
                        f"min(in, out), {widest} at most here); use {key} <= {widest}")
    if over:
        name, width = next(iter(over.items()))
        warn(f"{key}={rank} exceeds min(in, out) of {len(over)} of {len(shapes)} adapted layers (e.g. {name}: "
             f"{width}); their ΔW cannot use the extra rank")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, targets, make_layer: Callable[[str, nn.Module], AdapterLayer], rank: int | None = None
           ) -> dict[str, AdapterLayer]:
    """Freeze the model, wrap every targeted module with ``make_layer(name, module)``; ``rank``: the
    method's rank, checked against the targeted layers' sizes (:func:`check_rank`)."""
    if rank is not None:
        shapes = {}
        for name in find_targets(model, targets):
            try:
                shapes[name] = layer_shape(model.get_submodule(name))[:2]
            except UserError:
                continue  # an unsupported layer: make_layer says so, in the method's words
        if shapes:
            check_rank(rank, shapes)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes would repack 4-bit weights for a bf16 CPU kernel without autograd at the first
        # no-grad eval forward, after which gradients through them are wrong: keep the standard
        # layout and exact path (as finetune.models.load.keep_4bit_layout does when loading).
        if _is_bnb(module) == "4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    layers = {}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name in find_targets(model, targets):
        module = model.get_submodule(name)
        if embeddings is not None and getattr(module, "weight", None) is getattr(embeddings, "weight", 0):
            raise UserError(f"method.targets selects {name}, whose weight is tied to the input embeddings "
                            "(tie_word_embeddings): an adapter there would change both; leave it out of the targets")
        layer = make_layer(name, module)
        layer.train(module.training)  # a new wrapper inherits the train/eval mode of what it wraps
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


def unfreeze_modules(model: nn.Module, names, adapter: "Adapter") -> dict[str, nn.Parameter]:
    """Make the base modules matching ``names`` (the target rules: suffixes or a regex) train in
    full next to the adapter — e.g. embeddings, norms and ``lm_head`` when pretraining (methods.md
    §3). Returns their parameters by name (tied weights once), minus those the adapter trains
    already (method=full). Modules inside adapter layers cannot be chosen: the adapter owns them."""
    if not names:
        return {}
    names = names if isinstance(names, str) else list(names)
    owned = {id(p) for p in adapter.parameters()}
    wrapped = {id(p) for layer in adapter.layers.values() for p in layer.root_layer().parameters()}
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    matched = False
    for name, module in model.named_modules():
        if not name or not matches_target(name, names):
            continue
        matched = True
        for pname, p in module.named_parameters():
            if id(p) in seen or id(p) in owned:
                continue
            if id(p) in wrapped:
                raise UserError(f"task.train_modules: {name} holds layers the method adapts; a layer trains "
                                "either in full or through the adapter, not both")
            seen.add(id(p))
            p.requires_grad_(True)
            found[f"{name}.{pname}"] = p
    if not matched:
        raise UserError(f"task.train_modules={names!r} matches no module of the model; e.g. embed_tokens, "
                        "norm, input_layernorm, post_attention_layernorm, lm_head")
    return found


# --------------------------------------------------------------------------------------------
# The model-level handle
# --------------------------------------------------------------------------------------------


@dataclass
class Restart:
    """What a ReMoRA/ReLoRA merge after optimizer step ``step`` asks of the training loop
    (methods.md §3 steps 4 and 5): drop the optimizer state of ``reset`` (empty: keep every state),
    then restart the LR schedule with a linear re-warmup over ``warmup`` steps
    (finetune.training.schedule.apply_restart)."""

    step: int
    warmup: int
    reset: list = field(default_factory=list)


class Adapter:
    """What ``attach`` returns: the adapted layers of one model plus shared tensors.

    ``settings`` holds the method's config (plain values) exactly as passed to ``attach``; it is
    written into ``adapter.json`` so that the adapter can be re-attached on load.
    """

    method: str = ""

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], settings: dict,
                 shared: dict[str, nn.Parameter] | None = None):
        self.model = model
        self.layers = layers
        self.settings = dict(settings)
        self.shared = dict(shared or {})

    # -- parameters ---------------------------------------------------------------------------
    def named_trainable(self) -> Iterable[tuple[str, nn.Parameter]]:
        yield from self.shared.items()
        for name, layer in self.layers.items():
            for pname in layer.adapter_param_names:
                yield f"{name}.{pname}", getattr(layer, pname)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_stored(self) -> int:
        """Parameters written to disk (differs from trainable for VB-LoRA's top-k format)."""
        return self.num_trainable()

    def lora_equivalent(self, rank: int) -> int:
        """Trainable parameters of LoRA at ``rank`` on the same layers: Σ r(k + d)."""
        return sum(rank * (l.in_features + l.out_features) for l in self.layers.values())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": self.parameters(), "lr": lr, "weight_decay": weight_decay, "name": self.method}]

    # -- state --------------------------------------------------------------------------------
    def state_dict(self, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds. ``values``: the trainable tensors by name, to use instead
        of the live ones (e.g. gathered whole from the shards of a sharded run)."""
        values = values if values is not None else dict(self.named_trainable())
        return {k: values[k].detach() for k, _ in self.named_trainable()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"adapter weights do not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        for k, p in own.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise UserError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, "
                                f"the model expects {tuple(p.shape)}")
            p.copy_(state[k].to(p.dtype))

    BASE_WEIGHT_KEY = "::base_weight"

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint (finetune.training.checkpoint) stores to continue the run exactly: the
        adapter tensors and, when training merges into the base (:meth:`merges_into_base`), the
        current base weight of every adapted layer (``<layer>::base_weight``)."""
        state = dict(self.state_dict())
        if self.merges_into_base():
            for name, layer in self.layers.items():
                state[name + self.BASE_WEIGHT_KEY] = layer.root_layer().weight.detach()
        return state

    @torch.no_grad()
    def load_training_state_dict(self, state: dict[str, torch.Tensor], settings: dict) -> None:
        """Restore :meth:`training_state_dict`; ``settings`` are the adapter settings saved with it
        (subclasses restore what they keep there, e.g. MoRA's per-layer types)."""
        state = dict(state)
        for key in [k for k in state if k.endswith(self.BASE_WEIGHT_KEY)]:
            name = key[: -len(self.BASE_WEIGHT_KEY)]
            if name not in self.layers:
                raise UserError(f"checkpoint base weight {name} is not an adapted layer of this model")
            weight = self.layers[name].root_layer().weight
            weight.copy_(state.pop(key).to(weight.dtype))
        self.load_state_dict(state)

    # -- switching ----------------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.disabled = not enabled

    def unwrap(self) -> None:
        """Replace every adapter layer by its base layer (after merging: a plain model)."""
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.base_layer)

    # -- training hooks -----------------------------------------------------------------------
    def on_optimizer_step(self, step: int) -> Restart | None:
        """Called after every optimizer step (``step`` steps done). ReMoRA/ReLoRA merge here and
        return the :class:`Restart` the loop applies to the optimizer and schedule; None by default."""
        return None

    def set_sharded(self) -> None:
        """The model's parameters are about to be sharded across processes (FSDP2, ZeRO-3): from
        now on a layer's tensors are whole only inside that layer's own forward. No-op by default."""

    def merges_into_base(self) -> bool:
        """Whether training writes into the base weights (ReMoRA/ReLoRA merges). The run must then
        save its base (:meth:`save_base`): the adapter alone no longer describes the model."""
        return False

    def save_base(self, directory) -> None:
        """Write the base model alone as a Hugging Face directory: adapter layers swapped out for
        their base layers and shared adapter tensors left out, so ``from_pretrained`` loads it and
        the saved adapter re-attaches to it (RUN_DIR/base after training changed the base)."""
        if any(layer.merged for layer in self.layers.values()):
            raise RuntimeError("save_base needs unmerged adapter layers (W0 without ΔW)")
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.base_layer)
        try:
            state = {k: v for k, v in self.model.state_dict().items() if k not in self.shared}
            self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        finally:
            for name, layer in self.layers.items():
                replace_module(self.model, name, layer)

    def summary(self, base_params: int) -> dict:
        stored = self.num_stored()
        trainable = self.num_trainable()
        rank = self.settings.get("rank")
        out = {"trainable_params": trainable, "stored_params": stored,
               "trainable_pct_of_base": 100.0 * trainable / max(base_params, 1),
               "stored_pct_of_base": 100.0 * stored / max(base_params, 1)}
        if rank:
            lora = self.lora_equivalent(int(rank))
            out["lora_same_rank_params"] = lora
            out["stored_ratio_to_lora"] = stored / max(lora, 1)
        return out
