"""Batched greedy generation with left padding (evaluation of generative tasks)."""

from __future__ import annotations

import torch

from finetune import progress


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int,
                    batch_size: int = 32, stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) of each prompt. Prompts are sorted by
    length and batched with left padding; the result is in the input order."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with progress.bar(total=len(prompts), desc="eval", unit="prompt", leave=False) as bar:  # closed before any message
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=eos if stop_at_eos else None)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                if stop_at_eos and eos in new:
                    new = new[:new.index(eos)]
                results[i] = new
            bar.update(len(idx))
    model.train(was_training)
    return results
