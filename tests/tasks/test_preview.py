"""`finetune data`: the training rows with their loss mask, counted as the loss counts them."""

import numpy as np
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.batching import collate, count_loss_tokens
from finetune.data.examples import IGNORE, Examples
from finetune.data.packing import pack
from finetune.tasks.preview import render_row, spans, summary

from conftest import tiny_config

ROWS = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4]},
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [IGNORE, 9]}]


def test_summary_counts_loss_tokens_as_the_loss_does():
    s = summary(ROWS)
    batch = collate(ROWS, pad_id=0)
    assert s["loss_tokens"] == count_loss_tokens(batch) == 5
    assert (s["rows"], s["examples"], s["tokens"]) == (3, 3, 9)
    assert (s["length_min"], s["length_median"], s["length_max"]) == (2, 3.0, 4)


def test_packed_rows_show_example_boundaries_and_the_same_loss():
    packed = pack(Examples.from_rows(ROWS), capacity=16)
    assert len(packed) == 1
    s = summary(packed)
    assert (s["rows"], s["examples"], s["tokens"]) == (1, 3, 9)
    assert s["loss_tokens"] == count_loss_tokens(collate([packed[0]], pad_id=0))
    kinds = [k for k, _ in spans(packed[0])]
    assert kinds.count("example") == 2
    ids = [t for k, run in spans(packed[0]) if k != "example" for t in run]
    assert ids == packed[0]["input_ids"]
    loss = [t for k, run in spans(packed[0]) if k == "+" for t in run]
    row = packed[0]
    assert loss == [t for i, (t, l) in enumerate(zip(row["input_ids"], row["labels"])) if l != IGNORE and i > 0]


def test_render_row_marks_context_and_loss(byte_tokenizer):
    ids = byte_tokenizer("key:value")["input_ids"]
    cut = len(byte_tokenizer("key:")["input_ids"])
    row = {"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:]}
    lines = render_row(byte_tokenizer, row, 0).splitlines()
    assert lines[0] == f"row 0: {len(ids)} tokens, {len(ids) - cut} with loss, 1 example"
    assert lines[1].startswith("  - ") and lines[1].endswith("key:'")
    assert lines[2] == "  + 'value'"


def test_cli_previews_the_rows_training_uses():
    from finetune.models.tokenizer import load_tokenizer
    from finetune.tasks import build_task

    cfg = tiny_config("task.num_pairs=3")
    examples = build_task(cfg.task, load_tokenizer(cfg.model)).train_examples()
    result = CliRunner().invoke(app, ["data", "model=tiny", "method=lora", "task=memorize", "task.num_pairs=3",
                                      "--rows", "1"])
    assert result.exit_code == 0, result.output
    loss = count_loss_tokens(collate(examples, pad_id=0))
    tokens = int(np.sum([len(e["input_ids"]) for e in examples]))
    assert result.output.startswith(f"task memorize: 3 training rows (3 examples), {tokens} tokens, {loss} with loss")
    assert f"\nrow 0: {len(examples[0]['input_ids'])} tokens" in result.output and "\nrow 1:" not in result.output
    bad = CliRunner().invoke(app, ["data", "model=tiny", "--rows", "-1"])
    assert bad.exit_code == 2 and bad.output.strip() == "finetune: error: --rows -1: must be 0 or more"
