"""Reading a task's records: local files and folders (json, jsonl, parquet, csv, txt, md) and
Hugging Face Hub datasets, all through the ``datasets`` library.

Text files (``.txt``, ``.md``) give one record per file, ``{"text": <the whole file>}``; a folder
gives the records of every supported file under it, in sorted path order. Every mistake a user can
make is one line naming the path (and the line, or the fields): a missing file, an unsupported
file type, an empty dataset, a malformed JSON line, missing fields, a hub dataset that cannot be
reached.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.environment import cache_dir
from finetune.errors import UserError, first_line

KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".md": "text"}
"""File suffix → the ``datasets`` builder that reads it."""


@dataclass(frozen=True)
class Source:
    """A local file or folder, or a hub dataset (``name``: its configuration, ``split``,
    ``revision``); ``limit``: the first N records only; ``key``: the config key, for messages."""

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    limit: int | None = None
    key: str = "task.data.path"

    @property
    def where(self) -> str:
        return f"{self.key}={self.path}"


def is_local(path: str) -> bool:
    """A path that exists, starts like a path, or ends in a data-file suffix is local; anything
    else (``owner/name``) is a hub dataset id."""
    return (Path(path).expanduser().exists() or path.startswith((".", "/", "~"))
            or Path(path).suffix.lower() in KINDS)


def local_files(src: Source) -> list[Path]:
    """The supported files of a local source (hidden files and folders skipped), sorted."""
    p = Path(src.path).expanduser()
    allowed = ", ".join(KINDS)
    if not p.exists():
        raise UserError(f"{src.where}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() not in KINDS:
            raise UserError(f"{src.where}: unsupported file type {p.suffix or '(none)'!r}; allowed: {allowed}")
        return [p.resolve()]
    files = sorted(f.resolve() for f in p.rglob("*")
                   if f.is_file() and f.suffix.lower() in KINDS
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise UserError(f"{src.where}: the folder holds no data files ({allowed})")
    return files


def fingerprint(src: Source) -> list | None:
    """What identifies a local source's content for caching: every file's path, size and
    modification time (plus the record limit). None for hub datasets (their fingerprint is known
    once they are loaded)."""
    if not is_local(src.path):
        return None
    files = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in local_files(src)]
    return [files, src.limit]


def load_records(src: Source, fields: list[str] | None = None, num_proc: int | None = None):
    """The records of ``src`` as a ``datasets.Dataset``. ``fields``: every record must have them
    (an error names the missing ones and lists those present) and only they are kept."""
    if is_local(src.path):
        ds = _load_local(src, fields, num_proc)
    else:
        ds = _load_hub(src, num_proc)
        if fields:
            require_fields(ds.column_names, fields, src.where)
            ds = ds.select_columns(list(fields))
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{src.where}: the dataset is empty (no records)")
    return ds


def require_fields(present, fields, where: str) -> None:
    missing = [f for f in fields if f not in present]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise UserError(f"{where}: the records have no field{plural} {', '.join(map(repr, missing))}; "
                        f"fields present: {', '.join(present) or '(none)'}")


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _load_local(src: Source, fields, num_proc):
    import datasets

    files = [f for f in local_files(src) if f.stat().st_size > 0]  # empty files hold no records
    if not files:
        raise UserError(f"{src.where}: the dataset is empty (no records)")
    for f in files:
        if KINDS[f.suffix.lower()] in ("json", "text", "csv"):
            check_utf8(f, src.key)
    parts = []
    for kind in sorted({KINDS[f.suffix.lower()] for f in files}):
        group = [f for f in files if KINDS[f.suffix.lower()] == kind]
        options = {"sample_by": "document"} if kind == "text" else {}
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(kind, data_files=[str(f) for f in group], split="train",
                                           cache_dir=str(cache_dir() / "datasets"), num_proc=num_proc,
                                           **options)
        except Exception as e:  # datasets wraps every parse error; find the file and line
            raise UserError(_diagnose(src, group, e)) from None
        if fields:
            where = src.where if len(group) == 1 else f"{src.where} ({kind} files)"
            require_fields(ds.column_names, fields, where)
            ds = ds.select_columns(list(fields))
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:
        described = "; ".join(f"{p.column_names}" for p in parts)
        raise UserError(f"{src.where}: the folder mixes files with different fields ({described}); "
                        "keep one kind of record per folder") from None


@contextmanager
def _quiet_datasets():
    """No 'Generating train split' bars for local files (they take a moment; the hub shows bars)."""
    import os

    import datasets

    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") or datasets.are_progress_bars_disabled():
        yield  # off already (finetune.progress, --quiet)
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _diagnose(src: Source, files: list[Path], error: Exception) -> str:
    """The one-line message for a local file that ``datasets`` could not read."""
    for f in files:
        if KINDS[f.suffix.lower()] == "json":
            bad = malformed_json(f)
            if bad is not None:
                line, why = bad
                return f"{src.key}: {f}:{line}: malformed JSON ({why})"
        if KINDS[f.suffix.lower()] in ("json", "text", "csv"):
            try:
                f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                return f"{src.key}: {f}: not UTF-8 text (byte {e.start})"
    kinds = {f: json_fields(f) for f in files if KINDS[f.suffix.lower()] == "json"}
    if len(set(kinds.values())) > 1:
        described = "; ".join(f"{f.name}: {', '.join(fields)}" for f, fields in list(kinds.items())[:3])
        return (f"{src.where}: the folder mixes files with different fields ({described}); keep one kind "
                "of record per folder")
    text = str(error.__cause__ or error).strip() or type(error).__name__
    where = files[0] if len(files) == 1 else src.path
    return f"{src.key}: {where}: cannot read the records ({text.splitlines()[0]})"


def check_utf8(path: Path, key: str, chunk: int = 1 << 20) -> None:
    """Text data must be UTF-8 (the reader would otherwise fail later, or keep broken strings): a
    one-line error with the line and byte of the first invalid sequence."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                bad = e.start if e.start < len(data) else len(data)
                line = lines + data[:bad].count(b"\n")
                raise UserError(f"{key}: {path}:{line}: not UTF-8 text (byte {offset + bad}: "
                                f"{data[bad:bad + 4]!r}); save the file as UTF-8") from None
            if not data:
                return
            offset, lines = offset + len(data), lines + data.count(b"\n")


