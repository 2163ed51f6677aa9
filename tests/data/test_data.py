"""The data machinery shared by the tasks: reading local files (and the errors for bad ones),
tokenized examples and their cache, the length limit, and packing — whose rows must give every
example exactly the logits it gets alone."""

import json
import logging

import numpy as np
import pytest
import torch

from finetune.data.batching import collate, count_loss_tokens
from finetune.data.examples import Examples, load_examples
from finetune.data.packing import fit_to_length, pack, pack_rows
from finetune.data.sources import Source, fingerprint, load_records
from finetune.errors import UserError
from finetune.models.loss import causal_lm_loss_sum, model_inputs

pytestmark = pytest.mark.usefixtures("data_cache")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Examples and the cache
# --------------------------------------------------------------------------------------------


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


def test_overflow_policies(caplog):
    ex = Examples.from_rows(rows([3, 9, 4, 12]))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        cut = fit_to_length(ex, 8, "truncate", "task.data.path=x")
    assert list(cut.lengths()) == [3, 8, 4, 8]
    assert "task.data.path=x: 2 of 4 examples are longer than task.max_length=8 tokens and were truncated" in caplog.text
    assert list(fit_to_length(ex, 8, "drop", "x").lengths()) == [3, 4]
    with pytest.raises(UserError, match=r"x: example 1 has 9 tokens, more than task.max_length=8 \(2 of 4"):
        fit_to_length(ex, 8, "error", "x")
    assert fit_to_length(ex, 12, "error", "x") is ex


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def test_pack_rows_is_a_tight_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500)
    groups = pack_rows(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(lengths[g].sum() <= 64 for g in groups)
    assert lengths.sum() / (64 * len(groups)) > 0.95  # best-fit decreasing packs densely
    assert groups == pack_rows(lengths, 64)


def test_packed_rows_restart_positions_and_mask_first_labels():
    ex = Examples.from_rows(rows([3, 5, 2], start=10))
    packed = pack(ex, 8)  # best fit, longest first: [5 + 3], [2]
    assert len(packed) == 2 and list(packed.lengths()) == [8, 2]
    row = packed[0]
    assert row["input_ids"] == ex[1]["input_ids"] + ex[0]["input_ids"]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert row["labels"] == [-100, 1, 2, 3, 4, -100, 1, 2]  # each example's first token: no label


def test_a_packed_row_gives_each_example_its_own_logits(tiny_model):
    """Several examples in one row never attend to each other: the packed logits of each example
    equal its logits alone; the loss and its token count equal the unpacked ones."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in [7, 12, 5, 9, 3]:
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    ex = Examples.from_rows(samples)
    packed = pack(ex, 20)
    assert len(packed) < len(samples)
    batch = collate([packed[i] for i in range(len(packed))], pad_id=258)  # rows of unequal length: padding
    with torch.no_grad():
        logits = tiny_model(**model_inputs(batch), use_cache=False).logits  # a cache disables packing
        alone = [tiny_model(input_ids=torch.tensor([s["input_ids"]])).logits[0] for s in samples]
    seen = 0
    for r in range(len(packed)):
        ids = packed[r]["input_ids"]
        starts = [i for i, p in enumerate(packed[r]["position_ids"]) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            k = next(k for k, s in enumerate(samples) if s["input_ids"] == ids[a:b])
            torch.testing.assert_close(logits[r, a:b], alone[k], atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(samples)
    unpacked = collate(samples, pad_id=258)
    with torch.no_grad():
        for chunk in (0, 4):  # the plain and the chunked loss
            torch.testing.assert_close(causal_lm_loss_sum(tiny_model, batch, chunk),
                                       causal_lm_loss_sum(tiny_model, unpacked, chunk), atol=1e-4, rtol=1e-5)
    assert count_loss_tokens(batch) == count_loss_tokens(unpacked)
