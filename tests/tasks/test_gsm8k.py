"""GSM8K: answer extraction on tricky outputs, the prompt layout and label mask, the held-out
split, the score, and a few training steps on the tiny model followed by `finetune eval`."""

import json
from fractions import Fraction

import pytest

from finetune.data.formatting import alpaca_prompt
from finetune.errors import UserError
from finetune.tasks import build_task
from finetune.tasks.gsm8k import extract_answer, gold_answer, same_answer, score, split_query, to_number

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("data_cache")

EXTRACTION = [
    ("so 3 + 4 = 7.\nThe answer is: 7", "7"),
    ("The answer is: 1,234", "1234"),
    ("The answer is: $1,234.50.", "1234.50"),
    ("The answer is: -12", "-12"),
    ("The answer is: \u221212", "-12"),  # a Unicode minus
    ("The answer is 18 apples in total!", "18 apples in total"),
    ("The answer is: 25%", "25"),
    ("The answer is: \\frac{3}{4}", "3/4"),
    ("The answer is:\n42\nThe end", "42"),  # the answer on the next line
    ("The answer is 5. No wait. The answer is 6.", "6"),  # the last occurrence
    ("The final answer is: 9", "9"),
    ("#### 72", "72"),
    ("We get 8 + 2 = 10 apples.", None),  # no delimiter: unanswered
]


@pytest.mark.parametrize("output,expected", EXTRACTION)
def test_answer_extraction(output, expected):
    assert extract_answer(output) == expected


def test_numbers_compare_exactly():
    assert to_number("18 apples") == 18 and to_number("3/4") == Fraction(3, 4)
    assert to_number("-0.5") == Fraction(-1, 2) and to_number(".5") == Fraction(1, 2)
    assert to_number("no number") is None
    assert same_answer("18.00", "18") and same_answer("1234.50", "1234.5") and same_answer("3/4", "0.75")
    assert same_answer("18 apples in total", "18") and not same_answer("17", "18")
    assert not same_answer(None, "18") and not same_answer("-12", "12")
    assert gold_answer("so x\n#### 1,000", "w") == "1000"
    with pytest.raises(UserError, match="no final '#### <number>' line"):
        gold_answer("42", "w")


