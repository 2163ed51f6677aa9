"""VB-LoRA (methods.md §4): every LoRA factor is assembled from one model-wide vector bank.

    y = base_layer(x) + B · (A · drop(x))          ΔW = B·A, scaling exactly 1

Tensors, in peft's layout (§4.1):

    bank      V        (h, b)        one per adapter, shared by every layer and by both factors
    logits_A           (r, k/b, h)   per layer
    logits_B           (d/b, r, h)   per layer

Each logit vector σ ∈ R^h picks a sub-vector of length b by top-κ admixture (TKAM, §4.2): the κ
largest logits are soft-maxed and mix the corresponding bank rows. A is the TKAM of ``logits_A``
reshaped to (r, k); B is the TKAM of ``logits_B`` with its last two axes swapped, reshaped to (d, r)
(§4.3). Both are rebuilt from logits and bank on every forward call.

**Where the bank lives.** The bank is one ``nn.Parameter`` registered exactly once, on the root
module passed to :func:`attach`, under the attribute ``vblora_vector_bank`` (so ``model.parameters()``,
``model.to()``, ``model.state_dict()`` and DDP see it once). Each :class:`VBLoraLayer` keeps a plain,
unregistered reference to that root module and reads ``root.vblora_vector_bank`` at call time, so the
layer always uses the current tensor, even after ``.to()`` swaps parameters. The reference is not a
submodule: the bank is neither registered nor counted per layer. :meth:`VBLoraAdapter.unwrap` removes
the bank from the root again, so a merged and unwrapped model is a plain model.

**Storage** (§4.11). With ``save_only_topk=True`` :meth:`VBLoraAdapter.state_dict` writes, per logits
tensor, the κ top indices (``<name>_topk_indices``, integer dtype by h) and the κ−1 largest softmax
weights (``<name>_topk_weights``) instead of the full logits. Loading that form puts ``log w`` at
the stored indices and −∞ elsewhere, and marks the adapter inference-only: a training-mode forward
raises a :class:`UserError`. Training checkpoints use :meth:`VBLoraAdapter.training_state_dict`,
which always holds full logits.

**Speed.** A and B are never materialised as ΔW; the branch is two skinny matmuls as in LoRA. TKAM
is vectorised (topk + softmax + one gather + a weighted sum, no loops over sub-vectors), and
:class:`VBLoraAdapter` runs it once per model forward for all layers together (see there). No
dropout op is added when ``dropout`` is 0.

**Counting** (§4.12). :meth:`VBLoraAdapter.num_stored` follows peft's ``get_nb_savable_parameters``
("float32-equivalent": full logits, or top-κ indices weighted by their byte size relative to fp32);
:func:`count_params` / :meth:`VBLoraAdapter.param_counts` report all four conventions.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn

from finetune.adapters.base import Adapter, AdapterLayer, find_targets, inject, layer_shape
from finetune.adapters.fast import low_rank_forward
from finetune.config.schema import ALL_LINEAR
from finetune.errors import UserError

BANK_ATTR = "vblora_vector_bank"
TOPK_INDICES = "_topk_indices"
TOPK_WEIGHTS = "_topk_weights"


# --------------------------------------------------------------------------------------------
# Top-κ admixture (§4.2) and the top-κ storage encoding (§4.11)
# --------------------------------------------------------------------------------------------


# The bank's and the logits' learning rates as multiples of trainer.lr, unless set. The paper's
# absolute values (1e-3, 1e-2; its models were trained for thousands of steps) leave a short run on a
# small model at the format-only level; these ratios learn the default task within its budget, and
# the bank's 7.5 (not 10) keeps it from diverging (docs/benchmarks.md, "VB-LoRA's defaults, over seeds").
BANK_LR_RATIO = 7.5
LOGITS_LR_RATIO = 100.0


def tkam(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-κ admixture on the last axis: ``(..., h)`` logits → ``(..., b)`` sub-vectors.

    ``I = topk(σ, κ)``, ``w = softmax(σ_I)``, ``u = Σ_t w_t · V[I_t]``. Only the κ selected logits
    and bank rows receive gradient; the selection itself is not differentiated."""
    values, indices = logits.topk(topk, dim=-1)
    weights = torch.softmax(values, dim=-1).to(bank.dtype)
    rows = F.embedding(indices, bank)  # (..., κ, b): gathers bank rows, scatter-add backward
    return (weights.unsqueeze(-1) * rows).sum(-2)  # fewer dispatches than a batched matmul for small κ


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest integer dtype for top-κ indices (§4.11): uint8 below 2⁸, int16 below 2¹⁵, int32
    below 2³¹, else int64."""
    if num_vectors < 2 ** 8:
        return torch.uint8
    if num_vectors < 2 ** 15:
        return torch.int16
    if num_vectors < 2 ** 31:
        return torch.int32
    return torch.int64


_INDEX_BYTES_AS_FP32 = {torch.uint8: 0.25, torch.int16: 0.5, torch.int32: 1.0, torch.int64: 2.0}


@torch.no_grad()
def encode_topk(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits ``(..., h)`` → (indices ``(..., κ)`` sorted by descending logit, weights
    ``(..., κ−1)``: the softmax of the top-κ logits with the last, smallest weight dropped).

    Weights are stored in the logits dtype, at least fp32. Every weight is kept ≥ 4κ·eps of that
    dtype (renormalised), so that the implied last weight ``1 − Σ`` stays > 0 also when a loader
    sums in the stored dtype: after long training a logit gap > ~15 would otherwise round it to 0
    or below (``log`` → −inf or NaN). This moves ΔW by at most ~1e-6 relative, only there."""
    values, indices = logits.topk(topk, dim=-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    weights = torch.softmax(values.double(), dim=-1)
    if topk > 1:
        weights = weights.clamp_min(4 * topk * torch.finfo(dtype).eps)
        weights = weights / weights.sum(-1, keepdim=True)
    stored = weights[..., :-1].to(dtype)
    return indices.to(index_dtype(logits.shape[-1])).contiguous(), stored.contiguous()


def check_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int, name: str = "") -> None:
    """Validity of a top-κ encoding (§4.11): κ distinct indices in ``[0, h)`` per sub-vector and all
    κ weights (the implied last one included) > 0. Raises a UserError naming the tensor."""
    what = f"VB-LoRA top-k tensor {name}: " if name else "VB-LoRA top-k encoding: "
    if indices.shape[:-1] != weights.shape[:-1] or weights.shape[-1] != indices.shape[-1] - 1:
        raise UserError(f"{what}indices {tuple(indices.shape)} and weights {tuple(weights.shape)} do not fit "
                        "(weights must have one entry fewer on the last axis)")
    if indices.is_floating_point():
        raise UserError(f"{what}indices must be integers, got {indices.dtype}")
    idx = indices.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_vectors):
        raise UserError(f"{what}indices outside [0, {num_vectors})")
    if idx.shape[-1] > 1:
        s = idx.sort(dim=-1).values
        if (s[..., 1:] == s[..., :-1]).any():
            raise UserError(f"{what}repeated indices within a sub-vector")
    full = torch.cat([weights.double(), 1 - weights.double().sum(-1, keepdim=True)], dim=-1)
    implied_as_stored = 1 - weights.sum(-1)  # what a loader summing in the stored dtype sees
    if not ((full > 0).all() and (implied_as_stored > 0).all()):
        raise UserError(f"{what}mixture weights must all be > 0 (the implied last one included)")


