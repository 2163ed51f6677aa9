"""`finetune generate`: the run's completions (base + adapter, before merging) are exactly what plain
transformers decodes greedily from the merged model; a memorize run generates the values that
`finetune eval` scores; prompts are laid out as the run's task trained; bad input is one line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.formatting import alpaca_prompt, chat_prompt_ids, prompt_ids
from finetune.inference.prompts import choose_format, encode
from finetune.models.tokenizer import byte_tokenizer
from finetune.tasks.memorize import UUID_LEN, char_accuracy, make_pairs

TRAIN = ["model=tiny", "method=lora", "task.num_pairs=4", "task.eval_limit=4", "trainer.max_steps=30",
         "trainer.lr=1e-2", "trainer.batch_size=4", "logger=none"]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def memorize_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    invoke("train", *TRAIN, f"output_dir={run}", "-q")
    return run


def completions(path, tmp_path, *args):
    out = tmp_path / "out.jsonl"
    invoke("generate", path, *args, "--out", out, "-q")
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generation_from_the_run_equals_the_merged_model_in_plain_transformers(memorize_run, tmp_path):
    prompts = ["hello world", "abc:", "a longer prompt, with punctuation!"]
    got = completions(memorize_run, tmp_path, *[x for p in prompts for x in ("-p", p)], "--max-new-tokens", 12)
    merged = AutoModelForCausalLM.from_pretrained(memorize_run / "merged").eval()
    tokenizer = byte_tokenizer()
    for prompt, record in zip(prompts, got, strict=True):
        assert record["format"] == "raw"  # memorize trained on raw text
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        with torch.no_grad():
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        plain = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in plain:
            plain = plain[:plain.index(tokenizer.eos_token_id)]
        assert record["completion_ids"] == plain, prompt
        assert record["completion"] == tokenizer.decode(plain, skip_special_tokens=True)


def test_a_memorize_run_generates_what_eval_scores(memorize_run, tmp_path):
    pairs = make_pairs(4, 0)
    (tmp_path / "keys.txt").write_text("".join(f"{key}:\n" for key, _ in pairs))
    got = completions(memorize_run, tmp_path, "--file", tmp_path / "keys.txt", "--max-new-tokens", 48)
    scored = json.loads((memorize_run / "run.json").read_text())["metrics"]["char_acc"]
    mine = sum(char_accuracy(r["completion"][:UUID_LEN], value) for r, (_, value) in zip(got, pairs)) / len(pairs)
    assert mine == pytest.approx(scored, abs=1e-12)


def test_sampling_is_repeatable_with_a_seed(memorize_run, tmp_path):
    args = ["-p", "hello", "--max-new-tokens", 16, "--temperature", 1.5, "--top-k", 50, "--top-p", 0.95]
    first = completions(memorize_run, tmp_path, *args, "--seed", 3)[0]["completion_ids"]
    again = completions(memorize_run, tmp_path, *args, "--seed", 3)[0]["completion_ids"]
    other = completions(memorize_run, tmp_path, *args, "--seed", 4)[0]["completion_ids"]
    assert first == again and first != other


def test_prompts_are_laid_out_as_the_task_trained():
    tokenizer = byte_tokenizer()
    from conftest import tiny_config

    gsm8k = tiny_config("task=gsm8k")
    assert choose_format("auto", gsm8k, tokenizer, True) == "alpaca"
    assert encode("What is 2+2?", "alpaca", tokenizer) == prompt_ids(tokenizer, alpaca_prompt("What is 2+2?"))
    instruct = tiny_config("task=instruct")
    assert choose_format("auto", instruct, tokenizer, True) == "chat"  # the byte tokenizer has a template
    assert encode("Hi", "chat", tokenizer, system="Be brief.") == chat_prompt_ids(
        tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert choose_format("auto", tiny_config("task=cpt"), tokenizer, True) == "raw"
    assert choose_format("auto", gsm8k, tokenizer, False) == "chat"  # a model directory: its template


@pytest.mark.parametrize("args,message", [
    (["generate", "/no/such/run", "-p", "x"], "model.path=/no/such/run: no such directory"),
    (["generate", "{run}"], "no prompt: give --prompt TEXT"),
    (["generate", "{run}", "--file", "{tmp}/empty.txt"], "--file {tmp}/empty.txt: holds no prompt"),
    (["generate", "{run}", "--file", "{tmp}/bad.jsonl"], "--file {tmp}/bad.jsonl:1: a prompt record needs 'prompt'"),
    (["generate", "{run}", "-p", "x", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["generate", "{run}", "-p", "x", "--format", "xml"], "--format xml: allowed: auto, raw, alpaca, chat, tags"),
    (["generate", "{run}", "-p", "x", "method=mora"], "method=mora: a run is used with the model and method it trained"),
    (["chat", "{run}"], "finetune chat needs a terminal, and stdin is not one"),
])
def test_bad_input_is_one_line(memorize_run, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    fill = lambda s: str(s).replace("{run}", str(memorize_run)).replace("{tmp}", str(tmp_path))
    result = CliRunner().invoke(app, [fill(a) for a in args])
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line and line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"finetune: error: {fill(message)}"), \
        result.output


def test_a_quantized_run_generates_before_merging(tmp_path):
    run = tmp_path / "q"
    invoke("train", *TRAIN[:4], "trainer.max_steps=2", "model.quantize=4bit", "trainer.merge=false",
           "logger=none", f"output_dir={run}", "-q")
    record = completions(run, tmp_path, "-p", "hello", "--max-new-tokens", 5)[0]
    assert record["completion_tokens"] >= 1