def json_fields(path: Path) -> tuple[str, ...]:
    """The sorted field names of the first record of a (well-formed) JSON or JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        record = doc[0] if isinstance(doc, list) and doc else doc
    except json.JSONDecodeError:
        line = next((line for line in text.splitlines() if line.strip()), "{}")
        record = json.loads(line)
    return tuple(sorted(record)) if isinstance(record, dict) else ()


def malformed_json(path: Path) -> tuple[int, str] | None:
    """(line number, reason) of the first malformed record of a JSON or JSON-lines file, or None.
    A ``.json`` file may hold one JSON document (a list of records) or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                return e.lineno, e.msg
        else:
            ok = isinstance(doc, dict) or (isinstance(doc, list) and all(isinstance(r, dict) for r in doc))
            return None if ok else (1, "expected a list of JSON objects")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return number, f"{e.msg} at column {e.colno}"
        if not isinstance(record, dict):
            return number, f"expected a JSON object, got {type(record).__name__}"
    return None


# --------------------------------------------------------------------------------------------
# Hub datasets
# --------------------------------------------------------------------------------------------


def _load_hub(src: Source, num_proc):
    import datasets

    try:
        return datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                     num_proc=num_proc)
    except (ValueError, KeyError) as e:  # an unknown split or configuration
        raise UserError(f"{src.where}: {first_line(e)} (choose with task.data.name / task.data.split, "
                        "or task.eval_split)") from None
    except Exception as e:
        if type(e).__name__ == "DatasetNotFoundError" and "offline" not in str(e).lower():
            raise UserError(f"{src.where}: no such dataset on the Hugging Face Hub (or it is private or "
                            "gated); check the id, or point it at a local json/jsonl/parquet file") from None
        raise UserError(f"{src.where}: cannot reach the Hugging Face Hub dataset ({first_line(e)}); "
                        f"without network, download the data and point {src.key} at a local "
                        "json/jsonl/parquet file") from None

