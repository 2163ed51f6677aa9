"""The memorization task: seeded UUID4 pairs, training text, prompts that are prefixes of the
training tokens, and the character-accuracy metric."""

import re

from finetune.tasks import build_task
from finetune.tasks.memorize import char_accuracy, make_pairs

from conftest import tiny_config

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_pairs_are_seeded_uuid4():
    pairs = make_pairs(50, seed=3)
    assert pairs == make_pairs(50, seed=3) and pairs != make_pairs(50, seed=4)
    assert len({k for k, _ in pairs}) == 50
    assert all(UUID4.match(k) and UUID4.match(v) for k, v in pairs)


def test_char_accuracy():
    truth = "0123abcd-0000-4000-8000-000000000000"
    assert char_accuracy(truth, truth) == 1.0
    assert char_accuracy("", truth) == 0.0
    assert char_accuracy(truth[:18], truth) == 16 / 32  # 16 hex digits in the first 18 characters
    wrong_first = "f" + truth[1:]
    assert char_accuracy(wrong_first, truth) == 31 / 32
    assert char_accuracy(wrong_first, truth, hex_only=False) == 35 / 36


def test_examples_and_prompts(byte_tokenizer):
    task = build_task(tiny_config("task.num_pairs=4").task, byte_tokenizer)
    examples = task.train_examples()
    key, value = task.pairs[0]
    assert byte_tokenizer.decode(examples[0]["input_ids"], skip_special_tokens=True) == f"{key}:{value}"
    assert examples[0]["labels"] == examples[0]["input_ids"]  # loss on all tokens
    assert examples[0]["input_ids"][-1] != byte_tokenizer.eos_token_id  # no EOS
    for (ids, covered), ex, (k, _) in zip(task.prompts(), examples, task.pairs):
        assert ex["input_ids"][:len(ids)] == ids and covered == f"{k}:"


def test_a_model_that_knows_the_values_scores_one(byte_tokenizer):
    """Evaluation decodes greedily; a stand-in model that always emits the right next token of
    the training text must get accuracy 1."""
    import torch

    task = build_task(tiny_config("task.num_pairs=3").task, byte_tokenizer)
    texts = {tuple(e["input_ids"][:38]): e["input_ids"] for e in task.train_examples()}

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            rows = []
            for ids, mask in zip(input_ids, attention_mask):
                prompt = tuple(ids[mask.bool()].tolist())
                full = texts[prompt]
                rows.append(ids.tolist() + full[len(prompt):][:max_new_tokens])
            width = max(map(len, rows))
            return torch.tensor([r + [258] * (width - len(r)) for r in rows])

    metrics = task.evaluate(Oracle(), "cpu")
    assert metrics == {"char_acc": 1.0, "char_acc_36": 1.0, "exact_match": 1.0, "n": 3}


def test_the_before_after_table_marks_every_wrong_character(byte_tokenizer):
    task = build_task(tiny_config("task.num_pairs=2").task, byte_tokenizer)
    (k1, v1), (k2, v2) = task.pairs
    wrong = ("0" if v2[0] != "0" else "1") + v2[1:5] + "\nzz" + v2[8:]  # 1st, 6th-8th characters wrong
    table = task.before_after([(k1, v1, "nonsense"), (k2, v2, "")], [(k1, v1, v1), (k2, v2, wrong)])
    lines = table.splitlines()
    assert lines[0].split() == ["key", "true", "value", "base", "model", "trained", "model"]
    row, marks = lines[1], lines[2]
    assert row.startswith(k1[:8] + "…") and v1 in row and row.endswith("exact")
    assert marks.strip().startswith("^" * 36)  # "nonsense" then padding: every character differs
    row2, marks2 = lines[3], lines[4]
    assert row2.endswith("4 wrong") and "⏎zz" in row2  # a newline is shown, not printed
    trained_marks = marks2[10 + 2 * 38:]
    assert trained_marks == "^    ^^^"
