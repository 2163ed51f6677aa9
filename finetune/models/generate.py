"""Batched generation with left padding: greedy (evaluation, and the default of ``finetune
generate``) or sampled, optionally streamed token by token, optionally stopped from outside (chat's
Ctrl-C)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune import progress


@dataclass
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; otherwise softmax at that
    temperature, restricted to the ``top_k`` most likely tokens (0: all) and the smallest set whose
    probability reaches ``top_p``; ``seed`` makes sampling repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class StopFlag:
    """A stopping criterion set from outside (a signal handler): the batch stops after the token
    being generated."""

    def __init__(self):
        self.stop = False

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int, batch_size: int = 32,
             stop_at_eos: bool = True, sampling: Sampling | None = None, streamer=None, stop: StopFlag | None = None,
             bar: bool = True) -> list[list[int]]:
    """The continuations (token ids, prompt excluded, EOS and what follows dropped) of each prompt.
    Prompts are sorted by length and batched with left padding; the result is in the input order.
    ``streamer`` (one prompt): receives the tokens as they are generated (transformers' streamer
    interface)."""
    sampling = sampling or Sampling()
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    options = dict(max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=pad,
                   eos_token_id=eos if stop_at_eos else None, do_sample=not sampling.greedy)
    if not sampling.greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        torch.manual_seed(sampling.seed)
    if streamer is not None:
        options["streamer"] = streamer
    if stop is not None:
        from transformers import StoppingCriteriaList

        options["stopping_criteria"] = StoppingCriteriaList([stop])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with progress.bar(total=len(prompts), desc="generate", unit="prompt", leave=False, disable=not bar) as done:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                if stop_at_eos and eos in new:
                    new = new[:new.index(eos)]
                results[i] = new
            done.update(len(idx))
    model.train(was_training)
    return results


def greedy_generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int,
                    batch_size: int = 32, stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy continuations (evaluation of the generative tasks)."""
    return generate(model, tokenizer, prompts, device, max_new_tokens, batch_size, stop_at_eos)
