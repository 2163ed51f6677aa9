"""Opening a model to use: a finetune run directory (its base with the trained adapter attached,
unmerged: a run can be tried before it is merged, including quantized and random-init bases), or
a plain Hugging Face model directory (a merged one, say) or hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config.compose import compose
from finetune.errors import UserError
from finetune.models.device import device_type
from finetune.models.load import load_model
from finetune.models.tokenizer import load_tokenizer
from finetune.run.directory import is_run, read_run
from finetune.run.load import load_run

# What turns the default model group into "the model at model.path".
MODEL_DIR_OVERRIDES = ["model.init=pretrained", "model.gguf_file=null", "model.tokenizer=null",
                       "model.arch={}", "model.name=custom"]
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Opened:
    model: Any
    tokenizer: Any
    cfg: Any  # the run's config (model directories: the defaults with model.path set)
    path: str
    is_run: bool
    device: str


def open_model(path: str, overrides: list[str] = (), config_dir: str | None = None, device: str = "auto",
               dtype: str = "auto") -> Opened:
    """The model at ``path`` (a run directory, a model directory or a hub id), ready on ``device``.
    ``overrides`` may set the task and trainer keys; a run's model and method stay as it trained
    them (a UserError names the override otherwise)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    local = Path(path).expanduser()
    device_override = [] if device == "auto" else [f"trainer.device={device}"]
    if is_run(local):
        changes = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] in ("model", "method")]
        if changes:
            raise UserError(f"{changes[0]}: a run is used with the model and method it trained (as it recorded "
                            "them); overrides may choose the task and its settings, trainer.device, ...; to use "
                            "another model, pass its directory")
        info = read_run(local.resolve())
        cfg = compose(list(info.get("overrides", [])) + list(overrides) + device_override,
                      config_dir or info.get("config_dir"))
        where = device_type(cfg.trainer)
        model, _, tokenizer, _ = load_run(local.resolve(), where)
        return Opened(_placed(model, where, dtype), tokenizer, cfg, str(local.resolve()), True, where)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{path}: neither a finetune run directory nor a model directory (config.json)")
    name = str(local.resolve()) if local.exists() else path
    cfg = compose(list(overrides) + [f"model.path={name}", *MODEL_DIR_OVERRIDES] + device_override, config_dir)
    where = device_type(cfg.trainer)
    model = load_model(cfg.model, where, dtype=dtype)
    return Opened(_placed(model, where, dtype), load_tokenizer(cfg.model), cfg, name, False, where)


def _placed(model, device: str, dtype: str):
    """``model`` on ``device`` in ``dtype`` (auto: bf16 on CUDA, fp32 elsewhere), in eval mode.
    bitsandbytes-quantized models are placed while loading and stay as they are."""
    from finetune.models.load import torch_dtype

    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        model = model.to(device=device, dtype=torch_dtype(dtype, device))
    return model.eval()
