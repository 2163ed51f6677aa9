"""Instruction tuning: Alpaca and chat records, through a chat template (assistant-only labels that
match the template's own {% generation %} mask; templates without markers or without EOS) and
through the plain fallback; record errors; a few training steps and `finetune eval` perplexity."""

import copy
import json
import math

import pytest

from finetune.data.formatting import alpaca_prompt, chat_row, check_messages, plain_chat_row
from finetune.errors import UserError
from finetune.tasks import build_task

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("data_cache")

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]

# SmolLM2's template (ChatML, a default system prompt, no {% generation %} markers), whose turns end
# with <|im_end|>, which is not the byte tokenizer's EOS: rows must get an EOS after each turn.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def labelled_text(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chat_labels_match_the_templates_generation_mask(byte_tokenizer):
    messages = check_messages(CHAT, "w")
    row = chat_row(byte_tokenizer, messages, "w")
    expected = byte_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(expected["input_ids"])
    mask = list(expected["assistant_masks"])
    assert [label != -100 for label in row["labels"]] == [bool(m) for m in mask]
    assert labelled_text(byte_tokenizer, row) == ["Hello.</s>", "4</s>"]  # each turn ends with EOS


def test_a_template_without_markers_or_eos(byte_tokenizer):
    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = CHATML
    row = chat_row(tok, check_messages(CHAT[1:], "w"), "w")
    assert labelled_text(tok, row) == ["Hello.<|im_end|></s>", "4<|im_end|></s>"]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou are helpful.<|im_end|>")


def test_plain_fallback_layouts(byte_tokenizer):
    row = plain_chat_row(byte_tokenizer, check_messages(CHAT, "w"))
    assert byte_tokenizer.decode(row["input_ids"]) == (
        "<s><|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.</s>\n<|user|>\n2+2?\n<|assistant|>\n4</s>\n")
    assert labelled_text(byte_tokenizer, row) == ["Hello.</s>", "4</s>"]
    plain = copy.deepcopy(byte_tokenizer)
    plain.chat_template = None
    task = build_task(tiny_config("task=instruct", "task.data.path=x.jsonl").task, plain)
    row = task.row({"instruction": "Name a color.", "input": "", "output": "Blue."}, "alpaca", "w")
    n = row["labels"].count(-100)
    assert plain.decode(row["input_ids"][:n], skip_special_tokens=True) == alpaca_prompt("Name a color.")
    assert labelled_text(plain, row) == ["Blue.</s>"]
    with pytest.raises(UserError, match="task.template=tokenizer: this tokenizer has no chat template"):
        build_task(tiny_config("task=instruct", "task.data.path=x.jsonl", "task.template=tokenizer").task, plain)


def test_record_errors(tmp_path, byte_tokenizer):
    def task_for(records):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return build_task(tiny_config("task=instruct", f"task.data.path={path}", "task.eval_holdout=1").task,
                          byte_tokenizer)

    with pytest.raises(UserError, match=r"records need 'messages' \(chat\), 'conversations' \(ShareGPT\) or "
                                        r"'instruction' and 'output' \(Alpaca\); fields present: prompt, reply"):
        task_for([{"prompt": "a", "reply": "b"}] * 3).train_examples()
    with pytest.raises(UserError, match="record 1: message 0 has role 'bot'; allowed: system, user, assistant"):
        task_for([{"messages": CHAT[1:3]}, {"messages": [{"role": "bot", "content": "x"}]}]).train_examples()
    with pytest.raises(UserError, match="record 0: the conversation has no assistant message"):
        task_for([{"messages": CHAT[1:2]}, {"messages": CHAT[1:3]}]).train_examples()
    sharegpt = task_for([{"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Yo."}]}] * 2)
    assert labelled_text(byte_tokenizer, sharegpt.train_examples()[0]) == ["Yo.</s>"]
    # one file may mix kinds: each record is read as what it is, and an error names the right one
    alpaca = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    mixed = task_for([alpaca, {"messages": CHAT[1:3]}, alpaca]).train_examples()
    assert len(mixed) == 2 and labelled_text(byte_tokenizer, mixed[0]) == ["Hi!</s>"]
    with pytest.raises(UserError, match=r"record 1: 'messages\[1\].content' must be text, not null"):
        task_for([alpaca, {"messages": [CHAT[1], {"role": "assistant", "content": None}]}, alpaca]).train_examples()
    with pytest.raises(UserError, match=r"record 0: 'output' must be text, not list"):
        task_for([{**alpaca, "output": ["a"]}, alpaca]).train_examples()


def test_train_then_eval_reports_perplexity(tmp_path):
    from finetune.config.compose import compose
    from finetune.inference.evaluate import evaluate_path
    from finetune.training.loop import train

    records = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ["yes", "no", "red", "blue", "up", "down"]]
    records += [{"messages": [{"role": "user", "content": f"Add {i} and 1."},
                              {"role": "assistant", "content": str(i + 1)}]} for i in range(4)]
    path = tmp_path / "mixed"
    path.mkdir()
    (path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    (path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[6:]))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[6:]))
    out = tmp_path / "run"
    overrides = ["model=tiny", "method=lora", "task=instruct", f"task.data.path={tmp_path / 'chat.jsonl'}",
                 "task.eval_holdout=2", "task.packing=true", "trainer.max_steps=2", "trainer.batch_size=2",
                 "trainer.merge=false", f"output_dir={out}", "logger=none"]
    result = train(compose(overrides), overrides, quiet=True)
    m = result["metrics"]
    assert result["metric"] == "perplexity" and m["n"] == 2 and m["tokens"] > 0
    assert math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-9)
    evaluated = evaluate_path(out)
    assert math.isclose(evaluated["metrics"]["perplexity"], m["perplexity"], rel_tol=1e-4)
    with pytest.raises(UserError, match="the folder mixes files with different fields"):
        evaluate_path(out, [f"task.eval_path={path}"])
