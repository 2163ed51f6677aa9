"""Naming and loading a base model (finetune.models.paths, load, tokenizer): every way of naming a
model that cannot be loaded is one clear line, before anything heavy happens."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from finetune.errors import UserError
from finetune.models.load import count_params, load_model
from finetune.models.paths import check_local, resolve_path
from finetune.models.tokenizer import load_tokenizer

from conftest import tiny_config


def model_cfg(**values):
    cfg = tiny_config().model.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_a_package_path_resolves_to_its_folder():
    import finetune

    assert resolve_path("pkg:finetune") == finetune.__path__[0]
    assert resolve_path("someone/model") == "someone/model"  # a hub id stays as given


@pytest.mark.parametrize("values,message", [
    ({"init": "pretrained", "path": "/does/not/exist"}, "model.path=/does/not/exist: no such directory"),
    ({"path": "/does/not/exist"}, "model.path=/does/not/exist: no such directory"),  # random init from a config
    ({"init": "pretrained", "path": "{empty}"}, "not a Hugging Face model directory (no config.json)"),
    ({"path": "{empty}"}, "not a Hugging Face model directory (no config.json)"),
    ({"init": "pretrained", "path": "{empty}", "gguf_file": "m.gguf"}, "model.gguf_file=m.gguf: not found in"),
    ({"init": "pretrained", "path": "someone/not-a-model-xyz"},
     "model.path=someone/not-a-model-xyz: cannot load a model"),
    ({"init": "pretrained", "path": "{broken}"}, "model.path={broken}: cannot load a model"),
    ({"path": "pkg:not_a_real_pkg_123"}, "the Python package 'not_a_real_pkg_123' is not installed"),
])
def test_a_model_that_cannot_load_is_one_line(tmp_path, values, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights
    fill = lambda v: v.format(empty=tmp_path / "empty", broken=tmp_path / "broken") if isinstance(v, str) else v
    with pytest.raises(UserError) as e:
        load_model(model_cfg(**{k: fill(v) for k, v in values.items()}))
    assert fill(message) in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_that_cannot_load_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"model.tokenizer: cannot load a tokenizer from '.*empty'"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(model_cfg(tokenizer=str(tmp_path / "empty")))


def test_check_local_leaves_hub_ids_alone():
    check_local("someone/model", None)  # no error: not a local path


def test_a_random_init_model_from_a_saved_config_takes_arch_on_top(tmp_path):
    torch.manual_seed(0)
    load_model(model_cfg()).save_pretrained(tmp_path / "m")
    cfg = model_cfg(path=str(tmp_path / "m"))
    cfg.arch = {"num_hidden_layers": 1}
    model = load_model(cfg)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 128


def test_count_params_counts_tied_weights_once():
    model = load_model(model_cfg())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_params(model) == sum(unique.values())
    assert count_params(model) < sum(p.numel() for p in model.state_dict().values())
