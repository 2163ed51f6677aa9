"""GGUF files (llama.cpp, Ollama, LM Studio): ``finetune export RUN_DIR --format gguf --out FILE``.

The merged model is written tensor by tensor, as ``finetune merge`` writes safetensors
(:mod:`finetune.outputs.streaming`): the adapter layers step aside but still compute ΔW, and each
tensor is merged in fp32, laid out and encoded for llama.cpp, written and let go. No merged copy of
the model exists, on disk or in memory. A file is two passes over the same plan: first every
tensor's name, shape and type (the header must list them before the data), then the data.

What llama.cpp needs, from the model's config and tokenizer:

- **Architecture** ``llama`` (Llama 2/3, Mistral, SmolLM2) or ``qwen2``; anything else is refused
  before any work. Hyper-parameters under ``<arch>.*``: context length, widths, block count, heads
  and KV heads, RoPE base and dimension count, RMS-norm epsilon, and RoPE scaling (``linear`` as a
  key; ``llama3`` as the ``rope_freqs`` tensor of per-frequency divisors llama.cpp applies).
- **Tensors** under llama.cpp's names (the ``gguf`` package's own map). Llama's q and k rows are
  reordered from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs); Qwen2
  rotates in halves like Hugging Face and is written as it is. A tied output layer is not written.
- **Tokenizer**: byte-level BPE (``tokenizer.ggml.model=gpt2``: the vocabulary, merges and token
  types, and ``tokenizer.ggml.pre``, the name of the text split, recognised from the tokenizer's
  own pre-tokenizer) or SentencePiece-style BPE with byte fallback (``llama``: Llama 2, Mistral;
  scores from the merge order). Special token ids, whether BOS is added, the chat template.
- **Types**: f32, f16, bf16, and the block quantizations the ``gguf`` package can write itself
  (q8_0, q4_0, q4_1, q5_0, q5_1; blocks of 32 along each row). Norms, biases and ``rope_freqs``
  stay f32 (llama.cpp's rule); with the 4- and 5-bit types the embedding and output matrices are
  q8_0, as in the GGUF the embedded model ships as; a matrix whose rows do not split into blocks
  falls back to f16. K-quants and i-quants need llama.cpp's ``llama-quantize``: write f16 or f32
  and quantize there.

When the run's base was itself a GGUF (the embedded default), its ``general.*`` metadata (name,
organisation, licence, languages, ...) is carried over. The file appears atomically and is read
back (names, shapes, types) before it replaces anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from finetune import progress
from finetune.errors import UserError
from finetune.outputs.streaming import merged_tensor, step_aside

# --type -> (GGML tensor type, llama.cpp file type), named as in the gguf package
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
              "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
TYPES = tuple(GGUF_TYPES)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp's permutation of q/k rows applies to these architectures (rotary pairs interleaved).
INTERLEAVED_ROPE = ("llama",)
QUANT_BLOCK = 32
KEPT_SOURCE_KEYS = ("general.",)
SKIPPED_SOURCE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


# --------------------------------------------------------------------------------------------
# What is written: architecture, tensor names and types
# --------------------------------------------------------------------------------------------


def check_type(gguf_type: str) -> None:
    if gguf_type not in TYPES:
        raise UserError(f"--type {gguf_type}: allowed: {', '.join(TYPES)} (K-quants and i-quants: export f16 "
                        "and run llama.cpp's llama-quantize)")


def gguf_architecture(config) -> str:
    """llama.cpp's name for the model's architecture, or a UserError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export: model type {model_type!r} is not supported; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    if getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: MLP biases (mlp_bias=true) have no place in llama.cpp's llama architecture")
    return ARCHITECTURES[model_type]


def _ggml_types(gguf_type: str):
    """(GGML tensor type, llama.cpp file type) of a ``--type``."""
    import gguf

    tensor, file = GGUF_TYPES[gguf_type]
    return gguf.GGMLQuantizationType[tensor], gguf.LlamaFileType[file]


