"""The Hugging Face peft adapter format (methods.md §5): export and import, without peft.

``export_peft(adapter, out_dir, base_model_name_or_path)`` writes a directory that
``peft.PeftModel.from_pretrained(base, out_dir)`` loads with no warnings and that reproduces our
adapted model (§5.1):

- ``adapter_config.json``: exactly the fields documented in §5.2 (LoRA) or §5.3 (VB-LoRA);
- ``adapter_model.safetensors``: metadata ``{"format": "pt"}``, contiguous tensors that share no
  storage, keys ``base_model.model.<HF module path>.<tensor>`` (the adapter name never appears), and
  for VB-LoRA the bank under ``base_model.vblora_vector_bank``.

Our adapter layers replace the HF modules in place, so ``adapter.layers`` is keyed by the HF module
paths already: no renaming is needed.

``target_modules`` is chosen to select **exactly** the adapted modules under peft's matching rule
(§0.5, §5.4): the leaf names (``q_proj``, …) when they do, else the full module paths, else a regex
of the escaped paths. Per-module LoRA ranks and alphas become ``rank_pattern`` / ``alpha_pattern``.

Every export runs the self-checks of §5.5 before anything is written (shapes against the config and
the modules, the selected set against the exported set, the bank, the top-κ encoding), then reads
the files back with :func:`read_peft` and compares the ΔW they imply with the in-memory adapter's.
Any failure raises a :class:`UserError`. MoRA (no peft format; use ``finetune merge``) and full
fine-tuning are refused with one line. A VB-LoRA adapter, and a MoRA adapter of types 1–4, can be
written as the exact LoRA it equals (``as_lora=True``; §4.10, §2.9).

``export_run_peft(run_dir, out)`` is what ``finetune export --format peft`` calls: it loads a
finished run and exports its adapter with the run's base recorded as ``base_model_name_or_path``.

``import_peft(model, directory)`` attaches a LoRA or VB-LoRA adapter saved by peft (or by us) to
``model`` with our implementation (§6.6 items 2 and 4).

Only torch, safetensors and json are needed here; peft is never imported.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from finetune.adapters import lora, vblora
from finetune.adapters.base import AdapterLayer, replace_module
from finetune.adapters.lora import LoraLayer
from finetune.adapters.mora import operators
from finetune.adapters.vblora import BANK_ATTR, check_topk, decode_topk, factors_from_logits
from finetune.errors import UserError
from finetune.models.load import source_dir
from finetune.models.paths import is_local
from finetune.run.directory import RunDir, read_config
from finetune.run.load import load_run

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
VBLORA_FULL = ("vblora_logits_A", "vblora_logits_B")


# --------------------------------------------------------------------------------------------
# Module names and peft's matching rules
# --------------------------------------------------------------------------------------------


def peft_selects(target_modules, name: str) -> bool:
    """peft's rule (§0.5): a list entry matches a name equal to it or ending in '.' + entry; a string
    is a regex that must match the whole name."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def pattern_key(patterns, name: str) -> str | None:
    """peft's lookup for ``rank_pattern`` / ``alpha_pattern``: the first key K such that the name
    matches ``(.*\\.)?(K)$`` from its start."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def base_module_names(model: torch.nn.Module) -> list[str]:
    """Module names of ``model`` as peft sees the plain HF model: without the root and without the
    children of our adapter wrappers (``…q_proj.base_layer``, ``…q_proj.dropout``)."""
    names, wrappers = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        names.append(name)
        if isinstance(module, AdapterLayer):
            wrappers.append(name)
    return names


def choose_target_modules(adapted: list[str], all_names: list[str]):
    """The simplest ``target_modules`` that selects exactly ``adapted`` among ``all_names``: leaf
    names, else full paths, else a regex alternation of the escaped paths."""
    want = set(adapted)
    candidates = [sorted({n.rsplit(".", 1)[-1] for n in adapted}), sorted(adapted),
                  "(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"]
    for cand in candidates:
        if {n for n in all_names if peft_selects(cand, n)} == want:
            return cand
    raise UserError("cannot express the adapted modules as a peft target_modules")  # unreachable


# --------------------------------------------------------------------------------------------
# Building the payload
# --------------------------------------------------------------------------------------------


def _tensor(t: torch.Tensor) -> torch.Tensor:
    """Detached, on CPU, contiguous, with storage of its own."""
    return t.detach().to("cpu", copy=True).contiguous()


def _common(adapter, base_model_name_or_path) -> dict:
    if base_model_name_or_path is None:
        cfg = getattr(adapter.model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or None
    return {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True}


def _fan_in_fan_out(adapter) -> bool:
    flags = {layer.fan_in_fan_out for layer in adapter.layers.values()}
    if len(flags) > 1:
        raise UserError("cannot export to peft: the adapter mixes Conv1D (fan_in_fan_out) and nn.Linear "
                        "layers, which one peft config cannot describe")
    return flags.pop()


def _check_plain(adapter) -> None:
    for name, layer in adapter.layers.items():
        if isinstance(layer.base_layer, AdapterLayer):
            raise UserError(f"cannot export to peft: {name} carries stacked adapters")


def _alpha_of(layer, rslora: bool) -> float:
    alpha = layer.scaling * (math.sqrt(layer.rank) if rslora else layer.rank)
    return float(round(alpha, 9))


def _patterns(values: dict[str, float | int], default) -> dict:
    """Per-module overrides of ``default``: keyed by leaf name where a leaf has one value across all
    its modules, else by the full module path."""
    by_leaf: dict[str, set] = {}
    for name, v in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(v)
    out = {}
    for name, v in values.items():
        if v == default:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if len(by_leaf[leaf]) == 1:
            out[leaf] = v
        else:
            out[name] = v
    return dict(sorted(out.items()))


@torch.no_grad()
def _lora_factors(layer, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A (r, k), lora_B (d, r))`` of a layer: LoRA's own; VB-LoRA's assembled A and B
    (§4.10); for MoRA types 1–4 ``A = M·C`` and ``B = T`` (§2.9), so that ``B·A = T·M·C``."""
    if method == "lora":
        return layer.lora_A, layer.lora_B
    if method == "vblora":
        return layer.factors()
    T, C = operators(layer.in_features, layer.out_features, layer.r_hat, layer.mora_type, torch.float64)
    return (layer.mora_M.detach().cpu().double() @ C).to(layer.mora_M.dtype), T.to(layer.mora_M.dtype)


