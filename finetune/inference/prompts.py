"""Prompts as the model learnt to read them. ``--format``:

    raw      the text as it is, with the tokenizer's default special tokens (memorize, cpt, pretrain)
    alpaca   the Alpaca layout, the prompt as the instruction (gsm8k, instruct on Alpaca records
             without a chat template)
    chat     a conversation through the tokenizer's chat template (instruct with a template)
    tags     a conversation in the ``<|role|>`` layout (instruct on chat records without a template)
    auto     the run's task decides, as listed; a model directory: chat when its tokenizer has a
             chat template, else raw

Prompts come from ``--prompt`` or a file: ``.txt`` one prompt a line, ``.jsonl`` one object a line,
``{"prompt": ...}``, ``{"instruction": ..., "input": ...}`` (Alpaca) or ``{"messages": [...]}``
(a conversation, for chat and tags).
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data.formatting import (
    alpaca_prompt,
    chat_prompt_ids,
    check_messages,
    plain_chat_prompt_ids,
    prompt_ids,
    text_field,
)
from finetune.errors import UserError

FORMATS = ("auto", "raw", "alpaca", "chat", "tags")
CONVERSATIONS = ("chat", "tags")


def choose_format(requested: str, cfg, tokenizer, is_run: bool) -> str:
    if requested not in FORMATS:
        raise UserError(f"--format {requested}: allowed: {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise UserError("--format chat: this tokenizer has no chat template; use --format tags (or raw)")
    if requested != "auto":
        return requested
    if not is_run:
        return "chat" if has_template else "raw"
    task = cfg.task.name
    if task == "gsm8k":
        return "alpaca"
    if task == "instruct":
        choice = getattr(cfg.task.template, "value", cfg.task.template)
        return "chat" if choice == "tokenizer" or (choice == "auto" and has_template) else "alpaca"
    return "raw"


def as_messages(prompt, system: str | None = None) -> list[dict]:
    """A prompt (text or a list of messages) as a conversation, with ``system`` first."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def encode(prompt, fmt: str, tokenizer, system: str | None = None, where: str = "--prompt") -> list[int]:
    """The token ids of one prompt: a text, an Alpaca pair (instruction, input) or a conversation."""
    if fmt in CONVERSATIONS:
        messages = as_messages(prompt if not isinstance(prompt, tuple) else prompt[0], system)
        checked = check_messages(messages, where, answered=False)
        return chat_prompt_ids(tokenizer, checked) if fmt == "chat" else plain_chat_prompt_ids(tokenizer, checked)
    if isinstance(prompt, list):
        raise UserError(f"{where}: a conversation (messages) needs --format chat or tags, not {fmt}")
    if fmt == "alpaca":
        instruction, extra = prompt if isinstance(prompt, tuple) else (prompt, "")
        return prompt_ids(tokenizer, alpaca_prompt(instruction.strip(), extra.strip()))
    return prompt_ids(tokenizer, prompt[0] if isinstance(prompt, tuple) else prompt)


def read_prompts(path: str) -> list:
    """The prompts of a ``.txt`` or ``.jsonl`` file: texts, (instruction, input) pairs or message lists."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--file {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--file {path}: not UTF-8 text (byte {e.start})") from None
    if file.suffix == ".txt":
        prompts = [line for line in text.splitlines() if line.strip()]
    elif file.suffix == ".jsonl":
        prompts = [_record(line, f"--file {path}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raise UserError(f"--file {path}: allowed: a .txt file (one prompt a line) or a .jsonl file")
    if not prompts:
        raise UserError(f"--file {path}: holds no prompt")
    return prompts


def _record(line: str, where: str):
    try:
        record = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: malformed JSON ({e})") from None
    if isinstance(record, dict) and "messages" in record:
        return check_messages(record["messages"], where, answered=False)
    if isinstance(record, dict) and "instruction" in record:
        return (text_field(record["instruction"], "instruction", where),
                text_field(record.get("input"), "input", where, empty_ok=True))
    if isinstance(record, dict) and "prompt" in record:
        return text_field(record["prompt"], "prompt", where)
    raise UserError(f"{where}: a prompt record needs 'prompt', 'instruction' (and 'input') or 'messages'")
