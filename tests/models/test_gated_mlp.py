"""The lean gated MLP (finetune.models.gated_mlp): bit-identical outputs and gradients, the product
silu(g)·u not kept after the forward, and only Llama-style SiLU MLPs switched."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from finetune.adapters import attach
from finetune.models import gated_mlp
from finetune.models.gated_mlp import keep_less_for_training, qualifies
from finetune.models.recipes import is_lean

from bit_identical import assert_bit_identical, batch, with_adapter


@pytest.mark.parametrize("method", ["lora", "mora", "full"])
def test_logits_and_gradients_are_bit_identical(tiny_model, method):
    plain = with_adapter(tiny_model, method)
    lean = copy.deepcopy(plain)
    assert keep_less_for_training(lean) == plain.config.num_hidden_layers
    assert_bit_identical(plain, lean)


def test_the_product_is_not_kept_for_the_backward(tiny_model, monkeypatch):
    """After the forward, while the graph waits for its backward, no product silu(g)·u is alive:
    down_proj's backward gets it recomputed (and the gradients above are exact)."""
    model = tiny_model.train()
    attach(model, "lora", dict(rank=4, alpha=8, dropout=0.0))
    keep_less_for_training(model)
    products, recomputed = [], []
    apply = gated_mlp._SiluProduct.apply
    monkeypatch.setattr(gated_mlp._SiluProduct, "apply", lambda g, u: products.append(weakref.ref(out := apply(g, u))) or out)
    unpack = gated_mlp._Recipe.unpack
    monkeypatch.setattr(gated_mlp._Recipe, "unpack", staticmethod(lambda p: recomputed.append(p) or unpack(p)))
    loss = model(input_ids=batch(model), use_cache=False).logits.square().mean()
    gc.collect()
    assert len(products) == model.config.num_hidden_layers
    assert all(ref() is None for ref in products)
    loss.backward()
    assert sum(not isinstance(p, torch.Tensor) for p in recomputed) == model.config.num_hidden_layers


def test_only_llama_style_silu_mlps_are_switched(tiny_model):
    from transformers.activations import ACT2FN

    class Fused(nn.Module):  # Phi-3 style: one gate_up projection, another forward
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.act_fn = nn.Linear(4, 8), nn.Linear(4, 4), nn.SiLU()

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(self.act_fn(gate) * up)

    mlp = tiny_model.model.layers[0].mlp
    assert qualifies(mlp)
    gelu = copy.deepcopy(mlp)
    gelu.act_fn = ACT2FN["gelu_pytorch_tanh"]  # Gemma's: same forward, another activation
    assert not qualifies(gelu) and not qualifies(Fused())
    assert keep_less_for_training(gelu) == 0
    name, keys = type(mlp).__name__, list(tiny_model.state_dict())
    assert keep_less_for_training(tiny_model) == tiny_model.config.num_hidden_layers
    assert keep_less_for_training(tiny_model) == 0  # once is enough
    assert is_lean(mlp) and type(mlp).__name__ == name
    assert list(tiny_model.state_dict()) == keys
    tiny_model.eval()
    with torch.no_grad():  # outside training the original computation
        x = torch.randn(2, 3, tiny_model.config.hidden_size)
        assert torch.equal(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)))
