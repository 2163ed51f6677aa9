"""A GGUF checkpoint (the embedded default ships as one) dequantized once into a cached
safetensors directory, so later loads take seconds and every loader sees plain HF weights.

The tokenizer is rebuilt by transformers from the file's vocabulary and merges. A GGUF names the
text split its vocabulary was trained with in ``tokenizer.ggml.pre``; transformers applies the
splits it knows and otherwise falls back to GPT-2's. :data:`PRE_TOKENIZERS` adds the ones it
misses, so that our tokenizer cuts text exactly as the model's own (and llama.cpp) does."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from finetune.environment import cache_dir
from finetune.errors import UserError
from finetune.models.paths import resolve_path

# Bump when the conversion changes, so that cached conversions are redone.
CONVERSION_VERSION = 2


def _smollm_split():
    """SmolLM's tokenizer: every digit on its own, then GPT-2's byte-level split."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# ``tokenizer.ggml.pre`` names whose split transformers does not rebuild (it uses GPT-2's for them).
PRE_TOKENIZERS = {"smollm": _smollm_split}


def gguf_pre(path) -> str | None:
    """The file's ``tokenizer.ggml.pre`` (the name of its pre-tokenizer), if it has one."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return None if field is None else field.contents()


def fix_pre_tokenizer(tokenizer, pre: str | None):
    """Give ``tokenizer`` (built by transformers from a GGUF) the split its file names, where
    transformers left GPT-2's in its place."""
    if pre in PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    return tokenizer


def converted_gguf(cfg) -> str:
    """Dequantize a GGUF checkpoint once into a cached safetensors directory; return that dir."""
    src_dir = Path(resolve_path(cfg.path)).expanduser()
    gguf = src_dir / cfg.gguf_file
    if not gguf.is_file():
        raise UserError(f"model.gguf_file={cfg.gguf_file}: not found in {src_dir} (for a Hugging Face model directory, "
                        "set model.gguf_file=null)")
    import transformers

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{CONVERSION_VERSION}"
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
    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=cfg.gguf_file)
    fix_pre_tokenizer(tokenizer, gguf_pre(gguf)).save_pretrained(tmp)
    (tmp / "done").write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return str(target)
