"""Continual pretraining: documents + EOS cut into blocks (with document masking when packed), the
corpora it reads (text files, records, the built-in Python docs), perplexity on a known
distribution, and a few training steps followed by `finetune eval`."""

import json
import math

import pytest
import torch

from finetune.data.examples import Examples
from finetune.tasks import build_task
from finetune.tasks.cpt import blocks
from finetune.tasks.perplexity import perplexity

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("data_cache")


def test_documents_are_concatenated_and_cut_into_blocks():
    docs = Examples.from_rows([{"input_ids": [1, 2, 3, 9], "labels": [1, 2, 3, 9]},
                               {"input_ids": [4, 5, 9], "labels": [4, 5, 9]},
                               {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}])
    plain = blocks(docs, 4, packing=False)
    assert [plain[i]["input_ids"] for i in range(len(plain))] == [[1, 2, 3, 9], [4, 5, 9, 6], [7, 8, 9]]
    assert all(plain[i]["labels"] == plain[i]["input_ids"] for i in range(3))  # loss on every token
    packed = blocks(docs, 4, packing=True)
    assert packed[1]["position_ids"] == [0, 1, 2, 0]  # a new document restarts the positions
    assert packed[1]["labels"] == [-100, 5, 9, -100]  # a document's first token is not predicted
    assert packed[2]["position_ids"] == [0, 1, 2]  # so does a new block
    ragged = Examples.from_rows([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}])
    assert list(blocks(ragged, 4, packing=False).lengths()) == [4]  # a lone last token teaches nothing


def test_corpora(tmp_path, byte_tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha text")
    (folder / "b.md").write_text("# beta\n")
    (folder / "c.txt").write_text("   \n")  # blank: no document
    task = build_task(tiny_config("task=cpt", f"task.data.path={folder}", "task.max_length=8",
                                  "task.eval_holdout=1").task, byte_tokenizer)
    docs = task.documents(task.source)
    texts = sorted(byte_tokenizer.decode(docs[i]["input_ids"]) for i in range(len(docs)))
    assert texts == ["<s># beta\n</s>", "<s>alpha text</s>"]
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(3)))
    task = build_task(tiny_config("task=cpt", f"task.data.path={records}", "task.text_field=body").task,
                      byte_tokenizer)
    assert byte_tokenizer.decode(task.documents(task.source)[2]["input_ids"]) == "<s>doc 2</s>"
    builtin = build_task(tiny_config("task=cpt", "task.data.limit=2", "task.eval_holdout=2").task, byte_tokenizer)
    train = builtin.train_examples()
    assert len(train) > 2 and max(train.lengths()) == 512
    assert "assert" in byte_tokenizer.decode(train[0]["input_ids"])  # pydoc topics, sorted: assert, ...
    assert len(builtin.eval_examples()) == 2


class FixedDistribution(torch.nn.Module):
    """A 'model' whose next-token distribution is always ``probs``, whatever the input."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.log(torch.tensor(probs, dtype=torch.float64)).float())

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


def test_perplexity_of_a_known_distribution():
    """Tokens whose frequencies are exactly p, scored by a model that predicts p: the perplexity
    is exp(H(p)); a uniform model over V tokens scores exactly V."""
    probs = [0.5, 0.25, 0.125, 0.125]
    targets = [0] * 8 + [1] * 4 + [2] * 2 + [3] * 2  # frequencies exactly p
    rows = []
    for start in range(0, 16, 4):  # 4 rows of 1 context token + 4 targets, plus unscored prompt/padding
        ids = [0] + targets[start:start + 4]
        rows.append({"input_ids": [3, 3] + ids, "labels": [-100, -100, -100] + ids[1:]})
    rows[0]["input_ids"] += [1]
    rows[0]["labels"] += [-100]
    entropy = -sum(p * math.log(p) for p in probs)
    result = perplexity(FixedDistribution(probs), rows, pad_id=0, device="cpu", batch_size=3)
    assert result["tokens"] == 16 and result["n"] == 4
    assert math.isclose(result["perplexity"], math.exp(entropy), rel_tol=1e-6)
    uniform = perplexity(FixedDistribution([0.25] * 4), rows, pad_id=0, device="cpu", batch_size=2)
    assert math.isclose(uniform["perplexity"], 4.0, rel_tol=1e-6)


def test_train_then_eval_reports_perplexity(tmp_path):
    from finetune.config.compose import compose
    from finetune.inference.evaluate import evaluate_path
    from finetune.training.loop import train

    corpus = tmp_path / "notes.txt"
    corpus.write_text("the cat sat on the mat. " * 40)
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "the cat sat on the mat. " * 4}) + "\n")
    out = tmp_path / "run"
    overrides = ["model=tiny", "method=mora", "task=cpt", f"task.data.path={corpus}", f"task.eval_path={held}",
                 "task.max_length=64", "task.packing=true", "trainer.max_steps=3", "trainer.batch_size=2",
                 "trainer.lr=1e-2", "trainer.merge=false", f"output_dir={out}", "logger=none"]
    result = train(compose(overrides), overrides, quiet=True)
    m = result["metrics"]
    assert result["metric"] == "perplexity" and m["n"] == 2 and 1 < m["perplexity"] < 259
    evaluated = evaluate_path(out, ["task.eval_limit=1"])
    assert evaluated["metrics"]["n"] == 1 and math.isfinite(evaluated["metrics"]["perplexity"])
