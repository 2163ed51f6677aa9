"""Memorization of random UUID key → value pairs (MoRA paper; experiments.md §1).

Data: ``num_pairs`` pairs of version-4 UUIDs drawn from a seeded generator; each example is the
text ``key:value`` (no template, no EOS), with the tokenizer's default special tokens, and the loss
on all tokens. Metric: greedy decoding from the training tokens of ``key:``, first 36 generated
characters; ``char_acc`` compares the 32 hex digits position by position (hyphens removed,
missing characters wrong), ``char_acc_36`` all 36 characters, ``exact_match`` the whole value.
"""

from __future__ import annotations

import random
import uuid

UUID_LEN = 36


def make_pairs(num_pairs: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic (key, value) UUID4 pairs with unique keys."""
    rng = random.Random(seed)
    pairs, keys = [], set()
    while len(pairs) < num_pairs:
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if key not in keys:
            keys.add(key)
            pairs.append((key, value))
    return pairs


def char_accuracy(prediction: str, truth: str, hex_only: bool = True) -> float:
    """Position-by-position accuracy of ``prediction`` against ``truth``; missing characters count
    as wrong. ``hex_only`` removes hyphens from both first (32 hex digits of a UUID)."""
    if hex_only:
        prediction, truth = prediction.replace("-", ""), truth.replace("-", "")
    return sum(p == t for p, t in zip(prediction, truth)) / len(truth)


class Task:
    metric = "char_acc"

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pairs = make_pairs(cfg.num_pairs, cfg.seed)

    def texts(self) -> list[str]:
        return [f"{k}:{v}" for k, v in self.pairs]

    def train_examples(self) -> list[dict]:
        enc = self.tokenizer(self.texts(), add_special_tokens=True, truncation=True,
                             max_length=self.cfg.max_length)
        return [{"input_ids": ids, "labels": list(ids)} for ids in enc["input_ids"]]

    def prompts(self) -> list[tuple[list[int], str]]:
        """For each pair: the training tokens up to the token boundary at or before the value
        (so the prompt is a prefix of the training example), and the text those tokens cover."""
        out = []
        for key, value in self.pairs:
            text = f"{key}:{value}"
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            cut = len(key) + 1
            n = 0
            for i, (start, end) in enumerate(enc["offset_mapping"]):
                if end <= cut and not (start == end == 0 and i > 0):
                    n = i + 1
                elif start < cut:
                    break
            covered = max((e for s, e in enc["offset_mapping"][:n]), default=0)
            out.append((enc["input_ids"][:n], text[:covered]))
        return out

    def predictions(self, model, device, limit: int | None = None) -> list[tuple[str, str, str]]:
        """``(key, true value, generated value)`` for the first ``limit`` pairs (all by default)."""
        from finetune.models.generate import greedy_generate

        limit = limit or len(self.pairs)
        prompts = self.prompts()[:limit]
        outputs = greedy_generate(model, self.tokenizer, [ids for ids, _ in prompts], device,
                                  max_new_tokens=self.cfg.max_new_tokens,
                                  batch_size=self.cfg.eval_batch_size, stop_at_eos=False)
        out = []
        for (key, value), (_, covered), generated in zip(self.pairs, prompts, outputs):
            full = covered + self.tokenizer.decode(generated, skip_special_tokens=True)
            out.append((key, value, full[len(key) + 1:len(key) + 1 + UUID_LEN]))
        return out

    def evaluate(self, model, device) -> dict:
        self.last_predictions = self.predictions(model, device, self.cfg.eval_limit)
        hex_acc, acc36, exact = 0.0, 0.0, 0
        for _, value, pred in self.last_predictions:
            hex_acc += char_accuracy(pred, value, hex_only=True)
            acc36 += char_accuracy(pred, value, hex_only=False)
            exact += pred == value
        n = len(self.last_predictions)
        return {"char_acc": hex_acc / n, "char_acc_36": acc36 / n, "exact_match": exact / n, "n": n}

    def before_after(self, before: list[tuple[str, str, str]], after: list[tuple[str, str, str]]) -> str:
        """A few pairs side by side: the true value, what the base model generated and what the
        trained model generates; ``^`` under every character that differs from the true value."""
        def shown(pred: str) -> str:
            return pred.replace("\n", "⏎").ljust(UUID_LEN)[:UUID_LEN]

        def marks(pred: str, value: str) -> str:
            return "".join(" " if p == v else "^" for p, v in zip(shown(pred), value))

        width = UUID_LEN + 2
        lines = [f"{'key':<10}{'true value':<{width}}{'base model':<{width}}{'trained model':<{width}}"]
        for (key, value, was), (_, _, now) in zip(before, after):
            verdict = "exact" if now == value else f"{sum(m == '^' for m in marks(now, value))} wrong"
            lines.append(f"{key[:8] + '…':<10}{value:<{width}}{shown(was):<{width}}{shown(now):<{width}}{verdict}")
            lines.append(f"{'':<10}{'':<{width}}{marks(was, value):<{width}}{marks(now, value)}")
        return "\n".join(line.rstrip() for line in lines)
