"""Tokenized examples and their cache.

:class:`Examples` keeps every field of every row in one flat int32 array plus row offsets, so a
corpus of millions of rows stays compact and loads memory-mapped; indexing it gives the
``{"input_ids": [...], "labels": [...]}`` dicts the training loop collates (plus
``position_ids`` for packed rows).

:func:`load_examples` tokenizes a source's records once and caches the result under
``FINETUNE_CACHE/data/<key>``, the key being a hash of the source (local files: path, size and
modification time; hub datasets: their ``datasets`` fingerprint), the tokenizer (vocabulary,
special tokens, chat template) and the task's formatting settings. A second run with the same data
skips loading and tokenizing. Rows are cached before any length limit, packing or held-out split,
which are cheap array operations applied afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from finetune.environment import cache_dir

FIELDS = ("input_ids", "labels", "position_ids")
IGNORE = -100  # the label of a token that carries no loss (prompts, padding)
META_FILE = "meta.json"


class Examples(Sequence):
    """Rows of token ids: ``arrays[field][offsets[i]:offsets[i + 1]]`` is field ``field`` of row i."""

    def __init__(self, offsets: np.ndarray, **arrays: np.ndarray):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.arrays = {k: v for k, v in arrays.items() if v is not None}

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "Examples":
        rows = list(rows)
        lengths = [len(r["input_ids"]) for r in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        fields = [f for f in FIELDS if rows and f in rows[0]]
        arrays = {f: np.fromiter((t for r in rows for t in r[f]), dtype=np.int32, count=int(offsets[-1]))
                  for f in fields}
        return cls(offsets, **arrays)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        start, end = self.offsets[i], self.offsets[i + 1]
        return {k: a[start:end].tolist() for k, a in self.arrays.items()}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, indices) -> "Examples":
        """The rows ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self._take(self.offsets[:-1][idx], self.lengths()[idx])

    def truncated(self, max_length: int) -> "Examples":
        """Every row cut to its first ``max_length`` tokens."""
        return self._take(self.offsets[:-1], np.minimum(self.lengths(), max_length))

    def _take(self, starts: np.ndarray, lengths: np.ndarray) -> "Examples":
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return Examples(offsets, **{k: np.asarray(a[flat]) for k, a in self.arrays.items()})

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "offsets.npy", self.offsets)
        for name, array in self.arrays.items():
            np.save(directory / f"{name}.npy", np.asarray(array, dtype=np.int32))

    @classmethod
    def load(cls, directory: Path) -> "Examples":
        arrays = {f: np.load(directory / f"{f}.npy", mmap_mode="r")
                  for f in FIELDS if (directory / f"{f}.npy").is_file()}
        return cls(np.load(directory / "offsets.npy"), **arrays)


# --------------------------------------------------------------------------------------------
# Tokenizing records, with a cache
# --------------------------------------------------------------------------------------------


def tokenize_records(records, to_rows: Callable[[dict, list[int]], dict], num_proc: int | None = None
                     ) -> Examples:
    """Apply ``to_rows(batch, indices)`` (a batch of records as ``{field: [values]}`` and their
    record indices → ``{"input_ids": [[...]], "labels": [[...]]}``) over a ``datasets.Dataset``,
    with ``num_proc`` processes; one row per record, in record order."""
    out = records.map(to_rows, batched=True, with_indices=True, remove_columns=records.column_names,
                      num_proc=num_proc, keep_in_memory=True, load_from_cache_file=False,
                      desc="tokenizing")
    table = out.data.table
    arrays, offsets = {}, None
    for name in FIELDS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        starts = np.asarray(column.offsets, dtype=np.int64)
        offsets = starts - starts[0] if offsets is None else offsets
        arrays[name] = np.asarray(column.flatten(), dtype=np.int32)
    return Examples(offsets, **arrays)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids or templates."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    described = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.all_special_tokens,
                            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                            getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
                           default=str)
    return hashlib.sha256((described + vocab).encode()).hexdigest()[:16]


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(key: dict, build: Callable[[], Examples]) -> Examples:
    """``build()``'s examples, stored once under ``FINETUNE_CACHE/data/<hash of key>``. The
    directory appears atomically (written aside, then renamed), so concurrent runs are safe."""
    digest = _digest(key)
    target = cache_dir() / "data" / digest
    if (target / META_FILE).is_file():
        return Examples.load(target)
    examples = build()
    tmp = target.with_name(f".{digest}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    examples.save(tmp)
    (tmp / META_FILE).write_text(json.dumps({"key": key, "rows": len(examples)}, indent=1, default=str))
    try:
        os.replace(tmp, target)
    except OSError:  # another process cached the same data first
        shutil.rmtree(tmp, ignore_errors=True)
    return examples


def cached_json(key: dict, build: Callable[[], list]) -> list:
    """``build()``'s value (a task's evaluation prompts and answers, say), stored once as JSON in
    ``FINETUNE_CACHE/data/<hash of key>.json`` (written aside, then renamed); an unreadable file is
    built again. A warm run then needs neither the records nor the ``datasets`` library (≈ 80 MiB
    less at the peak of a GSM8K run, measured)."""
    target = cache_dir() / "data" / f"{_digest(key)}.json"
    try:
        return json.loads(target.read_text())
    except (OSError, ValueError):
        pass
    value = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, target)
    return value


def load_examples(source_key, load_records: Callable, tokenizer, settings: dict,
                  to_rows: Callable[[dict, list[int]], dict], num_proc: int | None = None) -> Examples:
    """The tokenized rows of a source, one per record, from the cache when possible.

    ``source_key``: what identifies the source's content (:func:`finetune.data.sources.fingerprint`), or
    None to load the records first and use their ``datasets`` fingerprint (hub datasets);
    ``load_records()``: the records as a ``datasets.Dataset``; ``settings``: every formatting
    choice that changes the rows (with a format version)."""
    records = None
    if source_key is None:
        records = load_records()
        source_key = records._fingerprint
    key = {"source": source_key, "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings}
    return cached(key, lambda: tokenize_records(records if records is not None else load_records(),
                                                to_rows, num_proc))