def lora_payload(adapter, base_model_name_or_path=None, target_modules=None) -> tuple[dict, dict]:
    """(adapter_config, tensors) for a LoRA adapter (§5.2), or for an adapter written as the exact
    LoRA it equals with scaling 1: VB-LoRA (A and B assembled, ``lora_alpha = r``, §4.10) and MoRA
    types 1–4 (rank r̂ per layer, ``lora_alpha = r̂``, §2.9)."""
    s = adapter.settings
    method = adapter.method
    rslora = bool(s.get("rslora", False)) and method == "lora"
    if method == "mora":
        ranks = {n: int(l.r_hat) for n, l in adapter.layers.items()}
    else:
        ranks = {n: int(l.rank) for n, l in adapter.layers.items()}
    if method == "lora":
        alphas = {n: _alpha_of(l, rslora) for n, l in adapter.layers.items()}
    else:
        alphas = {n: float(r) for n, r in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    if target_modules is None:
        target_modules = choose_target_modules(list(adapter.layers), base_module_names(adapter.model))
    init = s.get("init", "kaiming")
    config = {
        "peft_type": "LORA", **_common(adapter, base_model_name_or_path),
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": target_modules,
        "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
        "fan_in_fan_out": _fan_in_fan_out(adapter), "bias": "none", "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "lora_dropout": float(s.get("dropout", 0.0)),
        "init_lora_weights": "gaussian" if init == "gaussian" and method == "lora" else True,
    }
    tensors = {}
    for name, layer in adapter.layers.items():
        A, B = _lora_factors(layer, method)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _tensor(A)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _tensor(B)
    return config, tensors


def vblora_payload(adapter, base_model_name_or_path=None, target_modules=None, save_only_topk=None
                   ) -> tuple[dict, dict]:
    """(adapter_config, tensors) for a VB-LoRA adapter (§5.3); ``save_only_topk`` defaults to the
    adapter's setting."""
    s = adapter.settings
    only_topk = bool(s.get("save_only_topk")) if save_only_topk is None else bool(save_only_topk)
    if target_modules is None:
        target_modules = choose_target_modules(list(adapter.layers), base_module_names(adapter.model))
    config = {
        "peft_type": "VBLORA", **_common(adapter, base_model_name_or_path),
        "r": int(s["rank"]), "num_vectors": int(s["num_vectors"]), "vector_length": int(s["vector_length"]),
        "topk": int(s["topk"]), "save_only_topk_weights": only_topk, "target_modules": target_modules,
        "fan_in_fan_out": _fan_in_fan_out(adapter), "bias": "none", "modules_to_save": None,
        "vblora_dropout": float(s.get("dropout", 0.0)), "init_logits_std": float(s["init_logits_std"]),
        "init_vector_bank_bound": float(s["init_bank_bound"]),
    }
    tensors = {}
    for key, t in adapter.state_dict(only_topk=only_topk).items():
        tensors[BANK_KEY if key == BANK_ATTR else PREFIX + key] = _tensor(t)
    return config, tensors


def peft_payload(adapter, base_model_name_or_path=None, target_modules=None, save_only_topk=None,
                 as_lora: bool = False) -> tuple[dict, dict]:
    method = getattr(adapter, "method", "")
    if method == "mora":
        types = {layer.mora_type for layer in adapter.layers.values()}
        if not as_lora or not types <= {1, 2, 3, 4}:
            hint = " (types 1-4 export as the exact LoRA they equal: --as-lora, or as_lora=True)" if types <= {1, 2, 3, 4} else ""
            raise UserError(f"MoRA has no peft adapter format; use `finetune merge` for a merged model{hint}")
    if method == "full":
        raise UserError("full fine-tuning has no adapter to export in peft format; the run's merged "
                        "model directory is the result (see `finetune merge`)")
    if method not in ("lora", "vblora", "mora"):
        raise UserError(f"method {method!r} has no peft export; supported: lora, vblora (mora: merge)")
    if not adapter.layers:
        raise UserError("cannot export to peft: the adapter has no adapted layers")
    if adapter.merges_into_base():
        raise UserError(f"this {method} run merged updates into the base weights during training "
                        "(ReLoRA/ReMoRA), so an adapter on the original base cannot reproduce it; "
                        "use `finetune merge` for a merged model")
    _check_plain(adapter)
    if as_lora and method == "lora":
        as_lora = False  # already a LoRA
    if method == "lora" or as_lora:
        return lora_payload(adapter, base_model_name_or_path, target_modules)
    return vblora_payload(adapter, base_model_name_or_path, target_modules, save_only_topk)


# --------------------------------------------------------------------------------------------
# Self-checks (§5.5, items 1–3)
# --------------------------------------------------------------------------------------------


def module_of(key: str) -> tuple[str, str]:
    """``base_model.model.P.lora_A.weight`` → (P, 'lora_A.weight'); ``…P.vblora_logits_B_topk_indices``
    → (P, 'vblora_logits_B_topk_indices'); the bank → ('', 'vblora_vector_bank')."""
    if key == BANK_KEY:
        return "", "vblora_vector_bank"
    if not key.startswith(PREFIX):
        raise UserError(f"peft tensor {key!r} does not start with {PREFIX!r}")
    rest = key[len(PREFIX):]
    for suffix in LORA_SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], suffix[1:]
    m = re.fullmatch(r"(.+)\.(vblora_logits_[AB](?:_topk_indices|_topk_weights)?)", rest)
    if m:
        return m.group(1), m.group(2)
    raise UserError(f"peft tensor {key!r} is neither a LoRA nor a VB-LoRA tensor")


