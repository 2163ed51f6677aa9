"""Every user mistake through the real command line: one line on stderr naming what is wrong, where,
and what is allowed; exit code 2; no traceback; nothing half-written left behind."""

import json
import re
import warnings

import pytest
from typer.testing import CliRunner

from finetune.cli import app

RUN = ["model=tiny", "trainer.max_steps=1", "trainer.batch_size=2", "trainer.merge=false"]
TINY = [*RUN, "task.num_pairs=2", "task.eval_limit=1", "task.max_new_tokens=1"]


# (command line, expected start of the message, or "..." + a part of it). {tmp}: a fresh directory;
# {run}: a finished MoRA run; {out}: the output_dir the case must not leave behind.
CASES = [
    # config groups, keys, types
    (["train", "method=foo"], "method=foo: unknown option for group 'method'; available: full, lora, mora, vblora"),
    (["train", "launcher=mpi"], "launcher=mpi: unknown option for group 'launcher'; available: ddp, deepspeed, fsdp, none"),
    (["train", "method.rnak=4"], "unknown config key 'method.rnak'; did you mean 'rank'?"),
    (["train", "trainer.sav_every=4"], "unknown config key 'trainer.sav_every'; did you mean 'save_every'?"),
    (["train", "launcher=ddp", "launcher.procs=2"], "unknown config key 'launcher.procs'"),
    (["train", "trainer.lr=abc"], "trainer.lr='abc': wrong type, expected float"),
    (["train", "trainer.max_steps=1.5"], "trainer.max_steps='1.5': wrong type, expected integer"),
    (["train", "trainer.schedule=exp"], "trainer.schedule=exp: not allowed; allowed: linear, cosine, constant"),
    (["train", "trainer.max_steps=[1"], "cannot parse the overrides"),
    # impossible values
    (["train", "method=lora", "method.rank=0"], "method.rank=0: must be > 0"),
    (["train", "method=mora", "method.rank=-4"], "method.rank=-4: must be > 0"),
    (["train", "trainer.batch_size=0"], "trainer.batch_size=0: must be > 0"),
    (["train", "trainer.lr=0"], "trainer.lr=0.0: must be > 0"),
    (["train", "trainer.lr=-1e-3"], "trainer.lr=-0.001: must be > 0"),
    (["train", "trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1: must be >= 0"),
    (["train", "method.dropout=1.5"], "method.dropout=1.5: must be in [0, 1)"),
    (["train", *TINY, "method=vblora", "method.topk=300", "output_dir={out}", "-q"],
     "method.topk=300 must be an integer in [1, num_vectors=256]"),
    (["train", *TINY, "method=vblora", "method.vector_length=48", "output_dir={out}", "-q"],
     "VB-LoRA: method.vector_length=48 does not divide module model.layers.0.self_attn.q_proj with (in, out) "
     "= (128, 128); vector lengths that divide every targeted module: 1, 2, 4, 8, 16, 32, 64"),
    # launcher
    (["train", "launcher.num_processes=2"], "launcher.num_processes=2 needs a launcher: add launcher=ddp"),
    (["train", "launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2"],
     "launcher.num_machines=2: set launcher.main_process_ip"),
    (["train", "launcher=ddp", "launcher.machine_rank=3", "launcher.num_machines=2"],
     "launcher.machine_rank=3: must be in [0, 1]"),
    (["train", "launcher=deepspeed", "launcher.num_processes=2", "method=lora", "model.quantize=4bit"],
     "model.quantize=4bit with launcher=deepspeed: ZeRO-3 cannot partition bitsandbytes 4/8-bit weights"),
    (["train", "launcher=fsdp", "launcher.num_processes=2", "method=mora", "method.remora_every=10"],
     "method.remora_every=10 with launcher=fsdp: ReMoRA/ReLoRA merge into the base weights during training"),
    # paths: model, data, run directories, checkpoints
    (["train", *TINY, "method=lora", "model.init=pretrained", "model.path=/no/such/model", "output_dir={out}"],
     "model.path=/no/such/model: no such directory"),
    (["train", *TINY, "method=lora", "model.path=pkg:no_such_package_xyz", "model.init=pretrained",
      "output_dir={out}"], "model.path=pkg:no_such_package_xyz: the Python package 'no_such_package_xyz' is not installed"),
    (["train", *RUN, "method=lora", "task=instruct", "task.data.path={tmp}/empty.jsonl", "output_dir={out}"],
     "task.data.path={tmp}/empty.jsonl: the dataset is empty (no records)"),
    (["train", *RUN, "method=lora", "task=instruct", "task.data.path={tmp}/missing.jsonl", "output_dir={out}"],
     "task.data.path={tmp}/missing.jsonl: no such file or directory"),
    (["train", *TINY, "method=mora", "output_dir={run}"],
     "output_dir={run} already holds a finished run; pass trainer.overwrite=true to replace it"),
    (["train", *TINY, "method=mora", "output_dir={run}", "trainer.resume=auto"],
     "output_dir={run} already holds a finished run; nothing to resume"),
    (["train", *TINY, "output_dir={tmp}/empty.jsonl"], "output_dir={tmp}/empty.jsonl: exists and is not a directory"),
    (["train", *TINY, "output_dir={tmp}"], "output_dir={tmp} is not empty and not a finetune run"),
    (["train", *TINY, "trainer.resume={tmp}/nothing", "output_dir={out}"],
     "trainer.resume={tmp}/nothing: not a checkpoint or run directory; allowed: auto, RUN_DIR, or "
     "RUN_DIR/checkpoints/step-N"),
    (["train", *TINY, "method=mora", "trainer.resume={run}/checkpoints/step-9", "output_dir={out}"],
     "trainer.resume={run}/checkpoints/step-9: not a checkpoint or run directory"),
    (["train", *TINY, "trainer.resume=auto", "trainer.overwrite=true", "output_dir={out}"],
     "trainer.resume and trainer.overwrite=true contradict each other"),
    (["train", "--config-dir", "{tmp}/nope"], "--config-dir {tmp}/nope: no such directory"),
    # values the types accept but no setting does
    (["train", *TINY, "method=lora", "method.targets='q_proj['", "output_dir={out}"],
     "method.targets='q_proj[': not a valid regular expression"),
    (["train", *TINY, "trainer.seed=-1", "output_dir={out}"], "trainer.seed=-1: must be in [0, 2^32 - 1]"),
    (["train", *TINY, "trainer.seed=4294967296", "output_dir={out}"], "trainer.seed=4294967296: must be in"),
    (["train", *TINY, "trainer.lr=nan", "output_dir={out}"], "trainer.lr=nan: must be a finite number"),
    (["train", *TINY, "method=lora", "method.alpha=inf", "output_dir={out}"], "method.alpha=inf: must be a finite"),
    (["train", *TINY, "method=lora", "method.alpha=0", "output_dir={out}"], "method.alpha=0.0: must be > 0"),
    # settings that only the model shows to be wrong (found at set-up: the run directory goes again)
    (["train", *TINY, "method=lora", "method.rank=200", "output_dir={out}"],
     "method.rank=200 is wider than every adapted layer"),
    (["train", *TINY, "method=mora", "method.rank=100000", "output_dir={out}"],
     "...more than the whole 427,008-parameter model has; lower method.rank"),
    (["train", *TINY, "method=lora", "method.targets=[lm_head]", "output_dir={out}"],
     "method.targets selects lm_head, whose weight is tied to the input embeddings"),
    (["train", *TINY, "task.max_length=4000", "output_dir={out}"],
     "task.max_length=4000 is longer than model=tiny's context of 512 positions"),
    (["train", *TINY, "model.path=/does/not/exist", "output_dir={out}"], "model.path=/does/not/exist: no such directory"),
    (["train", "model.path=/does/not/exist", "model.gguf_file=null", "output_dir={out}"],
     "model.path=/does/not/exist: no such directory"),
    (["train", *TINY, "model.path=nobody/no-such-model", "output_dir={out}"],
     "model.path=nobody/no-such-model: cannot read a model config"),
    (["train", *TINY, "output_dir={tmp}/empty.jsonl/run"], "...: cannot write there"),
    # data
    (["train", *RUN, "task=gsm8k", "task.data.path={tmp}/latin.jsonl", "output_dir={out}"],
     "task.data.path: {tmp}/latin.jsonl:1: not UTF-8 text"),
    (["train", *RUN, "task=gsm8k", "task.data.path={tmp}/number.jsonl", "task.eval_holdout=1", "output_dir={out}"],
     "task.data.path={tmp}/number.jsonl record 0: 'answer' must be text, not int 42"),
    (["train", *RUN, "task=instruct", "task.data.path={tmp}/null.jsonl", "task.eval_holdout=1", "output_dir={out}"],
     "task.data.path={tmp}/null.jsonl record 0: 'messages[1].content' must be text, not null"),
    (["train", *RUN, "task=instruct", "task.data.path={tmp}/lists.jsonl", "task.eval_holdout=1", "output_dir={out}"],
     "task.data.path={tmp}/lists.jsonl record 0: 'instruction' must be text, not list"),
    (["train", *RUN, "task=instruct", "task.data.path={tmp}/alpaca.jsonl", "task.eval_holdout=0", "output_dir={out}"],
     "task.eval_holdout=0 and no task.eval_path: nothing is held out to evaluate on"),
    # the other commands
    (["merge", "{tmp}"], "{tmp}: not a finetune run directory"),
    (["merge", "{run}", "--out", "{tmp}/empty.jsonl"], "--out {tmp}/empty.jsonl: exists and is not a directory"),
    (["eval", "{run}", "method=lora"], "method=lora: a run is used with the model and method it trained"),
    (["export", "{run}", "--as-lora", "--out", "{run}"], "--out {run}: a run or checkpoint directory"),
    (["merge", "{run}", "--dtype", "int8"], "--dtype int8: allowed: float32, bfloat16, float16"),
    (["eval", "{tmp}"], "{tmp}: neither a finetune run directory nor a model directory (config.json)"),
    (["export", "{run}", "--format", "peft", "--out", "{out}"], "MoRA has no peft adapter format"),
    (["export", "{tmp}", "--format", "peft", "--out", "{out}"], "...not a finetune run directory"),
    (["export", "{run}", "--format", "gguf", "--out", "{out}.gguf"],
     "GGUF export: the tokenizer has no merges (a byte tokenizer such as model=tiny's)"),
    (["export", "{run}", "--format", "gguf", "--type", "q4_k", "--out", "{out}.gguf"],
     "--type q4_k: allowed: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (K-quants and i-quants: export f16 and run "
     "llama.cpp's llama-quantize)"),
    (["export", "{run}", "--format", "gguf", "--out", "{tmp}/empty.jsonl"],
     "--out {tmp}/empty.jsonl: a GGUF file's name ends in .gguf"),
    (["export", "{run}", "--format", "gguf", "--out", "{tmp}/text.gguf"],
     "--out {tmp}/text.gguf: exists and is not a GGUF file; choose another name"),
    (["export", "{run}", "--format", "gguf", "--as-lora", "--out", "{out}.gguf"], "--as-lora applies to --format peft only"),
    (["export", "{run}", "--format", "peft", "--type", "f16", "--out", "{out}"], "--type applies to --format gguf only"),
    (["export", "{run}", "--format", "onnx", "--out", "{out}"], "--format onnx: allowed: peft, gguf"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished MoRA run (one step, a checkpoint)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(app, ["train", *TINY, "method=mora", "trainer.save_every=1", f"output_dir={run}", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    return run


def contents(directory) -> dict:
    """Every file below ``directory`` with the SHA-256 of its bytes."""
    from finetune.run.checkpoints import file_digest

    return {str(p.relative_to(directory)): file_digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def data_files(tmp) -> None:
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "x #### 1"}\n')
    (tmp / "number.jsonl").write_text('{"question": "q", "answer": 42}\n{"question": "r", "answer": "1 #### 1"}\n')
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    (tmp / "null.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat}) + "\n")
    alpaca = {"instruction": ["a", "b"], "input": "", "output": "c"}
    (tmp / "lists.jsonl").write_text(json.dumps(alpaca) + "\n" + json.dumps(alpaca) + "\n")
    (tmp / "alpaca.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "c"}) + "\n")
    (tmp / "text.gguf").write_text("not a GGUF file\n")


def _fill(text: str, tmp, run, out) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{out}", str(out))


@pytest.mark.parametrize("args,message", CASES, ids=lambda v: " ".join(v)[:70] if isinstance(v, list) else None)
def test_user_mistake_is_one_line_and_exit_2(args, message, tmp_path, finished_run, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    data_files(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    run_before = contents(finished_run)
    args = [_fill(a, tmp_path, finished_run, out) for a in args]

    with warnings.catch_warnings():  # library warnings are not the CLI's messages
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    # progress bars (loading or writing a model before the mistake shows) are not messages
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1, result.stderr
    expected = _fill(message, tmp_path, finished_run, out)
    if expected.startswith("..."):  # a part of the message (worded by another module)
        assert lines[0].startswith("finetune: error: ") and expected[3:] in lines[0], lines[0]
    else:
        assert lines[0].startswith(f"finetune: error: {expected}"), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()  # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert contents(finished_run) == run_before  # the finished run and its checkpoint: not a byte changed


def test_the_table_is_long_enough():
    assert len(CASES) >= 45
