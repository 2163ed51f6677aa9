"""Per-example attention for packed rows (finetune.models.attention): the same logits and gradients
as transformers' own sdpa with its block-diagonal mask, each example as if alone, and transformers'
path unchanged wherever a row is not cut (evaluation, left padding, a KV cache)."""

import json

import torch

from finetune.models import attention
from finetune.models.attention import PACKED, segments, use_for_training


def packed_row(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return ids, torch.cat(ids)[None], positions[None]


def test_segments_cut_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segments(pos) == [[3, 2, 4], [9]]
    assert segments(torch.arange(6)[None].repeat(2, 1)) is None  # nothing packed: transformers' path


def test_packed_logits_and_gradients_equal_transformers_sdpa(tiny_model):
    import copy

    ours = copy.deepcopy(tiny_model).train()
    assert use_for_training(ours) and ours.config._attn_implementation == PACKED
    theirs = tiny_model.train()  # sdpa with the block-diagonal mask from the position restarts
    lengths = [7, 12, 5, 8]
    ids, row, pos = packed_row(tiny_model.config.vocab_size, lengths)
    out_ours = ours(input_ids=row, position_ids=pos, use_cache=False).logits
    assert attention._Segments.value == [lengths]  # the row was cut, not passed on
    out_theirs = theirs(input_ids=row, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    # each example's logits are those it gets alone
    start = 0
    with torch.no_grad():
        for x in ids:
            alone = theirs(input_ids=x[None], use_cache=False).logits
            torch.testing.assert_close(out_ours[:, start:start + len(x)], alone, rtol=1e-5, atol=1e-5)
            start += len(x)
    g = torch.randn_like(out_ours)
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_and_left_padding_take_transformers_path(tiny_model):
    """Out of training mode nothing is cut: a left-padded batch (irregular position ids) with its
    mask, and generation with a KV cache, give exactly transformers' results."""
    import copy

    ours = copy.deepcopy(tiny_model)
    use_for_training(ours)
    ours.eval()
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = tiny_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        gen_a = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        gen_b = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_a, gen_b)


def test_not_saved_with_the_model(tiny_model, tmp_path):
    use_for_training(tiny_model)
    tiny_model.save_pretrained(tmp_path)
    assert PACKED not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_other_implementations_are_left_alone(tiny_model):
    tiny_model.set_attn_implementation("eager")
    assert not use_for_training(tiny_model) and tiny_model.config._attn_implementation == "eager"


def test_gradient_checkpointing_recomputes_the_same_cut(tiny_model):
    """Checkpointed layers call attention again in the backward: same segments, same gradients."""
    import copy

    from finetune.training.loop import recompute_layers

    plain = copy.deepcopy(tiny_model).train()
    checkpointed = copy.deepcopy(tiny_model).train()
    for m in (plain, checkpointed):
        use_for_training(m)
    recompute_layers(checkpointed)
    _, row, pos = packed_row(tiny_model.config.vocab_size, [9, 4, 11])
    for m in (plain, checkpointed):
        m(input_ids=row, position_ids=pos, labels=row, use_cache=False).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_sliding_window_shorter_than_an_example_takes_transformers_path():
    """Mistral-style sliding windows: examples within the window are cut as usual; an example longer
    than the window is left to transformers' mask, so the result is transformers' either way."""
    import copy

    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                           attn_implementation="sdpa")
    theirs = MistralForCausalLM(config).train()
    ours = copy.deepcopy(theirs)
    assert use_for_training(ours)
    for lengths in ([5, 6, 3], [5, 9, 3]):
        _, row, pos = packed_row(64, lengths, seed=2)
        torch.testing.assert_close(ours(input_ids=row, position_ids=pos, use_cache=False).logits,
                                   theirs(input_ids=row, position_ids=pos, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
