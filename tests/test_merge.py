"""Merged checkpoints: plain transformers loads them, and their logits equal the adapted model's."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from finetune.errors import UserError
from finetune.merge import load_run, merge_run
from finetune.train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "run"
    train(tiny_config("task.num_pairs=8", f"output_dir={out}", "trainer.max_steps=5", "trainer.lr=1e-2"),
          quiet=True)
    return out


def test_merged_dir_loads_without_finetune_and_matches(lora_run, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model, adapter, _, _ = load_run(lora_run)
    assert max(l.lora_B.abs().max().item() for l in adapter.layers.values()) > 0
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(lora_run / 'merged')!r})\n"
        f"AutoTokenizer.from_pretrained({str(lora_run / 'merged')!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "assert 'finetune' not in sys.modules\n"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (got - expected).abs().max().item() <= 1e-4
    files = {p.name for p in (lora_run / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)


def test_merge_to_bf16(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge_run(lora_run, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / "finetune_merge.json").read_text())["dtype"] == "bfloat16"


def test_merge_refuses_bad_input(lora_run, tmp_path):
    with pytest.raises(UserError, match="not a finetune run directory"):
        merge_run(tmp_path, tmp_path / "x")
    with pytest.raises(UserError, match="--dtype int8: allowed"):
        merge_run(lora_run, tmp_path / "y", dtype="int8")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="not a merged model written by finetune"):
        merge_run(lora_run, tmp_path / "occupied")
    assert (tmp_path / "occupied" / "precious.txt").read_text() == "keep"
