"""The chunked cross-entropy (trainer.loss_chunk) equals the plain one: the same loss and the same
gradients (fp32, tight tolerance) on the tiny model with every method, with padding and ignored
labels, through a DDP wrapper, under autocast, and in the training loop; models whose logits are
not lm_head(hidden) fall back to the plain loss."""

import warnings

import pytest
import torch

from finetune import adapters
from finetune.errors import UserError
from finetune.models.loss import ChunkedLinearCrossEntropy, causal_lm_loss_sum, chunked_loss_sum
from finetune.training.loop import accumulate_gradients

from conftest import OneProcess, tiny_config


def ragged_batch(seed=0, vocab=256):
    """Three rows of different lengths: right padding (label -100, mask 0), a prompt without loss,
    and a row whose loss stops early."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    labels[0, :7] = -100  # prompt tokens: no loss
    ids[1, 15:], labels[1, 15:], mask[1, 15:] = 258, -100, 0  # padding
    labels[2, 20:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def adapted(tiny_model, method):
    settings = {"lora": {"rank": 4, "alpha": 8}, "mora": {"rank": 4}, "vblora": {"rank": 4},
                "full": {}}[method]
    torch.manual_seed(1)
    adapter = adapters.attach(tiny_model, method, settings)
    with torch.no_grad():  # move away from the zero-initialised start so every gradient is non-zero
        for p in adapter.parameters():
            if method != "full":
                p.add_(torch.randn_like(p) * 0.02)
    return adapter


def loss_and_grads(model, params, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss_sum(model, batch, chunk)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-5)
    for x, y in zip(ga, gb):  # fp32 summation order differs: 1e-6 of the gradient's scale
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * max(1.0, y.abs().max().item()))


@pytest.mark.parametrize("method", ["lora", "mora", "vblora", "full"])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tiny_model, method):
    adapted(tiny_model, method)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    assert params
    batch = ragged_batch()
    plain = loss_and_grads(tiny_model, params, batch, 0)
    assert chunked_loss_sum(tiny_model, batch, 5) is not None  # the chunked path is taken
    for chunk in (1, 5, 16, 4096):  # chunks of one token, ragged last chunk, one chunk for all
        assert_same(loss_and_grads(tiny_model, params, batch, chunk), plain)
    if method == "full":  # the tied output projection trains too
        head = tiny_model.get_output_embeddings().weight
        assert head.requires_grad and head.grad is not None and head.grad.abs().sum() > 0


def test_value_without_grad_and_all_ignored(tiny_model):
    adapted(tiny_model, "lora")
    batch = ragged_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss_sum(tiny_model, batch, 4),
                                   causal_lm_loss_sum(tiny_model, batch, 0), rtol=1e-6, atol=1e-5)
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    loss = causal_lm_loss_sum(tiny_model, empty, 4)
    loss.backward()
    assert loss.item() == 0.0


def test_the_function_alone_matches_cross_entropy_with_bias():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ours = ChunkedLinearCrossEntropy.apply(h, w, b, t, 8, False)
    (ours * 3.0).backward()
    got = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.T + b, t, reduction="sum")
    (ref * 3.0).backward()
    torch.testing.assert_close(ours, ref)
    for x, y in zip(got, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(x, y)


def test_through_a_ddp_wrapper(tiny_model, tmp_path):
    """DDP's forward is what runs (the hook captures the decoder's output inside it), so the
    gradients reach the parameters through the wrapper exactly as with the plain loss."""
    import torch.distributed as dist

    adapter = adapted(tiny_model, "lora")
    params = adapter.parameters()
    batch = ragged_batch(seed=5)
    plain = loss_and_grads(tiny_model, params, batch, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model)
        assert chunked_loss_sum(ddp, batch, 7) is not None
        assert_same(loss_and_grads(ddp, params, batch, 7), plain)
    finally:
        dist.destroy_process_group()


def test_under_bf16_autocast_it_stays_close(tiny_model):
    adapter = adapted(tiny_model, "lora")
    params = adapter.parameters()
    batch = ragged_batch(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (la, ga) = loss_and_grads(tiny_model, params, batch, 0)
        (lb, gb) = loss_and_grads(tiny_model, params, batch, 6)
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=0.5)
    for x, y in zip(ga, gb):
        assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.99


def test_models_with_unusual_logits_fall_back_to_the_plain_loss(tiny_model):
    adapted(tiny_model, "lora")
    batch = ragged_batch(seed=4)
    tiny_model.config.final_logit_softcapping = 30.0  # a soft-capped model: not even tried
    assert chunked_loss_sum(tiny_model, batch, 4) is None
    tiny_model.config.final_logit_softcapping = None

    # logits scaled after lm_head (undeclared): caught by the one-time check, then plain
    handle = tiny_model.register_forward_hook(
        lambda module, args, out: out.__setitem__("logits", out["logits"] * 2.0) or out)
    try:
        with pytest.warns(UserWarning, match="not lm_head"):
            assert chunked_loss_sum(tiny_model, batch, 4) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert chunked_loss_sum(tiny_model, batch, 4) is None  # remembered, no second warning
        with torch.no_grad():
            torch.testing.assert_close(causal_lm_loss_sum(tiny_model, batch, 4),
                                       causal_lm_loss_sum(tiny_model, batch, 0))
    finally:
        handle.remove()


def test_accumulate_gradients_with_loss_chunk(tiny_model):
    adapter = adapted(tiny_model, "lora")
    micro = [ragged_batch(seed=s) for s in (7, 8)]
    results = []
    for chunk in (0, 8):
        tiny_model.zero_grad(set_to_none=True)
        loss, tokens = accumulate_gradients(tiny_model, micro, OneProcess(), chunk)
        results.append((loss, tokens, [p.grad.clone() for p in adapter.parameters()]))
    (la, ta, ga), (lb, tb, gb) = results
    assert ta == tb and la == pytest.approx(lb, rel=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_config_key():
    assert tiny_config().trainer.loss_chunk == 128
    assert tiny_config("trainer.loss_chunk=0").trainer.loss_chunk == 0
    with pytest.raises(UserError, match="trainer.loss_chunk=-1: must be >= 0"):
        tiny_config("trainer.loss_chunk=-1")


def test_packed_rows_with_position_ids(tiny_model):
    """Packed rows (finetune.data.packing.pack: position ids restart per example, no padding mask)."""
    adapter = adapted(tiny_model, "lora")
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 256, (2, 20), generator=g)
    positions = torch.tensor([list(range(8)) + list(range(12)), list(range(15)) + list(range(5))])
    labels = ids.clone()
    labels[0, 8] = labels[1, 15] = -100  # the first token of each packed example has no loss
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "position_ids": positions}
    params = adapter.parameters()
    assert_same(loss_and_grads(tiny_model, params, batch, 6), loss_and_grads(tiny_model, params, batch, 0))
