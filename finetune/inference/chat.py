"""``finetune chat``: a conversation with a run (before or after merging) or any model, in the
terminal. Each answer streams as it is generated; the whole conversation goes back to the model
each turn, through the chat template (or the ``<|role|>`` layout without one). Commands: ``/reset``
(forget the conversation), ``/system TEXT`` (a system message, from now on), ``/exit`` (or Ctrl-D).
Ctrl-C stops the answer being generated and keeps the conversation. ``transcript`` writes one JSON
line per turn: the messages sent, their token ids, the answer and its token ids."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.inference.generate import check_sampling
from finetune.inference.load import open_model
from finetune.inference.prompts import CONVERSATIONS, as_messages, choose_format, encode
from finetune.models.generate import Sampling, StopFlag, generate

HELP = "/reset forgets the conversation, /system TEXT sets a system message, /exit leaves; Ctrl-C stops an answer"


def chat(path: str, system: str | None = None, fmt: str = "auto", max_new_tokens: int = 512,
         sampling: Sampling | None = None, device: str = "auto", dtype: str = "auto", transcript: str | None = None,
         overrides: list[str] = (), config_dir: str | None = None) -> int:
    """Run the conversation until /exit or end of input; returns the number of turns."""
    if not sys.stdin.isatty():
        raise UserError("finetune chat needs a terminal, and stdin is not one; for prompts from a file or a pipe "
                        "use finetune generate --file prompts.txt (or --prompt TEXT)")
    sampling = sampling or Sampling()
    check_sampling(sampling)
    opened = open_model(path, list(overrides), config_dir, device, dtype)
    tokenizer = opened.tokenizer
    fmt = choose_format(fmt, opened.cfg, tokenizer, opened.is_run)
    if fmt not in CONVERSATIONS:  # a run that learnt raw text or the Alpaca layout: converse anyway
        fmt = "chat" if getattr(tokenizer, "chat_template", None) else "tags"
    log = open(Path(transcript).expanduser(), "a") if transcript else None
    print(f"finetune chat with {opened.path} ({fmt} format). {HELP}.", flush=True)
    history: list[dict] = []
    turns = 0
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print("\n(/exit leaves)")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, argument = text.partition(" ")
                if command == "/exit":
                    break
                if command == "/reset":
                    history = []
                    print("(the conversation is forgotten)")
                elif command == "/system":
                    system = argument.strip() or None
                    print(f"(system message {'set' if system else 'removed'})")
                else:
                    print(f"(unknown command {command}; {HELP})")
                continue
            messages = as_messages(history + [{"role": "user", "content": text}], system)
            ids = encode(messages, fmt, tokenizer, where="chat")
            answer_ids, stopped = _answer(opened, ids, max_new_tokens, sampling)
            answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            turns += 1
            if log:
                log.write(json.dumps({"turn": turns, "messages": messages, "prompt_ids": ids, "answer": answer,
                                      "answer_ids": answer_ids, "stopped": stopped}, ensure_ascii=False) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    return turns


def _answer(opened, ids: list[int], max_new_tokens: int, sampling: Sampling) -> tuple[list[int], bool]:
    """One answer, streamed to the terminal; Ctrl-C ends it after the current token."""
    from transformers import TextStreamer

    stop = StopFlag()
    previous = signal.signal(signal.SIGINT, lambda *_: setattr(stop, "stop", True))
    print("model> ", end="", flush=True)
    try:
        streamer = TextStreamer(opened.tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = generate(opened.model, opened.tokenizer, [ids], opened.device, max_new_tokens, 1,
                       stop_at_eos=opened.tokenizer.eos_token_id is not None, sampling=sampling,
                       streamer=streamer, stop=stop, bar=False)[0]
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.stop:
        print("[stopped]", flush=True)
    return new, stop.stop
