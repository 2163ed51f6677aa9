"""``finetune generate``: completions of prompts by a run (before or after merging) or any model,
formatted the way the run's task trained (finetune.inference.prompts). Greedy unless a temperature
is given; stops at EOS or ``max_new_tokens``. One prompt on a terminal streams token by token;
``out`` writes one JSON line per prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune.errors import UserError
from finetune.inference.load import open_model
from finetune.inference.prompts import choose_format, encode, read_prompts
from finetune.models.generate import Sampling, generate


def generate_prompts(path: str, prompts: list, file: str | None = None, out: str | None = None, fmt: str = "auto",
                     max_new_tokens: int = 256, sampling: Sampling | None = None, batch_size: int = 8,
                     device: str = "auto", dtype: str = "auto", system: str | None = None,
                     overrides: list[str] = (), config_dir: str | None = None, quiet: bool = False) -> list[dict]:
    """One record per prompt: the prompt, the completion and their token counts."""
    prompts = list(prompts) + (read_prompts(file) if file else [])
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --file prompts.txt|.jsonl")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    sampling = sampling or Sampling()
    check_sampling(sampling)
    if out and Path(out).expanduser().is_dir():
        raise UserError(f"--out {out}: a directory; give a file to write JSON lines to")
    opened = open_model(path, list(overrides), config_dir, device, dtype)
    fmt = choose_format(fmt, opened.cfg, opened.tokenizer, opened.is_run)
    ids = [encode(p, fmt, opened.tokenizer, system, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    stream = len(prompts) == 1 and not out and sys.stdout.isatty()
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(opened.tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = opened.tokenizer.eos_token_id
    completions = generate(opened.model, opened.tokenizer, ids, opened.device, max_new_tokens, batch_size,
                           stop_at_eos=eos is not None, sampling=sampling, streamer=streamer, bar=not quiet)
    records = []
    for prompt, prompt_ids, new in zip(prompts, ids, completions):
        records.append({"prompt": prompt, "format": fmt, "completion": opened.tokenizer.decode(new, skip_special_tokens=True),
                        "prompt_tokens": len(prompt_ids), "completion_tokens": len(new),
                        "completion_ids": new, "stopped": "length" if len(new) >= max_new_tokens else "eos"})
    if out:
        target = Path(out).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif not stream:
        for r in records:
            print(r["completion"], flush=True)
    return records


def check_sampling(sampling: Sampling) -> None:
    if not sampling.temperature >= 0:
        raise UserError(f"--temperature {sampling.temperature}: must be >= 0 (0: greedy)")
    if not 0 < sampling.top_p <= 1:
        raise UserError(f"--top-p {sampling.top_p}: must be in (0, 1]")
    if sampling.top_k < 0:
        raise UserError(f"--top-k {sampling.top_k}: must be >= 0 (0: no limit)")
