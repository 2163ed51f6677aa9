"""Merged checkpoints: plain transformers loads them, and their logits equal the adapted model's."""

import json
import subprocess
import sys

import pytest
import torch

from finetune.errors import UserError
from finetune.outputs.merge import merge_run
from finetune.run.load import load_run
from finetune.training.loop import train

from conftest import tiny_config


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


def test_merge_reads_a_bf16_base_in_bf16_and_writes_the_same_weights(tmp_path):
    """A bf16 checkpoint is merged from its bf16 weights (half of fp32's memory); since bf16 -> fp32
    is exact and ΔW is added in fp32 per tensor, the output equals the fp32-loaded merge bit for bit."""
    from safetensors.torch import load_file

    from finetune.models.load import load_model
    from finetune.outputs.streaming import save_merged

    torch.manual_seed(0)
    base_dir = tmp_path / "bf16-base"
    load_model(tiny_config().model).to(torch.bfloat16).save_pretrained(base_dir)
    run = tmp_path / "run"
    train(tiny_config("model.init=pretrained", f"model.path={base_dir}", "method=mora", "method.rank=4",
                      "task.num_pairs=4", "task.eval_limit=1", "task.max_new_tokens=2", "trainer.max_steps=3",
                      "trainer.lr=1e-2", "trainer.merge=false", f"output_dir={run}"), quiet=True)
    model, _, _, _ = load_run(run, stored_dtype=True)
    assert {p.dtype for p in model.parameters() if p.requires_grad is False} == {torch.bfloat16}
    merged = merge_run(run, tmp_path / "merged", quiet=True)
    model, adapter, _, _ = load_run(run)  # fp32 base
    save_merged(model, adapter, tmp_path / "reference")
    got, want = (load_file(str(d / "model.safetensors")) for d in (merged, tmp_path / "reference"))
    assert got.keys() == want.keys() and all(v.dtype == torch.float32 for v in got.values())
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], v.float()) for k, v in load_file(str(base_dir / "model.safetensors")).items())
