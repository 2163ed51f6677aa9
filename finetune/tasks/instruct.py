"""Instruction tuning on Alpaca or chat records (experiments.md §2.2, §3.3).

Records (from ``task.data.path``: a local json/jsonl/parquet/csv file or folder, or a hub id;
default hub ``yahma/alpaca-cleaned``):

* Alpaca: ``{instruction, input (optional), output}``;
* chat: ``{messages: [{role, content}, ...]}`` with roles system, user, assistant;
* ShareGPT: ``{conversations: [{from, value}, ...]}`` (human → user, gpt → assistant).

Format (``task.template``): ``auto`` uses the tokenizer's chat template when it has one, else
``plain``; ``tokenizer`` insists on the template; ``plain`` is the fallback layout — Alpaca records
in the Alpaca layout (as for GSM8K), chat records with ``<|role|>`` tags (finetune.data.formatting).
Through a template, an Alpaca record is one user turn (instruction, a blank line, the input) and
one assistant turn (the output). Loss is on assistant tokens only, and every assistant turn ends
with EOS.

Metric: held-out ``loss`` (mean negative log-likelihood per assistant token) and ``perplexity``,
on ``task.eval_path`` or the last ``task.eval_holdout`` records.
"""

from __future__ import annotations

from finetune.data.examples import load_examples
from finetune.data.formatting import (
    alpaca_prompt,
    chat_row,
    check_messages,
    completion_row,
    plain_chat_row,
    text_field,
)
from finetune.data.sources import fingerprint, load_records
from finetune.errors import UserError
from finetune.tasks.common import data_source, eval_source, finish, first, holdout_split

FORMAT_VERSION = 2  # 2: text fields checked (null chat content, lists refused)
DEFAULT_DATA = "yahma/alpaca-cleaned"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def record_kind(fields, where: str) -> str:
    """``chat``, ``sharegpt`` or ``alpaca``, from the fields a record has (a record's fields with a
    value, or the columns of a dataset)."""
    fields = list(fields)
    if "messages" in fields:
        return "chat"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    raise UserError(f"{where}: records need 'messages' (chat), 'conversations' (ShareGPT) or 'instruction' and "
                    f"'output' (Alpaca); fields present: {', '.join(fields) or '(none)'}")


def kind_of(record: dict, where: str) -> str:
    """One record's kind, from its fields that have a value: a file may mix kinds, and its columns
    are the union of theirs (the others' fields come as null)."""
    return record_kind([k for k, v in record.items() if v is not None], where)


def to_messages(record: dict, kind: str, where: str) -> list[dict]:
    """A record as chat messages (checked)."""
    if kind == "alpaca":
        user, extra, output = alpaca_fields(record, where)
        messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                    {"role": "assistant", "content": output}]
    elif kind == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or "value" not in t:
                raise UserError(f"{where}: conversation turn {i} needs 'from' (one of "
                                f"{', '.join(SHAREGPT_ROLES)}) and 'value'")
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    else:
        messages = record["messages"]
    return check_messages(messages, where)


def alpaca_fields(record: dict, where: str) -> tuple[str, str, str]:
    """(instruction, input, output) of an Alpaca record, each text (input may be empty or missing)."""
    return (text_field(record["instruction"], "instruction", where).strip(),
            text_field(record.get("input"), "input", where, empty_ok=True).strip(),
            text_field(record["output"], "output", where))


class Task:
    metric = "perplexity"

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.source = data_source(cfg, DEFAULT_DATA)
        self.template = self._use_template()
        self._train = None
        self._eval = None
        self._eval_ready = None

    def _use_template(self) -> bool:
        choice = getattr(self.cfg.template, "value", self.cfg.template)
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if choice == "tokenizer" and not has:
            raise UserError("task.template=tokenizer: this tokenizer has no chat template; use "
                            "task.template=plain (or auto)")
        return choice == "tokenizer" or (choice == "auto" and has)

    # -- formatting ----------------------------------------------------------------------------
    def row(self, record: dict, kind: str, where: str) -> dict:
        if kind == "alpaca" and not self.template:
            instruction, extra, output = alpaca_fields(record, where)
            return completion_row(self.tokenizer, alpaca_prompt(instruction, extra), output)
        messages = to_messages(record, kind, where)
        if self.template:
            return chat_row(self.tokenizer, messages, where)
        return plain_chat_row(self.tokenizer, messages)

    def rows_of(self, where: str):
        """The batched formatting function for ``datasets.map`` over records from ``where``."""

        def to_rows(batch: dict, indices: list[int]) -> dict:
            out = {"input_ids": [], "labels": []}
            for i, values in zip(indices, zip(*batch.values())):
                record, at = dict(zip(batch, values)), f"{where} record {i}"
                row = self.row(record, kind_of(record, at), at)
                out["input_ids"].append(row["input_ids"])
                out["labels"].append(row["labels"])
            return out

        return to_rows

    def _rows(self, src):
        def load():
            records = load_records(src, num_proc=self.cfg.num_proc)
            record_kind(records.column_names, src.where)
            return records

        settings = {"task": "instruct", "version": FORMAT_VERSION, "template": self.template}
        return load_examples(fingerprint(src), load, self.tokenizer, settings, self.rows_of(src.where),
                             self.cfg.num_proc)

    # -- data ----------------------------------------------------------------------------------
    def _split(self):
        """(training rows, held-out rows), tokenized, before length limits."""
        if self._train is None:
            rows = self._rows(self.source)
            held = eval_source(self.cfg)
            if held is None:
                keep, out = holdout_split(len(rows), self.cfg.eval_holdout, self.source.where)
                self._train, self._eval = rows.select(keep), rows.select(out)
            else:
                self._train, self._eval = rows, self._rows(held)
        return self._train, self._eval

    def train_examples(self):
        train, _ = self._split()
        self.eval_examples()  # held-out data problems surface before training
        return finish(train, self.cfg, self.source.where, self.cfg.packing)

    def eval_examples(self):
        if self._eval_ready is None:
            _, held = self._split()
            where = f"task.eval_path={self.cfg.eval_path}" if self.cfg.eval_path else f"{self.source.where} (held out)"
            self._eval_ready = first(finish(held, self.cfg, where), self.cfg.eval_limit)
        return self._eval_ready

    # -- metric --------------------------------------------------------------------------------
    def evaluate(self, model, device) -> dict:
        from finetune.tasks.perplexity import perplexity

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return perplexity(model, self.eval_examples(), pad, device, self.cfg.eval_batch_size)
