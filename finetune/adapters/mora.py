"""MoRA (methods.md §2) and ReMoRA (§3): a high-rank update from one square matrix per layer.

    y = base_layer(x) + f_decomp( M · f_comp(drop(x)) ),      M ∈ R^{r̂×r̂},  M = 0 at init

``f_comp`` (R^k → R^r̂) and ``f_decomp`` (R^r̂ → R^d) are fixed and parameter-free; only M trains.
For the parameter budget of LoRA at rank r, r̂ = int(√((k + d)·r) + 0.5), per layer (§2.1).

Types (§2.3): only 1, 2, 3, 4 and 6 exist.

====  ====================  ============================  ======================
type  compression           decompression                 role
====  ====================  ============================  ======================
1     C_mod (sum mod r̂)     T_tile (y_o = h_{o mod r̂})    "sharing": large ranks
2     C_grp (contiguous)    T_rep (repeat-interleave)     ReMoRA cycle only
3     C_grp                 T_tile                        ReMoRA cycle only
4     C_mod                 T_rep                         ReMoRA cycle only
6     RoPE-rotated blocks   concatenate, crop or tile     "RoPE": small ranks
====  ====================  ============================  ======================

``type="auto"`` picks type 6 when ``rank < AUTO_TYPE1_MIN_RANK`` (64) and type 1 otherwise; with
ReMoRA on it always picks type 1 (the cycle must start at 1). The threshold is a project decision
(the paper documents none, §2.6): the published small-rank runs (r = 8) use type 6, the
large-rank ones (r ≥ 128) type 1.

Padding is cyclic (§2.2): the input is extended as x̃_t = x_{t mod k}, which is the reference's
"append x[0:pad]" wherever that works and also covers r̂ > 2k, where the reference crashes.

ΔW is computed by the closed forms of §2.3 (index arithmetic only, never a loop over entries);
:meth:`AdapterLayer.delta_by_identity` gives the same matrix generically (§0.3) and the tests hold
the two together. The defects of the reference listed in §2.8 are not reproduced: no scaling
attribute, M stored once, merge of N_in = 1 and of ``Conv1D`` layers works, RoPE tables are
per-layer non-persistent buffers, unsupported layers and types are rejected.

ReMoRA (§3) lives in :meth:`MoraAdapter.on_optimizer_step`: every ``remora_every`` optimizer steps
ΔW is merged into W0, M is reset to 0, each layer moves to the next type of the cycle, and the
returned :class:`Restart` has the training loop drop the optimizer state of the M matrices and
restart the LR schedule with a linear re-warmup.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from finetune.adapters.base import (
    Adapter,
    AdapterLayer,
    Restart,
    _is_bnb,
    _is_conv1d,
    find_targets,
    inject,
    is_quantized,
)
from finetune.adapters.fast import mora_forward, plain_linear
from finetune.config.schema import ALL_LINEAR
from finetune.errors import UserError

TYPES = (1, 2, 3, 4, 6)
"""The only MoRA types (§2.3); anything else is a configuration error."""

AUTO_TYPE1_MIN_RANK = 64
"""``type="auto"``: rank < 64 → type 6 (RoPE), rank ≥ 64 → type 1 (sharing) (§2.6)."""

REMORA_CYCLES = {4: {1: 2, 2: 3, 3: 4, 4: 1}, 2: {1: 2, 2: 1}}
"""ReMoRA type successions (§3 step 2): 1 → 2 → 3 → 4 → 1 …, or 1 ↔ 2."""

# (compression, decompression) of the four "sharing" types (§2.3 table).
_SHARING = {1: ("mod", "tile"), 2: ("grp", "rep"), 3: ("grp", "tile"), 4: ("mod", "rep")}

_ALLOWED = "1, 2, 3, 4, 6 or auto"


# --------------------------------------------------------------------------------------------
# Sizes (§2.1)
# --------------------------------------------------------------------------------------------


def parse_type(value, key: str = "method.type") -> int | str:
    """A MoRA type from config: an int in TYPES, its string form, or "auto"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.lstrip("+-").isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value in TYPES:
        return value
    raise UserError(f"{key}={value!r} is not a MoRA type; allowed: {_ALLOWED}")