def test_score_counts_unanswered_as_wrong():
    result = score(["The answer is: 5", "It is 7", "#### 1,000", "The answer is 4"], ["5", "7", "1000", "5"])
    assert result == {"accuracy": 0.5, "correct": 2, "n": 4, "unanswered": 1, "accuracy_lenient": 0.75}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def gsm8k_records(n):
    return [{"question": f"Tom has {i} apples and gets 2 more. How many?",
             "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(n)]


def test_prompt_layout_and_answer_only_loss(tmp_path, byte_tokenizer):
    path = write(tmp_path / "train.jsonl", gsm8k_records(6))
    task = build_task(tiny_config("task=gsm8k", f"task.data.path={path}", "task.eval_holdout=2").task, byte_tokenizer)
    examples = task.train_examples()
    assert len(examples) == 4  # the last 2 records are held out
    row = examples[0]
    prompt = alpaca_prompt("Tom has 0 apples and gets 2 more. How many?")
    assert prompt.endswith("### Instruction:\nTom has 0 apples and gets 2 more. How many?\n\n### Response:\n")
    n_prompt = row["labels"].count(-100)
    assert byte_tokenizer.decode(row["input_ids"][:n_prompt], skip_special_tokens=True) == prompt
    assert row["labels"][:n_prompt] == [-100] * n_prompt  # loss on the answer only
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    target = byte_tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=True)
    assert target == "He has 0 + 2 = 2 apples.\n#### 2"  # calculator annotations removed
    assert row["input_ids"][-1] == byte_tokenizer.eos_token_id
    assert [gold for _, gold in task.eval_items()] == ["6", "7"]
    with pytest.raises(UserError, match="task.eval_holdout=6 would hold out all 6 examples"):
        build_task(tiny_config("task=gsm8k", f"task.data.path={path}", "task.eval_holdout=6").task,
                   byte_tokenizer).train_examples()


def test_a_cold_run_reads_the_records_once_and_a_warm_run_not_at_all(tmp_path, byte_tokenizer, monkeypatch):
    """Training rows and held-out problems are built from one reading of the records, then both
    come from the cache; a changed file or another held-out count builds them again."""
    import finetune.tasks.gsm8k as gsm8k

    path = write(tmp_path / "train.jsonl", gsm8k_records(6))

    def task(holdout=2):
        return build_task(tiny_config("task=gsm8k", f"task.data.path={path}", f"task.eval_holdout={holdout}").task,
                          byte_tokenizer)

    loaded = []
    real = gsm8k.load_records
    monkeypatch.setattr(gsm8k, "load_records", lambda *a, **k: loaded.append(1) or real(*a, **k))
    cold = task()
    rows, items = cold.train_examples(), cold.eval_items()
    assert [gold for _, gold in items] == ["6", "7"]
    assert len(loaded) == 1  # one reading for both
    loaded.clear()
    warm = task()
    assert [warm.train_examples()[i] for i in range(len(rows))] == [rows[i] for i in range(len(rows))]
    assert warm.eval_items() == items and isinstance(items[0], tuple) and isinstance(warm.eval_items()[0], tuple)
    assert loaded == []  # nothing read through datasets
    assert [gold for _, gold in task(holdout=1).eval_items()] == ["7"] and len(loaded) == 1
    write(tmp_path / "train.jsonl", gsm8k_records(5))
    assert [gold for _, gold in task().eval_items()] == ["5", "6"] and len(loaded) == 2


def test_metamath_records(tmp_path, byte_tokenizer):
    assert split_query("Compute 2+2.\nShow the steps.") == ("Compute 2+2.", "Show the steps.")
    records = [{"query": f"What is {i}+1?", "response": f"{i}+1={i + 1}. The answer is: {i + 1}", "type": "GSM_x"}
               for i in range(4)]
    path = write(tmp_path / "mm.jsonl", records)
    task = build_task(tiny_config("task=gsm8k", "task.source=metamath", f"task.data.path={path}",
                                  "task.eval_holdout=1").task, byte_tokenizer)
    row = task.train_examples()[0]
    n_prompt = row["labels"].count(-100)
    assert byte_tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=True) == "0+1=1. The answer is: 1"
    assert task.eval_items() == [(alpaca_prompt("What is 3+1?"), "4")]
    bad = write(tmp_path / "wrong.jsonl", gsm8k_records(3))
    with pytest.raises(UserError, match="no fields 'query', 'response'; fields present: question, answer"):
        build_task(tiny_config("task=gsm8k", "task.source=metamath", f"task.data.path={bad}").task,
                   byte_tokenizer).train_examples()


def test_train_then_eval_reports_accuracy(tmp_path):
    from finetune.config.compose import compose
    from finetune.inference.evaluate import evaluate_path
    from finetune.training.loop import train

    train_path = write(tmp_path / "train.jsonl", gsm8k_records(8))
    test_path = write(tmp_path / "test.jsonl", gsm8k_records(3))
    out = tmp_path / "run"
    overrides = ["model=tiny", "method=lora", "task=gsm8k", f"task.data.path={train_path}",
                 f"task.eval_path={test_path}", "task.max_new_tokens=4", "task.packing=true",
                 "task.max_length=256", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.merge=false",
                 f"output_dir={out}", "logger=none"]
    result = train(compose(overrides), overrides, quiet=True)
    assert result["metric"] == "accuracy" and result["metrics"]["n"] == 3
    evaluated = evaluate_path(out, ["task.eval_limit=2"])
    m = evaluated["metrics"]
    assert evaluated["metric"] == "accuracy" and m["n"] == 2 and 0 <= m["accuracy"] <= 1
    assert set(m) == {"accuracy", "correct", "n", "unanswered", "accuracy_lenient"}