def tensor_type(gguf_name: str, shape: tuple, gguf_type: str):
    """The GGML type a tensor is stored in (see the module docstring for the rules)."""
    from gguf import GGMLQuantizationType as Q

    qtype, _ = _ggml_types(gguf_type)
    if len(shape) < 2 or gguf_type == "f32":
        return Q.F32
    if qtype in (Q.F16, Q.BF16):
        return qtype
    if shape[-1] % QUANT_BLOCK:
        return Q.F16
    if gguf_name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return qtype


def gguf_names(state: dict, arch: str, n_layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> llama.cpp name, for every tensor; a UserError for any without one."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, n_layers)
    names = {}
    for name in state:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(f"GGUF export: tensor {name} has no llama.cpp name in the {arch} architecture")
        names[name] = mapped
    return names


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (or bias) from Hugging Face's rotary layout, where each head's
    first half of dimensions pairs with its second half, to llama.cpp's, where pairs are adjacent."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _layout(gguf_name: str, t: torch.Tensor, arch: str, config) -> torch.Tensor:
    if arch in INTERLEAVED_ROPE:
        if ".attn_q." in gguf_name:
            return interleave_rotary(t, config.num_attention_heads)
        if ".attn_k." in gguf_name:
            return interleave_rotary(t, config.num_key_value_heads or config.num_attention_heads)
    return t


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The bytes (as a numpy array) of fp32 ``t`` in GGML type ``qtype``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return quants.quantize(a, qtype)


# --------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------


def _rope(config) -> tuple[float, dict]:
    """(RoPE base, scaling parameters) across transformers' two spellings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    scaling = getattr(config, "rope_scaling", None) or params
    return float(theta if theta is not None else 10000.0), dict(scaling)


def llama3_rope_factors(config, head_dim: int) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling as llama.cpp takes it: one divisor per rotary
    frequency (``rope_freqs``). High frequencies (wavelength below the original context / high
    factor) keep theirs, low ones (beyond context / low factor) are divided by ``factor``, and the
    band between is interpolated smoothly."""
    theta, s = _rope(config)
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    original = float(s["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelength < original / high, torch.ones_like(out), out)
    out = torch.where(wavelength > original / low, torch.full_like(out, factor), out)
    return out.float()


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _add_hyperparameters(writer, config, arch: str, vocab_size: int) -> torch.Tensor | None:
    """The ``<arch>.*`` keys; returns the ``rope_freqs`` tensor when the model needs one."""
    from gguf import RopeScalingType

    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if arch == "llama":
        writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "llama3" and arch == "llama":
        return llama3_rope_factors(config, head_dim)
    raise UserError(f"GGUF export: RoPE scaling {kind!r} is not supported (supported: linear, llama3)")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _pre_signature(pre: dict | None) -> tuple:
    """A comparable description of a tokenizers pre-tokenizer (steps in order)."""
    steps = [] if pre is None else pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = step["type"]
        if kind == "Digits":
            out.append(("digits", bool(step.get("individual_digits"))))
        elif kind == "Split":
            pattern = step["pattern"]
            out.append(("split", pattern.get("Regex", pattern.get("String")), step.get("behavior"),
                        bool(step.get("invert"))))
        elif kind == "ByteLevel":
            out.append(("bytelevel", bool(step.get("add_prefix_space")), bool(step.get("use_regex", True))))
        else:
            out.append((kind,))
    return tuple(out)


def known_splits() -> dict[tuple, str]:
    """Pre-tokenizer signature -> llama.cpp's name for that split (``tokenizer.ggml.pre``)."""
    known = {(("bytelevel", False, True),): "gpt2",
             (("digits", True), ("bytelevel", False, True)): "smollm"}
    try:  # the regexes transformers rebuilds from these names when it reads a GGUF back
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:
        return known
    for name in ("llama-bpe", "qwen2"):
        if name in splits:
            known[(("split", splits[name], "Isolated", False), ("bytelevel", False, False))] = name
    return known


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is not None:
            out[key] = int(value)
    return out


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(ids) > len(plain) and (ids[0] if first else ids[-1]) == token_id


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """``tokenizer.*`` keys for a Hugging Face fast tokenizer, as python values keyed by writer
    method name; a UserError when the tokenizer has no GGUF form llama.cpp reads the same way."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export: the tokenizer is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export: a {model.get('type')} tokenizer cannot be written; supported: byte-level BPE "
                        "(GPT-2, Llama 3, Qwen2, SmolLM) and SentencePiece-style BPE (Llama 2, Mistral)")
    vocab = model["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    n = max([*vocab.values(), *added]) + 1
    if n > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {n} tokens, more than the model's vocabulary of {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(TokenType.NORMAL)
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = {"token_list": tokens, "token_types": types}
    ids = _special_ids(tokenizer)
    if model.get("byte_fallback"):  # SentencePiece-style: ▁ for spaces, <0xXX> byte tokens
        for i, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = int(TokenType.BYTE)
        if "unk" in ids:
            types[ids["unk"]] = int(TokenType.UNKNOWN)
        fields.update(tokenizer_model="llama", token_scores=[-float(i) if types[i] == TokenType.NORMAL else 0.0
                                                            for i in range(vocab_size)],
                      add_space_prefix=True)
    else:
        if not merges:
            raise UserError("GGUF export: the tokenizer has no merges (a byte tokenizer such as model=tiny's), "
                            "which llama.cpp cannot load; train with a BPE tokenizer")
        pre = known_splits().get(_pre_signature(spec.get("pre_tokenizer")))
        if pre is None or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise UserError("GGUF export: the tokenizer's text split is not one llama.cpp knows (supported: GPT-2, "
                            f"SmolLM, Llama 3, Qwen2 splits); its pre-tokenizer is {json.dumps(spec.get('pre_tokenizer'))}")
        fields.update(tokenizer_model="gpt2", tokenizer_pre=pre, add_space_prefix=False)
    if merges:
        fields["token_merges"] = merges
    for key, value in ids.items():
        fields[f"{key}_token_id"] = value
    fields["add_bos_token"] = _adds(tokenizer, ids.get("bos"), first=True)
    if _adds(tokenizer, ids.get("eos"), first=False):
        fields["add_eos_token"] = True
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields["chat_template"] = template
    return fields


def _add_tokenizer(writer, fields: dict) -> None:
    order = ("tokenizer_model", "tokenizer_pre", "token_list", "token_scores", "token_types", "token_merges",
             "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token",
             "add_space_prefix", "chat_template")
    for key in order:  # the writer's method for each is add_<key>
        if key in fields:
            getattr(writer, f"add_{key}")(fields[key])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _source_fields(source_gguf) -> list:
    """``general.*`` fields of the GGUF the base came from, to carry over."""
    if source_gguf is None:
        return []
    from gguf import GGUFReader

    reader = GGUFReader(str(source_gguf))
    return [f for key, f in reader.fields.items()
            if key.startswith(KEPT_SOURCE_KEYS) and key not in SKIPPED_SOURCE_KEYS]


def _add_general(writer, config, source_gguf, name: str | None) -> None:
    from gguf import GGUFValueType

    carried = _source_fields(source_gguf)
    keys = {f.name for f in carried}
    for f in carried:
        value = f.contents()
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    if "general.type" not in keys:
        writer.add_type("model")
    if "general.name" not in keys:
        writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name or "model")


def write_gguf(model, tokenizer, out: str | Path, gguf_type: str = "f16", adapter=None,
               source_gguf: str | Path | None = None, name: str | None = None) -> Path:
    """Write ``model`` (with ``adapter`` attached and unmerged, merged while writing; or None) and
    ``tokenizer`` as the GGUF file ``out``. ``source_gguf``: the GGUF the base came from, whose
    ``general.*`` metadata is carried over. Afterwards the adapter is unwrapped (as after merging)."""
    check_type(gguf_type)
    config = model.config
    arch = gguf_architecture(config)
    fields = tokenizer_fields(tokenizer, int(config.vocab_size))
    state, deltas = step_aside(model, adapter)
    if state is None:
        raise UserError("GGUF export: this model's saved layout differs from its modules; it cannot be streamed")
    names = gguf_names(state, arch, int(config.num_hidden_layers))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with torch.no_grad():
            _write(tmp, model, state, deltas, names, arch, gguf_type, fields, source_gguf, name)
        check_file(tmp, [names[k] for k in state])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if adapter is not None:
            adapter.unwrap()
    return out


def _write(path: Path, model, state, deltas, names, arch, gguf_type, fields, source_gguf, name) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    _add_general(writer, config, source_gguf, name)
    rope_freqs = _add_hyperparameters(writer, config, arch, int(config.vocab_size))
    writer.add_file_type(int(_ggml_types(gguf_type)[1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, fields)

    plan = []  # (gguf name, hf name or None for rope_freqs, shape, type)
    if rope_freqs is not None:
        plan.append(("rope_freqs.weight", None, tuple(rope_freqs.shape), gguf.GGMLQuantizationType.F32))
    for hf_name, t in state.items():
        if not t.is_floating_point():
            raise UserError(f"GGUF export: tensor {hf_name} is {t.dtype}, not floating point")
        shape = tuple(t.shape)
        plan.append((names[hf_name], hf_name, shape, tensor_type(names[hf_name], shape, gguf_type)))
    for gguf_name, _, shape, qtype in plan:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with progress.bar(total=len(plan), desc="gguf", unit="tensor") as bar:
        for gguf_name, hf_name, _, qtype in plan:
            t = rope_freqs if hf_name is None else merged_tensor(state[hf_name], deltas)
            data = encode(_layout(gguf_name, t.float(), arch, config), qtype)
            writer.write_tensor_data(data)
            del t, data
            bar.update(1)
    writer.close()


def check_file(path: Path, expected: list[str]) -> None:
    """Read the written file's header back: every tensor there, under its name."""
    from gguf import GGUFReader

    got = {t.name for t in GGUFReader(str(path)).tensors}
    missing = sorted(set(expected) - got)
    if missing:
        raise RuntimeError(f"GGUF export: {path} lacks tensors {missing[:3]} after writing")


# --------------------------------------------------------------------------------------------
# A run
# --------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"


def check_out(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF file's name ends in .gguf")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give the path of the .gguf file to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"--out {out}: exists and is not a GGUF file; choose another name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such directory {out.parent}")
    return out


def export_run_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "f16") -> Path:
    """The run's merged model as the GGUF file ``out`` (see the module docstring). The architecture
    and the tokenizer are checked before the model loads. A quantized-base run is written from the
    dequantized base plus ΔW, the function the adapter was trained with (as ``finetune merge``)."""
    from finetune.outputs.merge import dequantize_model, load_for_merge
    from finetune.run.directory import RunDir
    from finetune.run.load import run_model_config, run_tokenizer

    check_type(gguf_type)
    out = check_out(out)
    run = RunDir(run_dir)
    config = run_model_config(run)
    gguf_architecture(config)
    tokenizer_fields(run_tokenizer(run), int(config.vocab_size))
    model, adapter, tokenizer, cfg, _, _ = load_for_merge(run)
    dequantize_model(model)
    source = None
    if cfg.model.gguf_file and cfg.model.init != "random":
        from finetune.models.paths import resolve_path

        source = Path(resolve_path(cfg.model.path)).expanduser() / cfg.model.gguf_file
    return write_gguf(model, tokenizer, out, gguf_type, adapter=adapter, source_gguf=source)


def export_model_gguf(model_dir: str | Path, out: str | Path, gguf_type: str = "f16") -> Path:
    """A plain Hugging Face model directory (a merged run, say) as the GGUF file ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_type(gguf_type)
    out = check_out(out)
    config = AutoConfig.from_pretrained(str(model_dir))
    gguf_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer_fields(tokenizer, int(config.vocab_size))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    return write_gguf(model, tokenizer, out, gguf_type)
