"""Reading records (finetune.data.sources): every local format, folders, limits, what identifies a
source's content for the cache, and one clear line for every kind of bad input."""

import json
import os

import pytest

from finetune.data.sources import Source, fingerprint, is_local, json_fields, load_records, local_files, malformed_json
from finetune.errors import UserError

pytestmark = pytest.mark.usefixtures("data_cache")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_local_format_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    write_jsonl(tmp_path / "r.jsonl", records)
    (tmp_path / "r.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_text("q,n\na,1\nb,2\n")
    for name in ["r.jsonl", "r.json", "r.parquet", "r.csv"]:
        ds = load_records(Source(str(tmp_path / name)), fields=["q"])
        assert ds.column_names == ["q"] and ds["q"] == ["a", "b"], name
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.md").write_text("# Title\n\nbody\n")
    (docs / "sub" / "a.txt").write_text("first\n\nsecond paragraph\n")
    (docs / ".hidden.txt").write_text("skipped")
    ds = load_records(Source(str(docs)))
    assert sorted(ds["text"]) == ["# Title\n\nbody\n", "first\n\nsecond paragraph\n"]  # one record per file
    assert len(load_records(Source(str(tmp_path / "r.jsonl"), limit=1))) == 1


def test_data_errors_are_one_clear_line(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": \n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "nodata").mkdir()
    cases = [
        (Source(str(tmp_path / "missing.jsonl")), None, "task.data.path=" + str(tmp_path / "missing.jsonl")
         + ": no such file or directory"),
        (Source(str(tmp_path / "bad.jsonl")), None, f"{tmp_path / 'bad.jsonl'}:3: malformed JSON"),
        (Source(str(tmp_path / "empty.jsonl")), None, "the dataset is empty"),
        (Source(str(tmp_path / "nodata")), None, "the folder holds no data files"),
        (Source(str(tmp_path / "data.xlsx")), None, "unsupported file type '.xlsx'; allowed: .json, .jsonl"),
        (Source(str(tmp_path / "ok.jsonl")), ["query", "response"],
         "the records have no fields 'query', 'response'; fields present: question, answer"),
        (Source("someone/no-such-dataset", key="task.eval_path"), None,
         "task.eval_path=someone/no-such-dataset: cannot reach the Hugging Face Hub dataset"),
    ]
    for src, fields, message in cases:
        with pytest.raises(UserError) as e:
            load_records(src, fields)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="point task.eval_path at a local json/jsonl/parquet file"):
        load_records(Source("someone/no-such-dataset", key="task.eval_path"))


def test_local_or_hub():
    assert is_local("./x") and is_local("/abs/path") and is_local("~/data") and is_local("train.jsonl")
    assert not is_local("openai/gsm8k") and not is_local("tatsu-lab/alpaca")


def test_local_files_are_sorted_and_skip_hidden_ones(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ["b/2.jsonl", "a.md", "b/1.txt", ".git/x.txt", "notes.pdf"]:
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in local_files(Source(str(tmp_path)))] == [
        "a.md", "b/1.txt", "b/2.jsonl"]


def test_fingerprint_follows_the_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    first = fingerprint(Source(str(path)))
    assert fingerprint(Source(str(path))) == first
    assert fingerprint(Source(str(path), limit=1)) != first
    write_jsonl(path, [{"text": "ab"}])
    os.utime(path, ns=(1, 1))
    assert fingerprint(Source(str(path))) != first
    assert fingerprint(Source("openai/gsm8k")) is None  # a hub dataset: known once loaded


def test_malformed_json_names_the_line_and_the_reason(tmp_path):
    cases = {
        "lines.jsonl": ('{"a": 1}\n[1, 2]\n', (2, "expected a JSON object, got list")),
        "cut.jsonl": ('{"a": 1}\n{"a": \n', (2, "Expecting value at column 7")),
        "scalars.json": ("[1, 2]", (1, "expected a list of JSON objects")),
        "good.json": ('[{"a": 1}, {"a": 2}]', None),
        "good-lines.json": ('{"a": 1}\n{"a": 2}\n', None),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert malformed_json(tmp_path / name) == expected, name
    assert json_fields(tmp_path / "good.json") == ("a",)


def test_mixed_records_in_one_folder_are_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    write_jsonl(tmp_path / "b.jsonl", [{"messages": []}])
    with pytest.raises(UserError, match="the folder mixes files with different fields"):
        load_records(Source(str(tmp_path)))