@torch.no_grad()
def decode_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Top-κ encoding → logits ``(..., h)``: ``log w`` at the stored indices, −∞ elsewhere, where the
    last weight is ``1 − Σ`` of the stored ones. TKAM of the result reproduces the stored mixture."""
    full = torch.cat([weights.double(), 1 - weights.double().sum(-1, keepdim=True)], dim=-1)
    logits = torch.full((*indices.shape[:-1], num_vectors), float("-inf"), dtype=torch.float64,
                        device=indices.device)
    logits.scatter_(-1, indices.long(), full.log())
    return logits.to(dtype)


def assemble_factors(sub_a: torch.Tensor, sub_b: torch.Tensor, rank: int, k: int, d: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-vectors → factors (§4.3): ``(r, k/b, b)`` → A ``(r, k)``; ``(d/b, r, b)`` → swap the last
    two axes → B ``(d, r)``. Inputs may also be the same rows flattened to ``(n, b)``."""
    b = sub_a.shape[-1]
    A = sub_a.reshape(rank, k)
    B = sub_b.reshape(d // b, rank, b).transpose(1, 2).reshape(d, rank)
    return A, B


def factors_from_logits(logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor, topk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one layer from its logits and the bank (shapes from the peft layout)."""
    rank, b = logits_a.shape[0], bank.shape[1]
    k, d = logits_a.shape[1] * b, logits_b.shape[0] * b
    return assemble_factors(tkam(logits_a, bank, topk), tkam(logits_b, bank, topk), rank, k, d)


# --------------------------------------------------------------------------------------------
# Parameter counting (§4.12)
# --------------------------------------------------------------------------------------------


def count_params(shapes, rank: int, num_vectors: int, vector_length: int, topk: int) -> dict[str, int | float]:
    """The four counting conventions of §4.12 for adapted layers with ``shapes`` = [(k, d), ...].

    - ``n_subvectors``: N_sv = Σ r·(k/b + d/b)
    - ``trainable``: h·b + N_sv·h (also peft's stored count for full logits)
    - ``stored_peft_topk``: h·b + N_sv·(κ−1) + N_sv·κ·f, f = index bytes / 4 (peft's
      "float32-equivalent" count for ``save_only_topk_weights``)
    - ``stored_paper``: h·b + 1.5·N_sv (paper Sec. 3.4; κ = 2 with uint8 indices)
    - ``stored_authors``: h·b + 3·N_sv (the authors' code printout: κ indices + κ−1 weights, κ = 2)
    """
    h, b = num_vectors, vector_length
    n_sv = sum(rank * (k // b + d // b) for k, d in shapes)
    f = _INDEX_BYTES_AS_FP32[index_dtype(h)]
    bank = h * b
    return {
        "n_subvectors": n_sv,
        "trainable": bank + n_sv * h,
        "stored_peft_full": bank + n_sv * h,
        "stored_peft_topk": int(bank + n_sv * (topk - 1) + n_sv * topk * f),
        "stored_paper": bank + 1.5 * n_sv,
        "stored_authors": bank + 3 * n_sv,
    }


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class VBLoraLayer(AdapterLayer):
    """A linear layer plus ``B·A`` with A and B assembled by TKAM from the shared bank.

    ``bank_owner`` is the module that registers the bank as ``vblora_vector_bank`` (the root model
    under :func:`attach`); the layer holds it as a plain attribute, not as a submodule."""

    method = "vblora"
    adapter_param_names = ("vblora_logits_A", "vblora_logits_B")

    def __init__(self, base_layer: nn.Module, bank_owner: nn.Module, rank: int, vector_length: int,
                 topk: int, dropout: float = 0.0, init_logits_std: float = 0.01):
        super().__init__(base_layer, dropout)
        object.__setattr__(self, "_bank_owner", bank_owner)  # unregistered reference
        bank = self.bank
        h, b = bank.shape
        if b != vector_length:
            raise ValueError(f"bank vector length {b} != vector_length {vector_length}")
        k, d = self.in_features, self.out_features
        self.rank, self.topk, self.vector_length = rank, topk, vector_length
        self.inference_only = False  # set when loaded from a top-κ file (§4.11)
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # set for one model forward
        self.vblora_logits_A = nn.Parameter(torch.empty(rank, k // b, h, device=bank.device, dtype=bank.dtype))
        self.vblora_logits_B = nn.Parameter(torch.empty(d // b, rank, h, device=bank.device, dtype=bank.dtype))
        self.reset_logits(init_logits_std)

    @property
    def bank(self) -> nn.Parameter:
        return getattr(self._bank_owner, BANK_ATTR)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.bank.dtype  # §4.4: the branch input is cast to the bank's dtype

    @torch.no_grad()
    def reset_logits(self, std: float) -> None:
        """Logits ~ N(0, std²) (§4.7; the paper's std is 0.01, peft's default 0.1)."""
        nn.init.normal_(self.vblora_logits_A, 0.0, std)
        nn.init.normal_(self.vblora_logits_B, 0.0, std)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with A ∈ R^{r×k} and B ∈ R^{d×r}, assembled by TKAM (§4.3)."""
        bank = self.bank
        return self.assemble(tkam(self.vblora_logits_A, bank, self.topk),
                             tkam(self.vblora_logits_B, bank, self.topk))

    def assemble(self, sub_a: torch.Tensor, sub_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return assemble_factors(sub_a, sub_b, self.rank, self.in_features, self.out_features)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        self._check_trainable()
        A, B = self._factors if self._factors is not None else self.factors()
        return F.linear(F.linear(x, A), B)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The exact fused route of :mod:`finetune.adapters.fast` (LoRA's, with scaling 1)."""
        self._check_trainable()
        A, B = self._factors if self._factors is not None else self.factors()
        return low_rank_forward(self, x, A, B, 1.0)

    def _check_trainable(self) -> None:
        if self.inference_only and self.training:
            raise UserError("this VB-LoRA adapter was loaded from a top-k file (save_only_topk): its "
                            "logits are -inf outside the top-k and cannot be trained; use it for "
                            "inference or merging, or train from a full-logits checkpoint")

    def branch_flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)  # as LoRA, once A and B are assembled

    def _delta(self) -> torch.Tensor:
        A, B = self.factors()
        return B @ A


# --------------------------------------------------------------------------------------------
# The model-level handle
# --------------------------------------------------------------------------------------------


def _checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model has activation (gradient) checkpointing switched on."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), attr, None), property):
            return bool(getattr(model, attr))
    return False


class VBLoraAdapter(Adapter):
    """Model-level handle. Besides the :class:`Adapter` duties it runs TKAM for all layers at once:
    a forward pre-hook on the root model assembles every active layer's A and B in one batched
    top-κ/softmax/gather (identical values to the per-layer path, a handful of kernels instead of
    ~15 per layer), the layers use them during that forward, and a forward hook drops them. Layers
    called outside a root forward, and every layer while gradient checkpointing is active (its
    recomputation runs after the root forward), assemble their own factors."""

    method = "vblora"

    def __init__(self, model: nn.Module, layers: dict[str, VBLoraLayer], settings: dict):
        super().__init__(model, layers, settings, shared={BANK_ATTR: getattr(model, BANK_ATTR)})
        self.batched = True  # batched TKAM per root forward (set False to force the per-layer path)
        self._hooks = [model.register_forward_pre_hook(self._assemble_all),
                       model.register_forward_hook(self._release, always_call=True)]

    def _assemble_all(self, module, args) -> None:
        self._release()
        if not self.batched or (_checkpointing(self.model) and torch.is_grad_enabled()):
            return
        active = [l for l in self.layers.values() if not (l.merged or l.disabled)]
        if len(active) < 2 or any(l.inference_only and l.training for l in active):
            return  # nothing to batch, or let the layer raise its error
        bank = self.bank
        h = bank.shape[0]
        flat = [t.reshape(-1, h) for l in active for t in (l.vblora_logits_A, l.vblora_logits_B)]
        sub = tkam(torch.cat(flat), bank, active[0].topk).split([t.shape[0] for t in flat])
        for i, layer in enumerate(active):
            layer._factors = layer.assemble(sub[2 * i], sub[2 * i + 1])

    def _release(self, *unused) -> None:
        for layer in self.layers.values():
            layer._factors = None

    def set_sharded(self) -> None:
        """Sharded parameters (FSDP2, ZeRO-3) are gathered one layer at a time, so the root's batched
        assembly cannot see them: each layer assembles its own factors, in its own forward."""
        self.batched = False

    @property
    def bank(self) -> nn.Parameter:
        return getattr(self.model, BANK_ATTR)

    @property
    def inference_only(self) -> bool:
        return any(layer.inference_only for layer in self.layers.values())

    def named_trainable(self):
        # The bank is read from the model at call time (a ``.to()`` may have replaced it).
        yield BANK_ATTR, self.bank
        for name, layer in self.layers.items():
            for pname in layer.adapter_param_names:
                yield f"{name}.{pname}", getattr(layer, pname)

    # -- counting -------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int | float]:
        """Every convention of §4.12 for this adapter (see :func:`count_params`)."""
        s = self.settings
        shapes = [(l.in_features, l.out_features) for l in self.layers.values()]
        return count_params(shapes, s["rank"], s["num_vectors"], s["vector_length"], s["topk"])

    def num_stored(self) -> int:
        """peft's "float32-equivalent" stored count: top-κ form when ``save_only_topk``, else the
        full logits (= trainable)."""
        c = self.param_counts()
        return int(c["stored_peft_topk"] if self.settings.get("save_only_topk") else c["stored_peft_full"])

    def summary(self, base_params: int) -> dict:
        out = super().summary(base_params)
        out["stored_convention"] = ("peft float32-equivalent, top-k indices and weights"
                                    if self.settings.get("save_only_topk") else "peft, full logits")
        out["vblora_counts"] = self.param_counts()
        return out

    # -- optimizer --------------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Bank at ``lr_bank`` and logits at ``lr_logits``, weight decay 0 on both (§4.8); unset,
        they follow ``lr`` (``trainer.lr``) at :data:`BANK_LR_RATIO` and :data:`LOGITS_LR_RATIO` times it."""
        if self.inference_only:
            raise UserError("this VB-LoRA adapter was loaded from a top-k file (save_only_topk) and is "
                            "inference/merge only; train from a full-logits checkpoint")
        logits = [p for name, p in self.named_trainable() if name != BANK_ATTR]
        return [
            {"params": [self.bank], "lr": self.settings.get("lr_bank") or BANK_LR_RATIO * lr, "weight_decay": 0.0,
             "name": "vblora_bank"},
            {"params": logits, "lr": self.settings.get("lr_logits") or LOGITS_LR_RATIO * lr, "weight_decay": 0.0,
             "name": "vblora_logits"},
        ]

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, only_topk: bool | None = None, values: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
        """Adapter tensors (``values``: see :meth:`Adapter.state_dict`). With ``only_topk`` (default:
        the ``save_only_topk`` setting) each logits tensor ``<name>`` becomes ``<name>_topk_indices``
        and ``<name>_topk_weights`` (§4.11)."""
        if only_topk is None:
            only_topk = bool(self.settings.get("save_only_topk"))
        state = {}
        for name, p in (values or dict(self.named_trainable())).items():
            if only_topk and name != BANK_ATTR:
                indices, weights = encode_topk(p.detach(), self.settings["topk"])
                state[name + TOPK_INDICES] = indices
                state[name + TOPK_WEIGHTS] = weights
            else:
                state[name] = p.detach()
        return state

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """Training checkpoints always hold full logits (§4.11)."""
        return self.state_dict(only_topk=False)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full logits or the top-κ form (per tensor). Top-κ tensors become logits ``log w`` at
        the stored indices and −∞ elsewhere, and make the adapter inference-only."""
        h = self.settings["num_vectors"]
        state = dict(state)
        decoded = set()
        for key in [k for k in state if k.endswith(TOPK_INDICES)]:
            base = key[: -len(TOPK_INDICES)]
            wkey = base + TOPK_WEIGHTS
            if wkey not in state:
                raise UserError(f"adapter weights: {key} has no matching {wkey}")
            indices, weights = state.pop(key), state.pop(wkey)
            check_topk(indices, weights, h, base)
            state[base] = decode_topk(indices, weights, h)
            decoded.add(base)
        super().load_state_dict(state)
        for name, layer in self.layers.items():
            layer.inference_only = any(f"{name}.{p}" in decoded for p in layer.adapter_param_names)

    # -- switching --------------------------------------------------------------------------------
    def unwrap(self) -> None:
        """Replace every adapter layer by its base layer, remove the hooks and the bank from the model."""
        for handle in self._hooks:
            handle.remove()
        self._release()
        super().unwrap()
        if hasattr(self.model, BANK_ATTR):
            delattr(self.model, BANK_ATTR)


# --------------------------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _check_settings(rank, num_vectors, vector_length, topk, dropout, init_logits_std, init_bank_bound,
                    lr_bank, lr_logits) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"method.rank={rank} must be a positive integer")
    if not isinstance(num_vectors, int) or num_vectors < 1:
        raise UserError(f"method.num_vectors={num_vectors} must be a positive integer")
    if not isinstance(vector_length, int) or vector_length < 1:
        raise UserError(f"method.vector_length={vector_length} must be a positive integer")
    if not isinstance(topk, int) or not 1 <= topk <= num_vectors:
        raise UserError(f"method.topk={topk} must be an integer in [1, num_vectors={num_vectors}]")
    if not 0 <= dropout < 1:
        raise UserError(f"method.dropout={dropout}: must be in [0, 1)")
    if init_logits_std < 0:
        raise UserError(f"method.init_logits_std={init_logits_std}: must be >= 0")
    if init_bank_bound <= 0:
        raise UserError(f"method.init_bank_bound={init_bank_bound}: must be > 0 (a zero bank gets no gradient)")
    for key, value in (("lr_bank", lr_bank), ("lr_logits", lr_logits)):
        if value is not None and value <= 0:
            raise UserError(f"method.{key}={value}: must be > 0")


def check_divisible(shapes: dict[str, tuple[int, int]], vector_length: int) -> None:
    """§4.6: b must divide k and d of every adapted layer; the error names the first offending
    module, its (k, d) and b, and lists the vector lengths that would fit every targeted module."""
    b = vector_length
    for name, (k, d) in shapes.items():
        if k % b or d % b:
            common = reduce(math.gcd, [x for kd in shapes.values() for x in kd])
            raise UserError(f"VB-LoRA: method.vector_length={b} does not divide module {name} with "
                            f"(in, out) = ({k}, {d}); vector lengths that divide every targeted module: "
                            f"{', '.join(map(str, _divisors(common)))}")


def attach(model: nn.Module, rank: int = 8, num_vectors: int = 256, vector_length: int = 64, topk: int = 2,
           dropout: float = 0.0, init_logits_std: float = 0.01, init_bank_bound: float = 0.02,
           lr_bank: float | None = None, lr_logits: float | None = None, save_only_topk: bool = False,
           targets=tuple(ALL_LINEAR)) -> VBLoraAdapter:
    """Register one bank ``(h, b)`` on ``model`` and wrap every targeted layer with a VB-LoRA layer;
    freeze everything else. The bank is drawn once from U(±init_bank_bound), then each layer's
    logits from N(0, init_logits_std²), in module order."""
    _check_settings(rank, num_vectors, vector_length, topk, dropout, init_logits_std, init_bank_bound,
                    lr_bank, lr_logits)
    targets = targets if isinstance(targets, str) else list(targets)
    if hasattr(model, BANK_ATTR):
        raise UserError("the model already has a VB-LoRA adapter; attach VB-LoRA once per model")
    names = find_targets(model, targets)
    modules = {n: model.get_submodule(n) for n in names}
    check_divisible({n: layer_shape(m)[:2] for n, m in modules.items()}, vector_length)

    device = next(next(iter(modules.values())).parameters()).device
    bank = torch.empty(num_vectors, vector_length, device=device, dtype=torch.float32)
    nn.init.uniform_(bank, -init_bank_bound, init_bank_bound)
    setattr(model, BANK_ATTR, nn.Parameter(bank))

    layers = inject(model, targets, lambda name, m: VBLoraLayer(m, model, rank, vector_length, topk, dropout,
                                                                init_logits_std), rank)
    getattr(model, BANK_ATTR).requires_grad_(True)  # inject froze every parameter of the model
    settings = dict(rank=rank, num_vectors=num_vectors, vector_length=vector_length, topk=topk,
                    dropout=dropout, init_logits_std=init_logits_std, init_bank_bound=init_bank_bound,
                    lr_bank=lr_bank, lr_logits=lr_logits, save_only_topk=save_only_topk, targets=targets)
    return VBLoraAdapter(model, layers, settings)
