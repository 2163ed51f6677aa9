"""Turning records into token ids and labels (-100: no loss), for the supervised tasks.

* :func:`alpaca_prompt`: the Stanford Alpaca layout (experiments.md §6.2) with our own preamble:
  the preamble, then ``### Instruction:``, ``### Input:`` (only with an input) and
  ``### Response:``, each header followed by a newline and its text, sections separated by blank
  lines.
* :func:`completion_row`: prompt tokens (the tokenizer's default special tokens, e.g. BOS) with
  no loss, then the completion's tokens and EOS with loss. Prompt and completion are tokenized
  separately, so the prompt used for generation is exactly the training prefix.
* :func:`chat_row`: a conversation through the tokenizer's chat template, loss on the assistant
  turns only. Assistant spans are found by rendering prefixes of the conversation (works for
  every template, with or without ``{% generation %}`` markers); each assistant turn ends with EOS.
* :func:`plain_chat_row`: the fallback for tokenizers without a chat template: ``<|role|>`` tags
  (the open-instruct layout, experiments.md §2.2), EOS after every assistant turn.
"""

from __future__ import annotations

from finetune.data.examples import IGNORE
from finetune.errors import UserError

PREAMBLE = "The following is an instruction that describes a task. Write a response that carries it out."
PREAMBLE_WITH_INPUT = ("The following is an instruction that describes a task, together with an input that "
                       "gives more context. Write a response that carries it out.")

ROLES = ("system", "user", "assistant")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, ending with ``### Response:\\n`` (the response follows directly)."""
    if input:
        return (f"{PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n")
    return f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's tokens with the tokenizer's default special tokens (BOS where it adds one)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def completion_row(tokenizer, prompt: str, completion: str) -> dict:
    """Prompt tokens without loss, then completion + EOS with loss."""
    head = prompt_ids(tokenizer, prompt)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail}


# --------------------------------------------------------------------------------------------
# Chat records
# --------------------------------------------------------------------------------------------


def text_field(value, field: str, where: str, empty_ok: bool = False) -> str:
    """A record's text field as a string: lists, numbers, objects and (unless ``empty_ok``) empty
    or missing values are refused in one line naming the record and the field."""
    if value is None and empty_ok:
        return ""
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]}"
        raise UserError(f"{where}: {field!r} must be text, not {shown}")
    if not value.strip() and not empty_ok:
        raise UserError(f"{where}: {field!r} is empty")
    return value


def check_messages(messages, where: str, answered: bool = True) -> list[dict]:
    """Messages as ``[{"role", "content"}]`` with known roles and (``answered``: training data) at
    least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs 'role' and 'content'"
                            + (f"; it has {', '.join(m)}" if isinstance(m, dict) else ""))
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        # training data needs text to learn in every assistant turn; a conversation so far may hold an empty answer
        content = text_field(m["content"], f"messages[{i}].content", where,
                             empty_ok=m["role"] != "assistant" or not answered)
        out.append({"role": m["role"], "content": content})
    if answered and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message, so nothing to learn")
    return out


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn: from the end of
    the prefix rendered with the generation prompt to the end of the prefix including the turn
    (trailing whitespace excluded). Fails if the template does not render prefixes as prefixes."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise UserError(f"{where}: the tokenizer's chat template does not render the conversation "
                            "turn by turn (a prefix renders differently), so assistant tokens cannot be "
                            "found; use task.template=plain")
        end = len(upto.rstrip())
        spans.append((len(before), max(end, len(before))))
    return text, spans


def chat_row(tokenizer, messages: list[dict], where: str) -> dict:
    """A conversation through the tokenizer's chat template; loss on assistant tokens only, and an
    EOS (with loss) after any assistant turn whose template does not end it with EOS."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    eos = tokenizer.eos_token_id
    out_ids, out_labels = [], []
    span = 0
    for t, (token, (start, _)) in enumerate(zip(ids, offsets)):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
        out_ids.append(token)
        out_labels.append(token if inside else IGNORE)
        next_start = offsets[t + 1][0] if t + 1 < len(ids) else len(text)
        if inside and next_start >= spans[span][1] and token != eos:  # the turn's last token
            out_ids.append(eos)
            out_labels.append(eos)
    return {"input_ids": out_ids, "labels": out_labels}


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a model trained by :func:`chat_row` answers: the conversation so far through the
    chat template, with the generation prompt (tokenized as in training)."""
    return tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def plain_chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a model trained by :func:`plain_chat_row` answers: the conversation so far in
    the ``<|role|>`` layout, then ``<|assistant|>\n``."""
    ids = plain_chat_row(tokenizer, messages)["input_ids"] if messages else tokenizer("", add_special_tokens=True)["input_ids"]
    return ids + tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]


def plain_chat_row(tokenizer, messages: list[dict]) -> dict:
    """The fallback layout: ``<|role|>\\n`` + content + ``\\n`` per message, EOS after every
    assistant turn; loss on assistant content and its EOS. Starts with the tokenizer's default
    special tokens (BOS where it adds one)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    labels = [IGNORE] * len(ids)
    for m in messages:
        head = tokenizer(f"<|{m['role']}|>\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if m["role"] == "assistant":
            body = body + [tokenizer.eos_token_id]
            ids += head + body + newline
            labels += [IGNORE] * len(head) + body + [IGNORE] * len(newline)
        else:
            ids += head + body + newline
            labels += [IGNORE] * (len(head) + len(body) + len(newline))
    return {"input_ids": ids, "labels": labels}

