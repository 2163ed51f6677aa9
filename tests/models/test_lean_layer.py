"""Norm and attention outputs recomputed in the backward (finetune.models.lean_layer): bit-identical
outputs and gradients together with the lean MLP and per-example attention, no such output alive
between forward and backward, each recomputed once, and only Llama-style RMSNorms in the layer
stack switched."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from finetune.adapters import attach
from finetune.models import attention, lean_layer
from finetune.models.attention import use_for_training
from finetune.models.gated_mlp import keep_less_for_training
from finetune.models.lean_layer import keep_less_in_layers, qualifies
from finetune.models.recipes import is_lean
from finetune.training.loop import recompute_layers

from bit_identical import assert_bit_identical, batch, packed_positions, with_adapter


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("method", ["lora", "mora", "vblora", "full"])
def test_logits_and_gradients_are_bit_identical(tiny_model, method, packed):
    """With the lean MLP too, as in training; packed rows attend one example at a time."""
    if packed:
        assert use_for_training(tiny_model)
    plain = with_adapter(tiny_model, method)
    lean = copy.deepcopy(plain)
    keep_less_for_training(lean)
    assert keep_less_in_layers(lean) == plain.config.num_hidden_layers
    assert_bit_identical(plain, lean, packed=packed)


def test_every_nth_layer_recomputed_and_the_others_lean(tiny_model):
    """trainer.checkpoint_every_n_layers=2 on the 2-layer model: the first layer is recomputed whole
    by checkpointing (its forward runs twice, nothing lean inside), the second keeps less; both
    bit-identical to the plain model."""
    use_for_training(tiny_model)
    plain = with_adapter(tiny_model, "lora")
    mixed = copy.deepcopy(plain)
    recompute_layers(mixed, every_n_layers=2)
    assert keep_less_for_training(mixed) == 1 and keep_less_in_layers(mixed) == 1
    first, second = mixed.model.layers
    assert first.gradient_checkpointing and not second.gradient_checkpointing
    assert not is_lean(first) and not is_lean(first.mlp) and is_lean(second) and is_lean(second.mlp)
    calls = [0, 0]  # (module hooks do not run in checkpointing's recomputation: count the forwards)
    for i, mlp in enumerate((first.mlp, second.mlp)):
        mlp.forward = lambda x, i=i, forward=mlp.forward: calls.__setitem__(i, calls[i] + 1) or forward(x)
    embedded = []  # non-reentrant: no gradient asked for the embeddings' output, as without checkpointing
    mixed.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(out.requires_grad))
    assert_bit_identical(plain, mixed, packed=True)
    assert calls == [2, 1]  # the forward, and the first layer's recomputation in the backward
    assert embedded and not any(embedded)


def test_norm_and_attention_outputs_are_not_kept_for_the_backward(tiny_model, monkeypatch):
    """After the forward of packed rows no output of a layer's norms nor of its attention is alive;
    the backward recomputes each once, however many projections read it."""
    model = tiny_model.train()
    use_for_training(model)
    attach(model, "lora", dict(rank=4, alpha=8, dropout=0.0))
    keep_less_in_layers(model)
    outputs, recomputed = [], []
    record = lean_layer._Recipes.record
    monkeypatch.setattr(lean_layer._Recipes, "record", lambda self, recipe, y: outputs.append(weakref.ref(y))
                        or record(self, recipe, y))
    for cls in (lean_layer._NormOutput, attention._Output):
        monkeypatch.setattr(cls, "value", lambda self, value=cls.value: recomputed.append(self.y is None)
                            or value(self))
    ids = batch(model)
    loss = model(input_ids=ids, position_ids=packed_positions(ids), use_cache=False).logits.square().mean()
    gc.collect()
    layers = model.config.num_hidden_layers
    assert len(outputs) == 3 * layers  # two norms, one attention
    assert all(ref() is None for ref in outputs)
    loss.backward()
    assert sum(recomputed) == 3 * layers  # once each
    assert len(recomputed) == 6 * layers  # read by q, k, v, by o_proj and by gate, up


def test_in_place_changes_are_caught_or_kept(tiny_model):
    """A norm input changed after the forward cannot give back the output: an error. An output
    changed before a reader saves it is kept as it is."""
    keep_less_in_layers(tiny_model)
    norm = tiny_model.model.layers[0].input_layernorm
    h = torch.randn(2, 5, tiny_model.config.hidden_size)
    recipes = lean_layer._Recipes()
    y = norm(h)
    recipe = lean_layer._NormOutput(norm, h)
    recipes.record(recipe, y)
    assert not isinstance(recipes.pack(y[0]), torch.Tensor)
    y.add_(1)
    assert isinstance(recipes.pack(y[0]), torch.Tensor)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        recipe.value()


def test_attention_output_is_assembled_again_or_refused():
    """The recipe gives attention's output back as the forward built it; parts changed in place
    since then: an error, not a wrong value."""
    rows = [[torch.randn(2, 3, 4), torch.randn(2, 5, 4)] for _ in range(2)]  # per row: (heads, l, d) parts
    y = attention._Output(rows).compute()
    assert y.shape == (2, 8, 2, 4) and y.is_contiguous()
    assert torch.equal(y[1, 3:, 0], rows[1][1][0])
    assert torch.equal(attention._Output(rows).value(), y)
    changed = attention._Output(rows)
    rows[1][0].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        changed.value()


def test_only_llama_style_rmsnorms_of_the_layer_stack_are_switched(tiny_model):
    class Scaled(nn.Module):  # another norm forward (Gemma-style 1 + w)
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    layer = tiny_model.model.layers[0]
    assert qualifies(layer.input_layernorm) and not qualifies(Scaled())
    stack = nn.ModuleList([nn.Sequential(Scaled(), nn.Linear(4, 4))])
    assert keep_less_in_layers(stack) == 0
    name, keys = type(layer).__name__, list(tiny_model.state_dict())
    assert keep_less_in_layers(tiny_model) == tiny_model.config.num_hidden_layers
    assert keep_less_in_layers(tiny_model) == 0  # once is enough
    assert type(layer).__name__ == name and list(tiny_model.state_dict()) == keys
    assert is_lean(layer) and is_lean(layer.input_layernorm) and is_lean(layer.post_attention_layernorm)
    assert not is_lean(tiny_model.model.norm) and qualifies(tiny_model.model.norm)  # outside the stack: left alone
    tiny_model.eval()
    with torch.no_grad():  # outside training the original computation
        ids = batch(tiny_model)
        assert torch.isfinite(tiny_model(input_ids=ids, use_cache=False).logits).all()