def expected_shapes(config: dict, name: str, k: int, d: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name → (shape, 'float' | 'int') that the config implies for a module with (k, d)."""
    if config["peft_type"] == "LORA":
        rk = pattern_key(config.get("rank_pattern") or {}, name)
        r = int(config["rank_pattern"][rk]) if rk is not None else int(config["r"])
        return {"lora_A.weight": ((r, k), "float"), "lora_B.weight": ((d, r), "float")}
    r, h, b, kappa = (int(config[f]) for f in ("r", "num_vectors", "vector_length", "topk"))
    if k % b or d % b:
        raise UserError(f"peft export: vector_length {b} does not divide module {name} with (in, out) = ({k}, {d})")
    dims = {"vblora_logits_A": (r, k // b), "vblora_logits_B": (d // b, r)}
    if config["save_only_topk_weights"]:
        out = {}
        for t, lead in dims.items():
            out[t + "_topk_indices"] = ((*lead, kappa), "int")
            out[t + "_topk_weights"] = ((*lead, kappa - 1), "float")
        return out
    return {t: ((*lead, h), "float") for t, lead in dims.items()}


def check_payload(config: dict, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                  all_names: list[str]) -> None:
    """Self-checks 1–3 of §5.5 for ``config`` and ``tensors`` against the adapted modules ``shapes``
    (name → (k, d)) of a model whose module names are ``all_names``. Raises a UserError."""
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "VBLORA"):
        raise UserError(f"peft export: peft_type {peft_type!r} is not LORA or VBLORA")
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    bank = None
    for key, t in tensors.items():
        module, tname = module_of(key)
        if module == "":
            bank = t
            continue
        per_module.setdefault(module, {})[tname] = t
    # 2. the modules with tensors are exactly the adapted ones, and target_modules selects exactly them
    if set(per_module) != set(shapes):
        extra, missing = sorted(set(per_module) - set(shapes)), sorted(set(shapes) - set(per_module))
        raise UserError(f"peft export: tensors for {extra[:3]} are not adapted modules; adapted modules "
                        f"without tensors: {missing[:3]}")
    selected = {n for n in all_names if peft_selects(config.get("target_modules") or [], n)}
    if selected != set(per_module):
        extra, missing = sorted(selected - set(per_module)), sorted(set(per_module) - selected)
        raise UserError(f"peft export: target_modules={config.get('target_modules')!r} does not select exactly "
                        f"the exported modules (selects {len(extra)} without tensors, e.g. {extra[:2]}; "
                        f"misses {len(missing)}, e.g. {missing[:2]})")
    # 1. shapes against the config and the modules
    for module, got in per_module.items():
        want = expected_shapes(config, module, *shapes[module])
        if set(got) != set(want):
            raise UserError(f"peft export: {module} has tensors {sorted(got)}, the config implies {sorted(want)}")
        for tname, (shape, kind) in want.items():
            t = got[tname]
            if tuple(t.shape) != shape:
                raise UserError(f"peft export: {module}.{tname} has shape {tuple(t.shape)}, expected {shape}")
            if (kind == "int") == t.is_floating_point():
                raise UserError(f"peft export: {module}.{tname} has dtype {t.dtype}, expected {kind}")
    # 3. VB-LoRA: the bank, and valid top-κ encodings
    if peft_type == "VBLORA":
        if bank is None:
            raise UserError(f"peft export: the VB-LoRA bank {BANK_KEY} is missing (peft would load a random "
                            "bank without any warning)")
        h, b = int(config["num_vectors"]), int(config["vector_length"])
        if tuple(bank.shape) != (h, b):
            raise UserError(f"peft export: the bank has shape {tuple(bank.shape)}, expected {(h, b)}")
        if config["save_only_topk_weights"]:
            for module, got in per_module.items():
                for t in VBLORA_FULL:
                    check_topk(got[t + "_topk_indices"], got[t + "_topk_weights"], h, f"{module}.{t}")
    elif bank is not None:
        raise UserError("peft export: a LoRA adapter carries a VB-LoRA bank")


# --------------------------------------------------------------------------------------------
# Reading back (our own loader) and ΔW from the files
# --------------------------------------------------------------------------------------------


def read_peft(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a peft adapter directory (safetensors only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise UserError(f"{directory}: no {CONFIG_FILE}; expected a peft adapter directory")
    if not weights.is_file():
        extra = " (pickle adapter_model.bin is not read)" if (directory / "adapter_model.bin").is_file() else ""
        raise UserError(f"{directory}: no {WEIGHTS_FILE}{extra}")
    return json.loads(cfg_path.read_text()), load_file(str(weights))


def _vblora_logits(got: dict[str, torch.Tensor], t: str, h: int) -> torch.Tensor:
    if t in got:
        return got[t].float()
    return decode_topk(got[t + "_topk_indices"], got[t + "_topk_weights"], h)


@torch.no_grad()
def peft_delta_weights(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW in the (d, k) layout, fp32, for every module of a peft LoRA or VB-LoRA payload — computed
    from the files alone, the way peft computes it."""

    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, tname = module_of(key)
        per_module.setdefault(module, {})[tname] = t
    deltas = {}
    if config["peft_type"] == "LORA":
        for module, got in per_module.items():
            A, B = got["lora_A.weight"].float(), got["lora_B.weight"].float()
            r = A.shape[0]
            ak = pattern_key(config.get("alpha_pattern") or {}, module)
            alpha = float(config["alpha_pattern"][ak] if ak is not None else config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            deltas[module] = (B @ A) * scale
        return deltas
    bank = per_module.pop("")["vblora_vector_bank"].float()
    h, kappa = int(config["num_vectors"]), int(config["topk"])
    for module, got in per_module.items():
        la, lb = (_vblora_logits(got, t, h) for t in VBLORA_FULL)
        A, B = factors_from_logits(la, lb, bank, kappa)
        deltas[module] = B @ A
    return deltas


def _compare_deltas(adapter, file_deltas: dict[str, torch.Tensor]) -> None:
    """Self-check 4: the ΔW implied by the written files equals the in-memory adapter's."""
    for name, layer in adapter.layers.items():
        with torch.no_grad():
            mine = layer._delta().float().cpu()
        theirs = file_deltas[name]
        scale = float(mine.abs().max())
        err = float((theirs - mine).abs().max())
        if not err <= 1e-4 * scale + 1e-12:
            raise UserError(f"peft export: {name}: the written adapter's ΔW differs from the model's by {err:.3g} "
                            f"(max |ΔW| = {scale:.3g})")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_peft(adapter, out_dir: str | Path, base_model_name_or_path: str | None = None, *,
                target_modules=None, save_only_topk: bool | None = None, as_lora: bool = False) -> Path:
    """Write ``adapter`` (LoRA or VB-LoRA) as a peft adapter directory ``out_dir`` and verify it.

    - ``base_model_name_or_path``: hub id or path recorded in the config (used by peft's
      ``AutoPeftModelFor*``); default: the model's ``config._name_or_path``.
    - ``target_modules``: leave ``None`` to have it derived; a given value must select exactly the
      adapted modules.
    - ``save_only_topk`` (VB-LoRA): top-κ indices and weights instead of full logits; default: the
      adapter's ``save_only_topk`` setting.
    - ``as_lora``: write a VB-LoRA adapter as the peft LoRA it equals (assembled A and B,
      ``lora_alpha = r``, §4.10), for consumers that read LoRA only (vLLM and similar); MoRA of
      types 1–4 only this way (``lora_A = M·C``, ``lora_B = T``, rank and alpha r̂ per layer, §2.9).

    Returns ``out_dir``. Raises :class:`UserError` for MoRA, full fine-tuning, and any failed check.
    """
    from safetensors.torch import save_file

    config, tensors = peft_payload(adapter, base_model_name_or_path, target_modules, save_only_topk, as_lora)
    shapes = {n: (l.in_features, l.out_features) for n, l in adapter.layers.items()}
    check_payload(config, tensors, shapes, base_module_names(adapter.model))

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    try:
        config2, tensors2 = read_peft(out)
        check_payload(config2, tensors2, shapes, base_module_names(adapter.model))
        _compare_deltas(adapter, peft_delta_weights(config2, tensors2))
    except BaseException:
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # never leave a directory that failed its checks
            (out / name).unlink(missing_ok=True)
        raise
    return out


def run_base_name(cfg, run_path: Path) -> str | None:
    """``base_model_name_or_path`` for a run: the hub id as configured, else the absolute local
    directory holding HF weights (a ``pkg:`` model resolved, a GGUF model's converted cache, a
    random-init run's ``base/``)."""
    run = RunDir(run_path)
    if run.base.is_dir():
        return str(run.base.resolve())
    if cfg.model.get("init") == "random" or not cfg.model.get("path"):
        return None
    src = source_dir(cfg.model)
    return str(Path(src).expanduser().resolve()) if is_local(src) else src


def export_run_peft(run_dir: str | Path, out: str | Path, as_lora: bool = False) -> Path:
    """``finetune export RUN_DIR --format peft --out DIR``: load the run's base with its trained
    adapter and write it with :func:`export_peft` (base name from :func:`run_base_name`)."""
    cfg = read_config(Path(run_dir))
    method = cfg.method.get("name")
    if method == "full":  # refuse before loading anything heavy
        raise UserError("full fine-tuning has no adapter to export in peft format; the run's merged "
                        "model directory is the result (see `finetune merge`)")
    if method == "mora" and not as_lora:
        raise UserError("MoRA has no peft adapter format: types 1-4 export as the exact LoRA they equal "
                        "with --as-lora; any type merges with `finetune merge`")
    model, adapter, _, cfg = load_run(run_dir)
    return export_peft(adapter, Path(out).expanduser(), run_base_name(cfg, Path(run_dir)), as_lora=as_lora)


# --------------------------------------------------------------------------------------------
# Import (§6.6 items 2 and 4)
# --------------------------------------------------------------------------------------------

# peft config fields that change what an adapter computes and that our implementation lacks.
_UNSUPPORTED = ("use_dora", "modules_to_save", "layers_to_transform", "layers_pattern", "layer_replication",
                "target_parameters", "trainable_token_indices", "lora_bias", "exclude_modules")


def _check_import_config(config: dict, directory) -> None:
    if config.get("bias", "none") != "none":
        raise UserError(f"{directory}: peft bias={config['bias']!r} is not supported (only 'none')")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise UserError(f"{directory}: peft {field}={config[field]!r} is not supported by finetune's "
                            f"{config['peft_type']} implementation")


def import_peft(model: torch.nn.Module, directory: str | Path):
    """Attach the LoRA or VB-LoRA adapter saved in the peft directory ``directory`` to ``model``
    (the plain HF model it was trained on) using our implementation; returns the adapter."""
    config, tensors = read_peft(directory)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "VBLORA"):
        raise UserError(f"{directory}: peft_type {peft_type!r} cannot be imported; supported: LORA, VBLORA")
    _check_import_config(config, directory)
    with_tensors = {module_of(k)[0] for k in tensors} - {""}
    targets = config.get("target_modules")
    if targets is None:
        targets = sorted(with_tensors)  # peft would fall back to its model-type default; the file decides
    if isinstance(targets, str) and targets == "all-linear":
        targets = "all-linear"
    elif not isinstance(targets, str):
        targets = list(targets)

    if peft_type == "LORA":
        init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
        rslora = bool(config.get("use_rslora", False))
        dropout = float(config.get("lora_dropout", 0.0))
        adapter = lora.attach(model, rank=int(config["r"]), alpha=float(config["lora_alpha"]), rslora=rslora,
                              dropout=dropout, init=init, targets=targets)
        _apply_lora_patterns(adapter, config, rslora, dropout, init)
        state = {}
        for key, t in tensors.items():
            module, tname = module_of(key)
            state[f"{module}.{tname.removesuffix('.weight')}"] = t
    else:
        adapter = vblora.attach(model, rank=int(config["r"]), num_vectors=int(config["num_vectors"]),
                                vector_length=int(config["vector_length"]), topk=int(config["topk"]),
                                dropout=float(config.get("vblora_dropout", 0.0)),
                                init_logits_std=float(config.get("init_logits_std", 0.1)),
                                init_bank_bound=float(config.get("init_vector_bank_bound", 0.02)),
                                save_only_topk=bool(config.get("save_only_topk_weights", False)),
                                targets=targets)
        state = {}
        for key, t in tensors.items():
            module, tname = module_of(key)
            state[tname if module == "" else f"{module}.{tname}"] = t
    if set(adapter.layers) != with_tensors:
        extra = sorted(set(adapter.layers) - with_tensors)
        missing = sorted(with_tensors - set(adapter.layers))
        raise UserError(f"{directory}: target_modules selects modules without tensors {extra[:3]} "
                        f"and misses modules with tensors {missing[:3]}")
    adapter.load_state_dict(state)
    return adapter


def _apply_lora_patterns(adapter, config: dict, rslora: bool, dropout: float, init: str) -> None:
    """Re-create the layers whose rank or alpha a ``rank_pattern`` / ``alpha_pattern`` overrides."""
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not rp and not ap:
        return
    for name, layer in list(adapter.layers.items()):
        rk, ak = pattern_key(rp, name), pattern_key(ap, name)
        if rk is None and ak is None:
            continue
        r = int(rp[rk]) if rk is not None else int(config["r"])
        alpha = float(ap[ak]) if ak is not None else float(config["lora_alpha"])
        new = LoraLayer(layer.base_layer, r, alpha, rslora, dropout, init)
        replace_module(adapter.model, name, new)
        adapter.layers[name] = new
