"""Continual pretraining on raw text (experiments.md §2.3).

Corpus (``task.data.path``): text files (``.txt``, ``.md``: one document each), records with a
text field (``task.text_field``) in json/jsonl/parquet/csv files, a folder of these, or a hub
dataset with that field. Null: the Python documentation that ships inside every Python (the
stdlib module ``pydoc_data.topics``, ~80 documents, ~0.5 MB of text) — no download.

Each document is tokenized with the tokenizer's default special tokens (e.g. BOS) and EOS
appended; the documents are concatenated in order and cut into blocks of ``task.max_length``
tokens (the last, shorter block kept), with loss on every token. With ``task.packing=true`` the
documents inside a block also never attend to each other: positions restart at every document and
a document's first token has no loss (nothing in its own document predicts it).

The last ``task.eval_holdout`` blocks are held out (or the blocks of ``task.eval_path``). Metric:
``perplexity`` per token on them (and ``loss``, ``tokens``, ``n`` blocks). ``task.train_modules``
lists base modules that train in full next to the adapter (finetune.adapters.base.unfreeze_modules).
"""

from __future__ import annotations

import sys

import numpy as np

from finetune.data.examples import IGNORE, Examples, load_examples
from finetune.data.packing import segment_positions
from finetune.data.sources import Source, fingerprint, load_records
from finetune.errors import UserError
from finetune.tasks.common import eval_source, first, holdout_split

FORMAT_VERSION = 1


def python_docs(limit: int | None = None):
    """The built-in corpus: the topics of the Python documentation shipped in ``pydoc_data``
    (the first ``limit``), as records ``{"text"}``."""
    from pydoc_data.topics import topics

    import datasets

    names = sorted(topics)[:limit]
    return datasets.Dataset.from_list([{"text": topics[k].strip()} for k in names])


def blocks(docs: Examples, block: int, packing: bool) -> Examples:
    """Documents (rows) concatenated and cut into rows of ``block`` tokens; the last row may be
    shorter (a lone final token, which would teach nothing, is dropped). ``packing``: positions
    restart at every document and block start, and documents' first tokens lose their labels."""
    ids = np.asarray(docs.arrays["input_ids"])
    n = len(ids) if len(ids) % block != 1 else len(ids) - 1
    offsets = np.append(np.arange(0, n, block, dtype=np.int64), n)
    if not packing:
        return Examples(offsets, input_ids=ids[:n], labels=ids[:n])
    labels = np.array(ids[:n], copy=True)
    doc_starts = docs.offsets[:-1][docs.offsets[:-1] < n]
    labels[doc_starts] = IGNORE
    cuts = np.union1d(doc_starts, offsets)
    positions = segment_positions(np.diff(cuts))
    return Examples(offsets, input_ids=ids[:n], labels=labels, position_ids=positions)


class Task:
    metric = "perplexity"

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train_modules = cfg.train_modules if isinstance(cfg.train_modules, str) else list(cfg.train_modules)
        self.source = (Source(cfg.data.path, cfg.data.name, cfg.data.split, cfg.data.revision, cfg.data.limit)
                       if cfg.data.path else None)
        self._train = None
        self._eval = None

    @property
    def where(self) -> str:
        return self.source.where if self.source else "the built-in corpus (pydoc_data.topics)"

    # -- formatting ----------------------------------------------------------------------------
    def to_rows(self, batch: dict, indices: list[int]) -> dict:
        """One row per non-empty document: its tokens + EOS, all with loss."""
        eos = self.tokenizer.eos_token_id
        field = self.cfg.text_field if self.cfg.text_field in batch else "text"  # built-in corpus: "text"
        texts = [t for t in batch[field] if t is not None and str(t).strip()]
        ids = [row + [eos] for row in self.tokenizer([str(t) for t in texts], add_special_tokens=True)["input_ids"]]
        return {"input_ids": ids, "labels": ids}

    def documents(self, src: Source | None) -> Examples:
        """The tokenized documents of ``src`` (None: the built-in corpus), cached."""
        settings = {"task": "cpt", "version": FORMAT_VERSION, "text_field": self.cfg.text_field}
        if src is None:  # the built-in corpus has its text in "text"
            settings["text_field"] = "text"
            key = ["pydoc_data.topics", sys.version, self.cfg.data.limit]
            load = lambda: python_docs(self.cfg.data.limit)
        else:
            key = fingerprint(src)
            load = lambda: load_records(src, [self.cfg.text_field], self.cfg.num_proc)
        docs = load_examples(key, load, self.tokenizer, settings, self.to_rows, self.cfg.num_proc)
        if len(docs) == 0:
            raise UserError(f"{src.where if src else self.where}: every document is empty")
        return docs

    # -- data ----------------------------------------------------------------------------------
    def _split(self) -> tuple[Examples, Examples]:
        if self._train is None:
            rows = blocks(self.documents(self.source), self.cfg.max_length, self.cfg.packing)
            held = eval_source(self.cfg)
            if held is None:
                keep, out = holdout_split(len(rows), self.cfg.eval_holdout, self.where)
                self._train, self._eval = rows.select(keep), rows.select(out)
            else:
                self._train = rows
                self._eval = blocks(self.documents(held), self.cfg.max_length, self.cfg.packing)
        return self._train, self._eval

    def train_examples(self) -> Examples:
        return self._split()[0]

    def eval_examples(self) -> Examples:
        return first(self._split()[1], self.cfg.eval_limit)

    # -- metric --------------------------------------------------------------------------------
    def evaluate(self, model, device) -> dict:
        from finetune.tasks.perplexity import perplexity

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return perplexity(model, self.eval_examples(), pad, device, self.cfg.eval_batch_size)
