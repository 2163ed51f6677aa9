"""GSM8K math word problems (experiments.md §6).

Training data (``task.source``):

* ``gsm8k``: records ``{question, answer}``, hub ``openai/gsm8k`` (config ``main``) unless
  ``task.data.path`` names a local file; the answers' calculator annotations ``<<…>>`` are removed,
  their final ``#### <number>`` line stays.
* ``metamath``: records ``{query, response}``, hub ``meta-math/MetaMathQA`` unless
  ``task.data.path`` is given (the MoRA / VB-LoRA training set; responses end with
  ``The answer is: <answer>``).

Format (§6.2): the Alpaca layout (finetune.data.formatting) with the question as the instruction
(MetaMathQA: the query's first line; its other lines are the input); the target is the answer +
EOS, and only the target has loss.

Evaluation (§6.1): GSM8K problems from ``task.eval_path`` (a local file, or a hub id with split
``task.eval_split``); without it, the hub's GSM8K test split when training on a hub dataset, or the
last ``task.eval_holdout`` records of a local training file (never the test split by accident).
Greedy decoding, batched with left padding, stops at EOS after at most ``task.max_new_tokens``.
The prediction is the text after the last occurrence of the first delimiter found (``The answer
is:``, ``The answer is``, ``The final answer is:``, ``The final answer is``, ``####``), first line,
normalised (``$``, ``%``, thousands separators, trailing ``.!?`` removed; LaTeX ``\\frac{a}{b}``
read as a/b); its first number is compared numerically with the gold answer (``18 == 18.00``,
fractions evaluated). No delimiter: unanswered, which counts as wrong.

Metrics: ``accuracy`` = correct / n (the primary metric), ``correct``, ``n``, ``unanswered``, and
``accuracy_lenient`` (the last number anywhere in the output; a secondary, forgiving score).
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import cached_property

from finetune.data.examples import cached_json, load_examples
from finetune.data.formatting import alpaca_prompt, completion_row, prompt_ids, text_field
from finetune.data.sources import Source, fingerprint, is_local, load_records, require_fields
from finetune.errors import UserError
from finetune.tasks.common import data_source, eval_source, finish, first, holdout_split

FORMAT_VERSION = 1

HUB = {"gsm8k": ("openai/gsm8k", "main"), "metamath": ("meta-math/MetaMathQA", None)}
HUB_NAMES = {"openai/gsm8k": "main", "gsm8k": "main"}  # hub datasets whose configuration is implied
FIELDS = {"gsm8k": ("question", "answer"), "metamath": ("query", "response")}

# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------

DELIMITERS = ("The answer is:", "The answer is", "The final answer is:", "The final answer is", "####")
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*(?:\d+(?:\.\d*)?|\.\d+))?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
LATEX_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
CALCULATOR = re.compile(r"<<[^<>]*>>")


def normalise(text: str) -> str:
    """The first non-empty line, with ``$``, ``%``, ``\\!`` and thousands separators removed,
    LaTeX fractions as a/b, a Unicode minus as '-', and no trailing ``.``, ``!`` or ``?``."""
    stripped = text.strip()
    line = stripped.split("\n", 1)[0] if stripped else ""
    line = line.replace("\u2212", "-").replace("$", "").replace("%", "").replace("\\!", "")
    line = LATEX_FRACTION.sub(r"\1/\2", line)
    line = THOUSANDS.sub("", line)
    return line.strip().rstrip(".!?").strip()


def extract_answer(output: str) -> str | None:
    """The normalised answer after the first delimiter found (its last occurrence), or None."""
    for delimiter in DELIMITERS:
        if delimiter in output:
            return normalise(output.rsplit(delimiter, 1)[1])
    return None


def to_number(text: str) -> Fraction | None:
    """The first number in ``text`` (integer, decimal or fraction a/b), exactly; None if none."""
    match = NUMBER.search(THOUSANDS.sub("", text))
    if match is None:
        return None
    parts = re.sub(r"\s+", "", match.group(0)).split("/")
    try:
        value = Fraction(parts[0])
        return value / Fraction(parts[1]) if len(parts) == 2 else value
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number anywhere in ``text`` (the lenient score)."""
    found = NUMBER.findall(THOUSANDS.sub("", text.replace("\u2212", "-")))
    return to_number(found[-1]) if found else None


def same_answer(prediction: str | None, gold: str) -> bool:
    """Numeric equality of the first numbers when both have one, else equal normalised text."""
    if prediction is None:
        return False
    p, g = to_number(prediction), to_number(gold)
    if p is not None and g is not None:
        return p == g
    return prediction.strip().lower() == gold.strip().lower()


def gold_answer(answer: str, where: str) -> str:
    """A GSM8K answer's final number: the text after its last ``####``, normalised."""
    if "####" not in answer:
        raise UserError(f"{where}: the answer has no final '#### <number>' line")
    return normalise(answer.rsplit("####", 1)[1])


