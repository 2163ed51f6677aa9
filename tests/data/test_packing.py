"""The length limit and packing (finetune.data.packing) and collation (finetune.data.batching):
packed rows must give every example exactly the logits it gets alone."""

import logging

import numpy as np
import pytest
import torch

from finetune.data.batching import collate, count_loss_tokens
from finetune.data.examples import Examples
from finetune.data.packing import fit_to_length, pack, pack_rows
from finetune.errors import UserError
from finetune.models.loss import causal_lm_loss_sum, model_inputs


def rows(lengths, start=0):
    return [{"input_ids": list(range(start + i, start + i + n)), "labels": [-100] + list(range(1, n))}
            for i, n in enumerate(lengths)]


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
