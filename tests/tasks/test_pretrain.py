"""Pretraining: ReLoRA's merge-and-restart, base modules trained in full, and runs whose base
weights change during training (ReMoRA / ReLoRA merges, trained embeddings and norms): the saved
run (RUN_DIR/base + adapter) must reproduce the trained model, and its merge must equal it."""

import json
import math

import pytest
import torch

from finetune import adapters
from finetune.adapters.base import unfreeze_modules
from finetune.errors import UserError
from finetune.training.schedule import apply_restart, make_scheduler

pytestmark = pytest.mark.usefixtures("data_cache")


def test_relora_merges_reinitialises_and_restarts(tiny_model):
    torch.manual_seed(0)
    adapter = adapters.attach(tiny_model, "lora", {"rank": 4, "relora_every": 2, "relora_warmup": 3})
    embed = tiny_model.get_input_embeddings().weight
    embed.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": adapter.parameters()}, {"params": [embed]}], lr=1e-2)
    scheduler = make_scheduler(optimizer, "linear", 0, 10)
    ids = torch.randint(0, 256, (2, 12))
    for step in (1, 2):
        tiny_model(ids).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step == 1:
            assert adapter.on_optimizer_step(step) is None  # not a multiple of 2: nothing happens
            assert all(optimizer.state[p] for p in adapter.parameters())
    a_before = {n: l.lora_A.detach().clone() for n, l in adapter.layers.items()}
    with torch.no_grad():
        before = tiny_model(ids).logits
    apply_restart(adapter.on_optimizer_step(2), optimizer, scheduler)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, before, atol=1e-5, rtol=1e-5)  # same function
    for name, layer in adapter.layers.items():
        assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, a_before[name])
    assert all(p not in optimizer.state for p in adapter.parameters())  # A and B start afresh
    assert embed in optimizer.state  # fully trained parameters keep their moments
    # every group re-warms from its LR at step 2 (one restart, although LambdaLR shares the schedule)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2 * 0.8 / 3] * 2)
    assert adapter.merges_into_base()
    with pytest.raises(UserError, match="method.relora_every=-1: must be an integer >= 0"):
        adapters.attach(tiny_model, "lora", {"relora_every": -1})


def test_unfreeze_modules(tiny_model):
    adapter = adapters.attach(tiny_model, "mora", {"rank": 8})
    full = unfreeze_modules(tiny_model, ["embed_tokens", "norm", "input_layernorm", "post_attention_layernorm",
                                         "lm_head"], adapter)
    assert set(full) == {"model.embed_tokens.weight", "model.norm.weight",
                         *(f"model.layers.{i}.{n}.weight" for i in range(2)
                           for n in ("input_layernorm", "post_attention_layernorm"))}  # lm_head is tied: once
    assert all(p.requires_grad for p in full.values())
    assert not tiny_model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    with pytest.raises(UserError, match="model.layers.0.self_attn holds layers the method adapts"):
        unfreeze_modules(tiny_model, ["self_attn"], adapter)
    with pytest.raises(UserError, match="task.train_modules=\\['embeddings'\\] matches no module"):
        unfreeze_modules(tiny_model, ["embeddings"], adapter)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_cache):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(30)))
    return path


def pretrain(tmp_path, corpus, *overrides):
    from finetune.config.compose import compose
    from finetune.training.loop import train

    args = ["model=tiny", "task=pretrain", f"task.data.path={corpus}", "task.max_length=48",
            "task.eval_holdout=4", "trainer.max_steps=4", "trainer.batch_size=2", "trainer.lr=1e-2",
            f"output_dir={tmp_path / 'run'}", "logger=none", *overrides]
    return train(compose(args), args, quiet=True), tmp_path / "run"


@pytest.mark.parametrize("method", ["mora", "lora"])
def test_a_run_whose_base_changed_is_saved_with_its_base(tmp_path, corpus, method):
    """ReMoRA / ReLoRA merge twice and the embeddings and norms train in full: `finetune eval` of
    the saved run gives the perplexity measured at the end of training, and the merged model (plain
    transformers) has the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    from finetune.inference.evaluate import evaluate_path
    from finetune.run.load import load_run

    every = "method.remora_every=2" if method == "mora" else "method.relora_every=2"
    result, run = pretrain(tmp_path, corpus, f"method={method}", every, f"trainer.merge={method == 'mora'}")
    info = json.loads((run / "run.json").read_text())
    assert info["params"]["fully_trained_params"] == 259 * 128 + 5 * 128  # embeddings (tied) and norms
    assert result["metric"] == "perplexity"
    evaluated = evaluate_path(run)["metrics"]
    assert math.isclose(evaluated["perplexity"], result["metrics"]["perplexity"], rel_tol=1e-5)
    if method == "mora":
        meta = json.loads((run / "adapter.json").read_text())
        assert set(meta["settings"]["layer_types"].values()) == {3}  # 1 → 2 → 3 after two merges
        model, _, _, _ = load_run(run)
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(run / "merged")(ids).logits
            torch.testing.assert_close(merged, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_pretrain_needs_a_random_init_model():
    from finetune.config.compose import compose

    assert compose(["task=pretrain"]).model.name == "smollm2-16m-random"  # its default model
    assert compose(["task=pretrain", "model=tiny"]).model.name == "tiny"  # the command line wins
    with pytest.raises(UserError, match="task=pretrain trains a model from scratch"):
        compose(["task=pretrain", "model=qwen2.5-0.5b"])
