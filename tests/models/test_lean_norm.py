"""Norm outputs recomputed in the backward (finetune.models.lean_norm): bit-identical outputs and
gradients together with the lean MLP, no norm output alive between forward and backward, each
recomputed once, and only Llama-style RMSNorms in the layer stack switched."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from finetune.adapters import attach
from finetune.models import lean_norm
from finetune.models.gated_mlp import keep_less_for_training
from finetune.models.lean_norm import keep_norm_inputs_only, qualifies
from finetune.models.recipes import is_lean

from bit_identical import assert_bit_identical, batch, with_adapter


@pytest.mark.parametrize("method", ["lora", "mora", "vblora", "full"])
def test_logits_and_gradients_are_bit_identical(tiny_model, method):
    """With the lean MLP too, as in training."""
    plain = with_adapter(tiny_model, method)
    lean = copy.deepcopy(plain)
    keep_less_for_training(lean)
    assert keep_norm_inputs_only(lean) == plain.config.num_hidden_layers
    assert_bit_identical(plain, lean)


def test_norm_outputs_are_not_kept_for_the_backward(tiny_model, monkeypatch):
    """After the forward no output of a layer's norms is alive; the backward recomputes each once,
    however many projections read it."""
    model = tiny_model.train()
    attach(model, "lora", dict(rank=4, alpha=8, dropout=0.0))
    keep_norm_inputs_only(model)
    outputs, recomputed = [], []
    record = lean_norm._Recipes.record
    monkeypatch.setattr(lean_norm._Recipes, "record", lambda self, norm, x, y: outputs.append(weakref.ref(y))
                        or record(self, norm, x, y))
    value = lean_norm._NormOutput.value
    monkeypatch.setattr(lean_norm._NormOutput, "value", lambda self: recomputed.append(self.y is None) or value(self))
    loss = model(input_ids=batch(model), use_cache=False).logits.square().mean()
    gc.collect()
    layers = model.config.num_hidden_layers
    assert len(outputs) == 2 * layers
    assert all(ref() is None for ref in outputs)
    loss.backward()
    assert sum(recomputed) == 2 * layers  # once per norm
    assert len(recomputed) == 5 * layers  # read by q, k, v and by gate, up


def test_in_place_changes_are_caught_or_kept(tiny_model):
    """A norm input changed after the forward cannot give back the output: an error. An output
    changed before a reader saves it is kept as it is."""
    keep_norm_inputs_only(tiny_model)
    norm = tiny_model.model.layers[0].input_layernorm
    h = torch.randn(2, 5, tiny_model.config.hidden_size)
    recipes = lean_norm._Recipes()
    y = norm(h)
    recipes.record(norm, h, y)
    assert not isinstance(recipes.pack(y[0]), torch.Tensor)
    y.add_(1)
    assert isinstance(recipes.pack(y[0]), torch.Tensor)
    recipe = recipes.outputs[y.untyped_storage().data_ptr()]
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        recipe.value()


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
    assert keep_norm_inputs_only(stack) == 0
    name, keys = type(layer).__name__, list(tiny_model.state_dict())
    assert keep_norm_inputs_only(tiny_model) == tiny_model.config.num_hidden_layers
    assert keep_norm_inputs_only(tiny_model) == 0  # once is enough
    assert type(layer).__name__ == name and list(tiny_model.state_dict()) == keys
    assert is_lean(layer) and is_lean(layer.input_layernorm) and is_lean(layer.post_attention_layernorm)
    assert not is_lean(tiny_model.model.norm) and qualifies(tiny_model.model.norm)  # outside the stack: left alone
    tiny_model.eval()
    with torch.no_grad():  # outside training the original computation
        ids = batch(tiny_model)
        assert torch.isfinite(tiny_model(input_ids=ids, use_cache=False).logits).all()
