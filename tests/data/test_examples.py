"""Tokenized rows (finetune.data.examples): the compact row store and its cache."""

import json

import pytest

from finetune.data.examples import Examples, cached_json, load_examples
from finetune.data.sources import Source, fingerprint, load_records

pytestmark = pytest.mark.usefixtures("data_cache")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows(lengths, start=0):
    return [{"input_ids": list(range(start + i, start + i + n)), "labels": [-100] + list(range(1, n))}
            for i, n in enumerate(lengths)]


def test_examples_select_truncate_save_load(tmp_path):
    ex = Examples.from_rows(rows([3, 5, 2]))
    assert len(ex) == 3 and list(ex.lengths()) == [3, 5, 2]
    assert ex[1] == rows([3, 5, 2])[1] and ex[-1] == rows([3, 5, 2])[2]
    assert [ex.select([2, 0])[i] for i in range(2)] == [ex[2], ex[0]]
    cut = ex.truncated(4)
    assert list(cut.lengths()) == [3, 4, 2] and cut[1]["input_ids"] == ex[1]["input_ids"][:4]
    ex.save(tmp_path / "ex")
    back = Examples.load(tmp_path / "ex")
    assert [back[i] for i in range(3)] == [ex[i] for i in range(3)]


def test_tokenized_rows_are_cached_by_source_tokenizer_and_settings(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "world!"}])
    calls = []

    def to_rows(batch, indices):
        calls.append(len(indices))
        ids = byte_tokenizer(batch["text"])["input_ids"]
        return {"input_ids": ids, "labels": ids}

    def load(settings):
        src = Source(str(path))
        return load_examples(fingerprint(src), lambda: load_records(src), byte_tokenizer, settings, to_rows)

    first = load({"v": 1})
    assert calls == [2] and first[1]["input_ids"] == byte_tokenizer("world!")["input_ids"]
    again = load({"v": 1})
    assert calls == [2] and [again[i] for i in range(2)] == [first[i] for i in range(2)]  # from the cache
    load({"v": 2})
    assert calls == [2, 2]  # other settings: tokenized again
    write_jsonl(path, [{"text": "changed"}])
    assert len(load({"v": 1})) == 1 and calls == [2, 2, 1]  # the file changed


def test_json_values_are_cached_and_an_unreadable_file_is_built_again():
    from finetune.environment import cache_dir

    built = []

    def build():
        built.append(1)
        return [["a prompt", "7"]]

    assert cached_json({"k": 1}, build) == [["a prompt", "7"]] and len(built) == 1
    assert cached_json({"k": 1}, build) == [["a prompt", "7"]] and len(built) == 1  # from the file
    assert cached_json({"k": 2}, build) and len(built) == 2  # another key
    for f in (cache_dir() / "data").glob("*.json"):
        f.write_text("{not json")
    assert cached_json({"k": 1}, build) == [["a prompt", "7"]] and len(built) == 3
    assert not list((cache_dir() / "data").glob(".*.tmp*"))  # nothing left half-written
