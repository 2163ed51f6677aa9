"""Every rule about config values that the schema's types cannot express, checked once, right
after composing and before anything heavy loads: ranges, cross-field rules, the launcher and logger
settings. Each rule raises a UserError naming the key and what is allowed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

from finetune.config.schema import DEVICES, DTYPES, LAUNCHERS, LOGGERS, PRECISIONS, SCHEMAS, Init
from finetune.errors import UserError


def unknown_key_message(key: str, schema: Optional[type]) -> str:
    import difflib
    from dataclasses import fields

    hint = ""
    if schema is not None:
        names = [f.name for f in fields(schema)]
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        hint += f"allowed: {', '.join(names)}"
    else:
        hint = "`finetune config` prints every key"
    return f"unknown config key '{key}'; {hint}"


# --------------------------------------------------------------------------------------------
# Validation (values the type system cannot express)
# --------------------------------------------------------------------------------------------


def _positive(cfg, key: str, allow_zero: bool = False) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


def _one_of(cfg, key: str, allowed) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise UserError(f"{key}={value}: allowed: {', '.join(allowed)}")


def _check_keys(cfg) -> None:
    """Keys added with '+' or by a user's YAML must still exist in the option's schema."""
    from dataclasses import fields

    for group in ("method", "task"):
        node = cfg[group]
        schema = SCHEMAS[group].get(node.get("name"))
        if schema is None:
            raise UserError(f"{group}.name={node.get('name')!r}: unknown; available: "
                            f"{', '.join(SCHEMAS[group])}")
        allowed = {f.name for f in fields(schema)}
        for key in node:
            if key not in allowed:
                raise UserError(unknown_key_message(f"{group}.{key}", schema))


def validate(cfg) -> None:
    """Check value ranges and cross-field rules; raise UserError with one line naming the key."""
    _finite(cfg)
    for key in ["trainer.max_steps", "trainer.lr", "trainer.batch_size", "trainer.grad_accum",
                "method.rank", "task.num_pairs", "task.max_length", "trainer.log_every",
                "task.eval_batch_size", "task.max_new_tokens", "trainer.checkpoint_every_n_layers"]:
        _positive(cfg, key)
    for key in ["trainer.warmup_steps", "trainer.save_every", "trainer.eval_every",
                "trainer.max_grad_norm", "trainer.weight_decay", "trainer.loss_chunk"]:
        _positive(cfg, key, allow_zero=True)
    if cfg.method is not None and cfg.method.get("alpha") is not None and cfg.method.alpha <= 0:
        raise UserError(f"method.alpha={cfg.method.alpha}: must be > 0 (LoRA scales its update by alpha/rank: "
                        "with alpha 0 the update stays zero and nothing trains)")
    seed = cfg.trainer.seed
    if not 0 <= seed < 2**32:
        raise UserError(f"trainer.seed={seed}: must be in [0, 2^32 - 1] (what the random generators accept)")
    if cfg.method is None or cfg.task is None:
        raise UserError("config needs a method and a task (e.g. method=lora task=memorize)")
    _check_keys(cfg)
    check_logger(cfg.get("logger", "tensorboard"))
    _positive(cfg, "trainer.keep_checkpoints", allow_zero=True)
    check_launcher(cfg)
    dropout = cfg.method.get("dropout")
    if dropout is not None and not 0 <= dropout < 1:
        raise UserError(f"method.dropout={dropout}: must be in [0, 1)")
    _one_of(cfg, "trainer.precision", PRECISIONS)
    _one_of(cfg, "trainer.device", DEVICES)
    _one_of(cfg, "model.dtype", DTYPES)
    m = cfg.model
    if m.quantize not in (None, "none", "4bit", "8bit"):
        raise UserError(f"model.quantize={m.quantize}: allowed: 4bit, 8bit (or null)")
    if m.init == Init.pretrained and not m.path:
        raise UserError("model.path is empty: give a local model directory or a hub id")
    if m.init == Init.random and not m.path and not m.arch:
        raise UserError("model.init=random needs model.arch (config values) or model.path (a config to copy)")
    if m.quantize in ("4bit", "8bit") and cfg.method.name == "full":
        raise UserError(f"model.quantize={m.quantize} with method=full: a quantized base cannot be fully "
                        "fine-tuned; use an adapter method (lora, mora, vblora)")
    if m.tokenizer is None and m.init == Init.random and not m.path:
        raise UserError("model.tokenizer is empty: a random-init model needs a tokenizer (e.g. bytes)")
    _validate_task(cfg)
    if cfg.method.name != "full" and "targets" in cfg.method:
        _check_targets("method.targets", cfg.method.targets)


def _check_targets(key: str, targets) -> None:
    """Module names (a non-empty list), ``all-linear``, or a regular expression that compiles."""
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise UserError(f"{key}={targets!r}: not a valid regular expression ({e}); give module names as a "
                                "list, e.g. [q_proj,v_proj], a regex, or all-linear") from None
        return
    if not (hasattr(targets, "__len__") and len(targets) > 0):
        raise UserError(f"{key} is empty: list module names (e.g. [q_proj,v_proj]), a regex string, or all-linear")


def _finite(cfg) -> None:
    """NaN and infinity are accepted by the float type but by no setting."""
    import math

    from omegaconf import OmegaConf

    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f"{prefix}.{key}" if isinstance(node, dict) else f"{prefix}[{key}]"
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{where.lstrip('.')}={value}: must be a finite number")
            walk(value, where)

    walk(OmegaConf.to_container(cfg, resolve=True), "")


def _validate_task(cfg) -> None:
    """Ranges of the data tasks' keys, and the pretrain task's need for a random-init model."""
    for key in ["task.eval_limit", "task.num_proc", "task.data.limit"]:
        _positive(cfg, key)
    _positive(cfg, "task.eval_holdout", allow_zero=True)
    if isinstance(cfg.task.get("train_modules"), str):
        _check_targets("task.train_modules", cfg.task.train_modules)
    if cfg.task.name == "pretrain" and cfg.model.init != Init.random:
        raise UserError(f"task=pretrain trains a model from scratch, but model={cfg.model.name} is pretrained: "
                        "set model.init=random (or pick model=smollm2-16m-random), or use task=cpt "
                        "to continue pretraining it")


def check_logger(logger: Optional[str]) -> None:
    """Reject unknown logger names and ``logger=wandb`` without wandb installed (one line)."""
    if logger not in LOGGERS:
        raise UserError(f"logger={logger}: allowed: {', '.join(LOGGERS)}")
    if logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("logger=wandb needs the wandb package: pip install wandb "
                        "(or use logger=tensorboard, the default)")


def check_launcher(cfg) -> None:
    """The launcher settings alone and with the trainer's; one line naming the key."""
    l = cfg.launcher  # noqa: E741
    if l.name not in LAUNCHERS:
        raise UserError(f"launcher.name={l.name!r}: allowed: {', '.join(LAUNCHERS)}")
    if l.num_processes is not None and l.num_processes < 1:
        raise UserError(f"launcher.num_processes={l.num_processes}: must be >= 1 (or null: one per GPU)")
    if l.num_machines < 1:
        raise UserError(f"launcher.num_machines={l.num_machines}: must be >= 1")
    if not 0 <= l.machine_rank < l.num_machines:
        raise UserError(f"launcher.machine_rank={l.machine_rank}: must be in [0, {l.num_machines - 1}] "
                        f"(launcher.num_machines={l.num_machines})")
    if l.main_process_port is not None and not 1 <= l.main_process_port <= 65535:
        raise UserError(f"launcher.main_process_port={l.main_process_port}: must be a port in [1, 65535]")
    if l.name == "none":
        if (l.num_processes or 1) > 1 or l.num_machines > 1:
            raise UserError(f"launcher.num_processes={l.num_processes} needs a launcher: add launcher=ddp "
                            "(or fsdp, deepspeed)")
        return
    if l.num_machines > 1 and not l.main_process_ip:
        raise UserError(f"launcher.num_machines={l.num_machines}: set launcher.main_process_ip to the address "
                        "of the machine with launcher.machine_rank=0")
    if l.num_machines > 1 and not cfg.output_dir:
        raise UserError(f"launcher.num_machines={l.num_machines}: set output_dir to a directory on storage "
                        "every machine shares (the run directory is written once, by the main process)")
    if l.num_processes is not None and l.num_processes % l.num_machines:
        raise UserError(f"launcher.num_processes={l.num_processes}: must be a multiple of "
                        f"launcher.num_machines={l.num_machines} (it counts the processes of all machines)")
    if l.config_file and not Path(l.config_file).expanduser().is_file():
        raise UserError(f"launcher.config_file={l.config_file}: no such file")
    if l.name == "deepspeed" and cfg.model.quantize not in (None, "none"):
        raise UserError(f"model.quantize={cfg.model.quantize} with launcher=deepspeed: ZeRO-3 cannot partition "
                        "bitsandbytes 4/8-bit weights; use launcher=fsdp (which keeps the small quantized base "
                        "whole on every rank) or launcher=ddp")
    merging = cfg.method.get("remora_every") or cfg.method.get("relora_every")
    if l.name in ("fsdp", "deepspeed") and merging:
        key = "remora_every" if cfg.method.get("remora_every") else "relora_every"
        raise UserError(f"method.{key}={merging} with launcher={l.name}: ReMoRA/ReLoRA merge into the base "
                        "weights during training, which stay whole only with launcher=ddp; use launcher=ddp")