def resolve_type(mora_type, rank: int, remora: bool = False) -> int:
    """The concrete type for ``mora_type`` ("auto" → 6 below AUTO_TYPE1_MIN_RANK, else 1; 1 with ReMoRA)."""
    mora_type = parse_type(mora_type)
    if mora_type == "auto":
        return 1 if remora or rank >= AUTO_TYPE1_MIN_RANK else 6
    return mora_type


def mora_rank(k: int, d: int, rank: int, mora_type: int) -> int:
    """r̂ = int(√((k + d)·r) + 0.5), rounded down to even for type 6 (§2.1)."""
    r_hat = int(math.sqrt((k + d) * rank) + 0.5)
    if mora_type == 6:
        r_hat = 2 * (r_hat // 2)
    return r_hat


def num_blocks(k: int, r_hat: int) -> int:
    """N_in = ⌈k / r̂⌉, the number of input blocks; L = N_in·r̂, pad = L − k (§2.1)."""
    return -(-k // r_hat)


# --------------------------------------------------------------------------------------------
# The operators on tensors (§2.2, §2.3); all act on the last dimension
# --------------------------------------------------------------------------------------------


def cyclic(v: torch.Tensor, n: int) -> torch.Tensor:
    """Entries v_{t mod len(v)} for t = 0 … n−1: cyclic padding (§2.2), T_tile, type 6's crop/tile."""
    size = v.shape[-1]
    if n <= size:
        return v[..., :n]
    reps = -(-n // size)
    return v.repeat(*([1] * (v.dim() - 1)), reps)[..., :n]


def compress_mod(x: torch.Tensor, r_hat: int) -> torch.Tensor:
    """C_mod: c_j = Σ_b x̃_{b·r̂ + j} — reshape the cyclically padded x to (N_in, r̂), sum blocks."""
    n_in = num_blocks(x.shape[-1], r_hat)
    return cyclic(x, n_in * r_hat).reshape(*x.shape[:-1], n_in, r_hat).sum(dim=-2)


def compress_grp(x: torch.Tensor, r_hat: int) -> torch.Tensor:
    """C_grp: sums over contiguous groups, the first k mod r̂ of size ⌊k/r̂⌋ + 1, the rest ⌊k/r̂⌋.
    With r̂ > k the trailing groups are empty: x zero-padded to r̂."""
    q, m = divmod(x.shape[-1], r_hat)
    lead = x.shape[:-1]
    head = x[..., :m * (q + 1)].reshape(*lead, m, q + 1).sum(dim=-1)
    tail = x[..., m * (q + 1):].reshape(*lead, r_hat - m, q).sum(dim=-1)
    return torch.cat([head, tail], dim=-1)


def decompress_tile(h: torch.Tensor, d: int) -> torch.Tensor:
    """T_tile: y_o = h_{o mod r̂}."""
    return cyclic(h, d)


def decompress_rep(h: torch.Tensor, d: int) -> torch.Tensor:
    """T_rep: h_0 … h_{m'−1} repeated ⌊d/r̂⌋ + 1 times, the rest ⌊d/r̂⌋ times (m' = d mod r̂)."""
    q, m = divmod(d, h.shape[-1])
    return torch.cat([h[..., :m].repeat_interleave(q + 1, dim=-1),
                      h[..., m:].repeat_interleave(q, dim=-1)], dim=-1)


def rotate_half(v: torch.Tensor) -> torch.Tensor:
    """rot(v) = [−v_{r̂/2:}, v_{:r̂/2}] = P·v (§2.3, type 6)."""
    half = v.shape[-1] // 2
    return torch.cat([-v[..., half:], v[..., :half]], dim=-1)


def rope_tables(r_hat: int, n_blocks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos φ_b and sin φ_b for b = 0 … n_blocks−1, shape (n_blocks, r̂), fp32 (§2.3 type 6 step 2):
    θ_j = 10000^(−2j/r̂), φ_b = [b·θ, b·θ]. Computed on the CPU (identical on every device), then
    moved to ``device``."""
    theta = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float32) / r_hat))
    angles = torch.outer(torch.arange(n_blocks, dtype=torch.float32), theta)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def group_index(n: int, r_hat: int, device=None) -> torch.Tensor:
    """For positions 0 … n−1: the index of their contiguous group (the C_grp / T_rep size rule)."""
    q, m = divmod(n, r_hat)
    sizes = torch.full((r_hat,), q, dtype=torch.long, device=device)
    sizes[:m] += 1
    return torch.repeat_interleave(torch.arange(r_hat, device=device), sizes)


def operators(k: int, d: int, r_hat: int, mora_type: int, dtype=torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense 0/1 matrices (T ∈ R^{d×r̂}, C ∈ R^{r̂×k}) of a sharing type, ΔW = T·M·C (§2.3).

    C_mod[j, i] = #{t < L : t mod r̂ = j, t mod k = i};  C_grp[j, i] = [i in group j];
    T_tile[o, j] = [j = o mod r̂];                       T_rep[o, j] = [o in group j].
    (For tests and a possible exact LoRA export of types 1-4, §2.9; the forward pass never builds them.)
    """
    if mora_type not in _SHARING:
        raise ValueError(f"type {mora_type} has no (T, C) form; only types 1-4 do")
    comp, decomp = _SHARING[mora_type]
    if comp == "mod":
        t = torch.arange(num_blocks(k, r_hat) * r_hat)
        C = torch.zeros(r_hat, k, dtype=dtype).index_put_((t % r_hat, t % k), torch.ones(len(t), dtype=dtype),
                                                          accumulate=True)
    else:
        C = torch.zeros(r_hat, k, dtype=dtype)
        C[group_index(k, r_hat), torch.arange(k)] = 1
    rows = torch.arange(d) % r_hat if decomp == "tile" else group_index(d, r_hat)
    T = torch.zeros(d, r_hat, dtype=dtype)
    T[torch.arange(d), rows] = 1
    return T, C


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


def check_supported(module: nn.Module) -> None:
    """MoRA wraps nn.Linear (dense or bitsandbytes 4/8-bit), HF Conv1D, or another adapter layer;
    anything else (Embedding, Conv2d, GPTQ/AWQ/AQLM, tensor-parallel layers…) is rejected (§2.8)."""
    if isinstance(module, AdapterLayer) or _is_conv1d(module) or _is_bnb(module):
        return
    if isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point:
        return
    raise UserError(f"MoRA does not support {type(module).__name__} layers; it adapts nn.Linear, "
                    "Conv1D and bitsandbytes 4/8-bit linear layers only")


class MoraLayer(AdapterLayer):
    """One MoRA adapter on ``base_layer``: a zero-initialised r̂×r̂ matrix ``mora_M`` and a type.

    ``r_hat`` overrides the size rule of §2.1 (tests, §2.4's worked example); normally it is derived
    from ``rank`` and the layer's k and d.
    """

    method = "mora"
    adapter_param_names = ("mora_M",)

    def __init__(self, base_layer: nn.Module, rank: int = 8, mora_type: int = 1, dropout: float = 0.0,
                 *, r_hat: int | None = None):
        check_supported(base_layer)
        super().__init__(base_layer, dropout)
        mora_type = parse_type(mora_type)
        if mora_type == "auto":
            mora_type = resolve_type(mora_type, rank)
        k, d = self.in_features, self.out_features
        self.rank = rank
        self.r_hat = mora_rank(k, d, rank, mora_type) if r_hat is None else int(r_hat)
        if self.r_hat < (2 if mora_type == 6 else 1) or (mora_type == 6 and self.r_hat % 2):
            raise UserError(f"MoRA r̂={self.r_hat} is invalid for type {mora_type} on a {k}→{d} layer "
                            "(type 6 needs an even r̂ ≥ 2); increase method.rank")
        if self.r_hat >= k:
            warnings.warn(f"MoRA on a {k}→{d} layer: r̂={self.r_hat} ≥ k={k}, so the update cannot exceed "
                          f"rank min(k, d)={min(k, d)} and r̂²={self.r_hat ** 2} may exceed d·k={d * k}",
                          stacklevel=2)
        self.n_blocks = num_blocks(k, self.r_hat)
        weight = next(base_layer.parameters())
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=weight.device))
        self.mora_type = 0
        self.set_type(mora_type)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r_hat={self.r_hat}, type={self.mora_type}")

    def set_type(self, mora_type: int) -> None:
        """Switch the operator type (ReMoRA); r̂ and M are unchanged. Type 6 needs the RoPE tables,
        kept as non-persistent buffers so that ``.to(device/dtype)`` moves them (§2.5)."""
        mora_type = parse_type(mora_type)
        if mora_type == "auto":
            raise UserError(f"MoRA layer type must be one of {TYPES}, not 'auto'")
        if mora_type == 6:
            if self.r_hat % 2:
                raise UserError(f"MoRA type 6 needs an even r̂, this layer has r̂={self.r_hat}")
            if getattr(self, "rope_cos", None) is None:
                cos, sin = rope_tables(self.r_hat, self.n_blocks, device=self.mora_M.device)
                self.register_buffer("rope_cos", cos, persistent=False)
                self.register_buffer("rope_sin", sin, persistent=False)
        self.mora_type = mora_type

    def _used_blocks(self) -> int:
        """Type 6: blocks that reach the output. Rows beyond d are cropped, so with L ≥ d only the
        first ⌈d/r̂⌉ blocks matter (§2.3 properties); with L < d all of them."""
        return min(self.n_blocks, -(-self.out_features // self.r_hat))

    # -- g(x) (§2.3) --------------------------------------------------------------------------
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        d, r_hat, M = self.out_features, self.r_hat, self.mora_M
        if self.mora_type == 6:
            nb = self._used_blocks()
            blocks = cyclic(x, nb * r_hat).reshape(*x.shape[:-1], nb, r_hat)            # x̃^(b)
            cos, sin = self.rope_cos[:nb].to(x.dtype), self.rope_sin[:nb].to(x.dtype)
            z = blocks * cos + rotate_half(blocks) * sin                                   # R_b·x̃^(b)
            u = (z @ M.T).reshape(*x.shape[:-1], nb * r_hat)                               # M·z^(b), concat
            return cyclic(u, d)                                                            # y_o = u_{o mod L}
        comp, decomp = _SHARING[self.mora_type]
        c = compress_mod(x, r_hat) if comp == "mod" else compress_grp(x, r_hat)
        h = c @ M.T
        return decompress_tile(h, d) if decomp == "tile" else decompress_rep(h, d)

    def branch_flops(self) -> int:
        """M applied to each used block (type 6), or once to the compressed input (types 1-4);
        the products only (the rotation and the sums are element-wise)."""
        blocks = self._used_blocks() if self.mora_type == 6 else 1
        return blocks * 2 * self.r_hat**2

    def step_flops(self) -> tuple[int, int]:
        """Type 6 over a frozen dense base without dropout runs its forward and input gradient as
        the base's own GEMMs with W + ΔW (:mod:`finetune.adapters.fast`; micro-batches of at least
        ``MERGED_MIN_ROWS`` tokens, as training's are): only P_b's gradient is left."""
        base = self.base_layer
        if (self.mora_type == 6 and isinstance(self.dropout, nn.Identity) and plain_linear(base)
                and base.weight.dtype == self.mora_M.dtype):
            return 0, self.branch_flops()
        return super().step_flops()

    # -- closed-form ΔW (§2.3) ----------------------------------------------------------------
    def _delta(self) -> torch.Tensor:
        k, d, r_hat, M = self.in_features, self.out_features, self.r_hat, self.mora_M
        dev = M.device
        if self.mora_type == 6:
            return self._delta_rope()
        comp, decomp = _SHARING[self.mora_type]
        # T is a 0/1 row selector: (T·M)[o] = M[row(o)].
        rows = torch.arange(d, device=dev) % r_hat if decomp == "tile" else group_index(d, r_hat, dev)
        TM = M[rows]
        if comp == "grp":  # C_grp[:, i] = e_{group(i)}: (T·M·C)[:, i] = (T·M)[:, group(i)]
            return TM[:, group_index(k, r_hat, dev)]
        # C_mod: padded position t feeds group t mod r̂ and comes from input t mod k.
        t = torch.arange(self.n_blocks * r_hat, device=dev)
        return torch.zeros(d, k, dtype=M.dtype, device=dev).index_add_(1, t % k, TM[:, t % r_hat])

    def _delta_rope(self) -> torch.Tensor:
        """ΔW = S · blockdiag(M·R_0, …, M·R_{N−1}) · F: output row o is row j = t mod r̂ of block
        b = t // r̂ (t = o mod L), placed at columns b·r̂ … b·r̂ + r̂ − 1 and folded mod k."""
        k, d, r_hat, M = self.in_features, self.out_features, self.r_hat, self.mora_M
        dev = M.device
        MR = self.rope_products(self._used_blocks())
        t = torch.arange(d, device=dev) % (self.n_blocks * r_hat)
        b, j = t // r_hat, t % r_hat
        cols = (b.unsqueeze(1) * r_hat + torch.arange(r_hat, device=dev)) % k
        return torch.zeros(d, k, dtype=M.dtype, device=dev).scatter_add_(1, cols, MR[b, j])

    def rope_products(self, nb: int) -> torch.Tensor:
        """Type 6: the per-block matrices P_b = M·R_b for b < nb, shape (nb, r̂, r̂), differentiable
        in M (the forward applies u_b = P_b·x̃_b, the same linear map as M·(R_b·x̃_b))."""
        M = self.mora_M
        cos, sin = self.rope_cos[:nb].to(M.dtype), self.rope_sin[:nb].to(M.dtype)
        # M·R_b = M·diag(cos φ_b) + M·diag(sin φ_b)·P, and A·P = [A_{:, r̂/2:}, −A_{:, :r̂/2}].
        scaled = M.unsqueeze(0) * sin.unsqueeze(1)
        half = self.r_hat // 2
        return M.unsqueeze(0) * cos.unsqueeze(1) + torch.cat([scaled[..., half:], -scaled[..., :half]], dim=-1)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Types 1 and 6 through :func:`finetune.adapters.fast.mora_forward` (no padded, rotated or
        tiled copies of the activations); other types, and other dtypes, take the generic path."""
        return mora_forward(self, x)

    # -- ReMoRA (§3 steps 1-2) ---------------------------------------------------------------
    @torch.no_grad()
    def absorb(self, next_type: int | None = None) -> None:
        """W0 ← W0 + ΔW (fp32 sum, rounded once), M ← 0, then switch type. The layer stays in the
        unmerged state; the function it computes is unchanged."""
        if self.merged:  # ΔW is already in W0
            self.merged = False
        else:
            self._add_to_base(+1.0)
        self.mora_M.zero_()
        if next_type is not None:
            self.set_type(next_type)


# --------------------------------------------------------------------------------------------
# The model-level handle and ReMoRA
# --------------------------------------------------------------------------------------------


class MoraAdapter(Adapter):
    """MoRA on a model. ``settings["layer_types"]`` maps each adapted module to its current type,
    so a saved adapter (or a ReMoRA checkpoint) re-attaches with the right type per layer."""

    method = "mora"

    def layer_types(self) -> dict[str, int]:
        return {name: layer.mora_type for name, layer in self.layers.items()}

    def merges_into_base(self) -> bool:
        return int(self.settings.get("remora_every") or 0) > 0

    def load_training_state_dict(self, state: dict[str, torch.Tensor], settings: dict) -> None:
        """A ReMoRA checkpoint: each layer's type at save time first, then base weights and M."""
        for name, mora_type in (settings.get("layer_types") or {}).items():
            if name not in self.layers:
                raise UserError(f"checkpoint layer_types names {name}, which is not adapted here")
            self.layers[name].set_type(int(mora_type))
        self.settings["layer_types"] = self.layer_types()
        super().load_training_state_dict(state, settings)

    def on_optimizer_step(self, step: int) -> Restart | None:
        """ReMoRA trigger (§3): after the optimizer step that makes ``step`` (optimizer steps done,
        not micro-batches) a positive multiple of ``remora_every``."""
        every = int(self.settings.get("remora_every") or 0)
        if every > 0 and step > 0 and step % every == 0:
            return self.remora_trigger(step)
        return None

    @torch.no_grad()
    def remora_trigger(self, step: int) -> Restart:
        """Merge and reset every layer and switch types (steps 1 and 2); the returned restart resets
        M's optimizer state (step 4) and restarts the LR (step 5)."""
        cycle = REMORA_CYCLES[int(self.settings.get("remora_cycle", 4))]
        for layer in self.layers.values():
            if layer.mora_type not in cycle:
                raise UserError(f"ReMoRA cannot continue from type {layer.mora_type}; "
                                f"its cycle has types {sorted(cycle)}")
            layer.absorb(cycle[layer.mora_type])
        self.settings["layer_types"] = self.layer_types()
        reset = self.parameters() if self.settings.get("remora_reset_optimizer", True) else []
        return Restart(step, int(self.settings.get("remora_warmup", 50)), reset)


# --------------------------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------------------------


def attach(model: nn.Module, rank: int = 8, type="auto", dropout: float = 0.0, targets=tuple(ALL_LINEAR),
           remora_every: int = 0, remora_cycle: int = 4, remora_warmup: int = 50,
           remora_reset_optimizer: bool = True, layer_types: dict | None = None) -> MoraAdapter:
    """Wrap every targeted layer of ``model`` with a MoRA layer; freeze everything else.

    ``type``: 1, 6, "auto" (6 if rank < AUTO_TYPE1_MIN_RANK = 64, else 1; always 1 with ReMoRA), or
    2/3/4 (ReMoRA internals). ``layer_types`` ({module name: type}) overrides the type per layer; it
    is filled in by ``attach`` and by ReMoRA and saved with the adapter. ``remora_every`` > 0 turns
    on ReMoRA (§3), which must start from type 1 and needs a dense (non-quantized) base.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"method.rank={rank!r} must be a positive integer")
    if not 0 <= dropout < 1:
        raise UserError(f"method.dropout={dropout}: must be in [0, 1)")
    if isinstance(remora_every, bool) or not isinstance(remora_every, int) or remora_every < 0:
        raise UserError(f"method.remora_every={remora_every!r}: must be an integer >= 0 (0: ReMoRA off)")
    if remora_cycle not in REMORA_CYCLES:
        raise UserError(f"method.remora_cycle={remora_cycle!r}: allowed: 4 (types 1→2→3→4→1) or 2 (1↔2)")
    if remora_warmup < 0:
        raise UserError(f"method.remora_warmup={remora_warmup}: must be >= 0")
    remora = remora_every > 0
    given = parse_type(type)
    start = resolve_type(given, rank, remora)
    if remora and start != 1:
        raise UserError(f"method.type={type}: ReMoRA (method.remora_every > 0) must start from type 1 "
                        "(its cycle is 1→2→3→4 or 1↔2); use method.type=1 or auto")
    per_layer = {str(n): parse_type(t, f"method.layer_types[{n}]") for n, t in (layer_types or {}).items()}
    for n, t in per_layer.items():
        if t == "auto" or (remora and t not in REMORA_CYCLES[remora_cycle]):
            raise UserError(f"method.layer_types[{n}]={t}: allowed here: "
                            f"{sorted(REMORA_CYCLES[remora_cycle]) if remora else TYPES}")
    targets = targets if isinstance(targets, str) else list(targets)
    names = find_targets(model, targets)
    unknown = sorted(set(per_layer) - set(names))
    if unknown:
        raise UserError(f"method.layer_types names modules that are not adapted: {', '.join(unknown[:3])}")
    if remora:
        _check_remora_bases(model, names, remora_every)

    layers = inject(model, targets, lambda name, m: MoraLayer(m, rank, per_layer.get(name, start), dropout))
    settings = dict(rank=rank, type=given, dropout=dropout, targets=targets, remora_every=remora_every,
                    remora_cycle=remora_cycle, remora_warmup=remora_warmup,
                    remora_reset_optimizer=remora_reset_optimizer,
                    layer_types={name: layer.mora_type for name, layer in layers.items()})
    return MoraAdapter(model, layers, settings)


def _check_remora_bases(model: nn.Module, names: list[str], every: int) -> None:
    """ReMoRA merges in place: refuse quantized bases, warn about 16-bit ones (§3 step 1, §2.10)."""
    low = set()
    for name in names:
        base = model.get_submodule(name)
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        if is_quantized(base):
            raise UserError(f"ReMoRA merges into the base weights every {every} steps, which the quantized "
                            f"{base.__class__.__name__} layer {name} cannot hold; load the model unquantized "
                            "or set method.remora_every=0")
        weight = getattr(base, "weight", None)
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            low.add(str(weight.dtype).replace("torch.", ""))
    if low:
        warnings.warn(f"ReMoRA merges into {', '.join(sorted(low))} base weights every {every} steps; "
                      "rounding error accumulates — load the model in float32 if you can", stacklevel=3)
