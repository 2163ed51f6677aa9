"""A GGUF checkpoint (the embedded default ships as one) dequantized once into a cached
safetensors directory, so later loads take seconds and every loader sees plain HF weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from finetune.environment import cache_dir
from finetune.errors import UserError
from finetune.models.paths import resolve_path


def converted_gguf(cfg) -> str:
    """Dequantize a GGUF checkpoint once into a cached safetensors directory; return that dir."""
    src_dir = Path(resolve_path(cfg.path)).expanduser()
    gguf = src_dir / cfg.gguf_file
    if not gguf.is_file():
        raise UserError(f"model.gguf_file={cfg.gguf_file}: not found in {src_dir} (for a Hugging Face model directory, "
                        "set model.gguf_file=null)")
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