def split_query(query: str) -> tuple[str, str]:
    """MetaMathQA (§6.2): the instruction is the query's first line, the input the other lines."""
    instruction, _, rest = query.strip().partition("\n")
    return instruction.strip(), rest.strip()


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class Task:
    metric = "accuracy"

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.source_format = getattr(cfg.source, "value", cfg.source)
        self.source = data_source(cfg, *HUB[self.source_format])
        self._records = None  # the training records, while both the rows and the held-out problems need them
        self._eval = None

    # -- formatting ----------------------------------------------------------------------------
    def prompt(self, question: str, fmt: str = "gsm8k") -> str:
        if fmt == "metamath":
            return alpaca_prompt(*split_query(question))
        return alpaca_prompt(question.strip())

    def target(self, answer: str, fmt: str = "gsm8k") -> str:
        return CALCULATOR.sub("", answer).strip() if fmt == "gsm8k" else answer.strip()

    def to_rows(self, batch: dict, indices: list[int]) -> dict:
        q_field, a_field = FIELDS[self.source_format]
        out = {"input_ids": [], "labels": []}
        for question, answer, i in zip(batch[q_field], batch[a_field], indices):
            where = f"{self.source.where} record {i}"
            question, answer = text_field(question, q_field, where), text_field(answer, a_field, where)
            row = completion_row(self.tokenizer, self.prompt(question, self.source_format),
                                 self.target(answer, self.source_format))
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
        return out

    # -- data ----------------------------------------------------------------------------------
    @cached_property
    def source_key(self):
        """The training source's fingerprint (None for a hub dataset), taken once."""
        return fingerprint(self.source)

    def training_records(self):
        """The training source's records, read once for the rows and the held-out problems."""
        if self._records is None:
            self._records = load_records(self.source, list(FIELDS[self.source_format]), self.cfg.num_proc)
        return self._records

    def all_rows(self):
        """One tokenized row per training record (from the data cache after the first run)."""
        settings = {"task": "gsm8k", "version": FORMAT_VERSION, "source": self.source_format}
        return load_examples(self.source_key, self.training_records, self.tokenizer, settings, self.to_rows,
                             self.cfg.num_proc)

    def holding_out(self) -> bool:
        """Without task.eval_path, local training data gives up its last records for evaluation;
        hub training data is evaluated on the hub's GSM8K test split."""
        return self.cfg.eval_path is None and is_local(self.source.path)

    def train_examples(self):
        rows = self.all_rows()
        if self.holding_out():
            rows = rows.select(holdout_split(len(rows), self.cfg.eval_holdout, self.source.where)[0])
        self.eval_items()  # held-out data problems surface before training, not after it
        self._records = None  # not kept through training
        return finish(rows, self.cfg, self.source.where, self.cfg.packing)

    def eval_items(self) -> list[tuple[str, str]]:
        """(prompt text, gold answer) of every evaluation problem."""
        if self._eval is None:
            self._eval = self._load_eval()
        return self._eval

    def _load_eval(self) -> list[tuple[str, str]]:
        """The evaluation problems; from local files they are cached (cached_json) like the
        training rows, keyed on the files, the held-out count and the format."""
        if self.holding_out():
            src, held_out = self.source, self.cfg.eval_holdout
        else:
            src, held_out = eval_source(self.cfg, HUB_NAMES) or Source("openai/gsm8k", "main", self.cfg.eval_split,
                                                                        key="task.eval_path"), None
        key = self.source_key if src is self.source else fingerprint(src)
        if key is None:  # a hub dataset
            return self._eval_of(src, held_out)
        settings = {"task": "gsm8k-eval", "version": FORMAT_VERSION, "source": self.source_format, "holdout": held_out}
        return [tuple(item) for item in cached_json({"source": key, "settings": settings},
                                                    lambda: self._eval_of(src, held_out))]

    def _eval_of(self, src: Source, held_out: int | None) -> list[tuple[str, str]]:
        """Held out (``held_out`` records at the end of the training data) or a whole evaluation
        source, whose format (gsm8k or metamath) its fields tell."""
        if held_out is not None:  # src is the training source
            records = self.training_records()
            held = holdout_split(len(records), held_out, src.where)[1]
            return self._items(records.select(held), self.source_format, src.where)
        records = load_records(src, num_proc=self.cfg.num_proc)
        fmt = "metamath" if "query" in records.column_names and "question" not in records.column_names else "gsm8k"
        require_fields(records.column_names, FIELDS[fmt], src.where)
        return self._items(records, fmt, src.where)

    def _items(self, records, fmt: str, where: str) -> list[tuple[str, str]]:
        q_field, a_field = FIELDS[fmt]
        items = []
        for i, (question, answer) in enumerate(zip(records[q_field], records[a_field])):
            at = f"{where} record {i}"
            question, answer = text_field(question, q_field, at), text_field(answer, a_field, at)
            if fmt == "gsm8k":
                gold = gold_answer(answer, at)
            else:
                gold = extract_answer(answer)
                if gold is None:
                    raise UserError(f"{at}: the response has no 'The answer is' line")
            items.append((self.prompt(question, fmt), gold))
        return items

    # -- metric --------------------------------------------------------------------------------
    def evaluate(self, model, device) -> dict:
        from finetune.models.generate import greedy_generate

        items = first(self.eval_items(), self.cfg.eval_limit)
        prompts = [prompt_ids(self.tokenizer, p) for p, _ in items]
        outputs = greedy_generate(model, self.tokenizer, prompts, device, max_new_tokens=self.cfg.max_new_tokens,
                                  batch_size=self.cfg.eval_batch_size, stop_at_eos=True)
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        return score(texts, [gold for _, gold in items])


def score(outputs: list[str], golds: list[str]) -> dict:
    """Accuracy (unanswered count as wrong), the unanswered count, and the lenient accuracy."""
    correct = unanswered = lenient = 0
    for output, gold in zip(outputs, golds):
        prediction = extract_answer(output)
        unanswered += prediction is None
        correct += same_answer(prediction, gold)
        g, last = to_number(gold), last_number(output)
        lenient += g is not None and last == g
    n = len(golds)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "unanswered": unanswered,
            "accuracy_lenient": lenient / n if n else 0.0}
