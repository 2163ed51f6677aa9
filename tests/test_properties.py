"""Property-based tests (Hypothesis, bounded and derandomized): whatever values a user types for
the config's keys, and whatever records a data file holds, finetune either accepts them or stops
with one line (a UserError) — never another exception."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config.compose import compose
from finetune.errors import UserError

pytestmark = pytest.mark.usefixtures("data_cache")  # the tokenized-data cache in a temporary directory

BOUNDED = settings(max_examples=80, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KEYS = ["trainer.max_steps", "trainer.lr", "trainer.batch_size", "trainer.grad_accum", "trainer.warmup_steps",
        "trainer.seed", "trainer.max_grad_norm", "trainer.weight_decay", "trainer.loss_chunk", "trainer.schedule",
        "trainer.save_every", "trainer.keep_checkpoints", "trainer.precision", "trainer.checkpoint_every_n_layers",
        "method.rank", "method.alpha", "method.dropout", "method.targets", "method.init", "task.num_pairs",
        "task.max_length", "model.dtype", "model.quantize", "launcher.num_processes", "launcher.machine_rank", "logger"]

values = st.one_of(
    st.integers(min_value=-2**40, max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
    st.lists(st.sampled_from(["q_proj", "v_proj", "x", "lm_head"]), max_size=3),
)


def override(key: str, value) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')}"
    if isinstance(value, (bool, int, float)):
        return f"{key}={json.dumps(value)}"
    if isinstance(value, list):
        return f"{key}=[{','.join(value)}]"
    return f"{key}={json.dumps(value)}"  # a quoted string


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_any_config_values_compose_or_fail_in_one_line(pairs):
    overrides = ["model=tiny", "method=lora", *(override(k, v) for k, v in pairs)]
    try:
        cfg = compose(overrides)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    # what was accepted is usable: finite numbers, a seed the generators take
    assert 0 <= cfg.trainer.seed < 2**32 and math.isfinite(cfg.trainer.lr) and cfg.trainer.lr > 0


text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
field_values = st.one_of(text, st.none(), st.integers(), st.lists(text, max_size=2),
                         st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]),
                                                         "content": st.one_of(text, st.none(), st.integers())}),
                                  max_size=3))
records = st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "output", "messages", "text"]),
                                   field_values, min_size=1, max_size=4), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.models.tokenizer import byte_tokenizer

    return byte_tokenizer()


@BOUNDED
@given(records)
def test_any_instruct_records_load_or_fail_in_one_line(tmp_path_factory, tokenizer, rows):
    from finetune.tasks import build_task

    directory = tmp_path_factory.mktemp("records")
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["model=tiny", "task=instruct", f"task.data.path={path}", f"task.eval_path={path}"]).task
    try:
        examples = build_task(cfg, tokenizer).train_examples()
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len(examples) >= 1 and all(len(examples[i]["input_ids"]) > 0 for i in range(len(examples)))


@BOUNDED
@given(st.binary(max_size=200))
def test_any_bytes_in_a_data_file_read_or_fail_in_one_line(tmp_path_factory, data):
    from finetune.data.sources import Source, load_records

    directory = tmp_path_factory.mktemp("bytes")
    path = directory / "data.jsonl"
    path.write_bytes(data)
    try:
        load_records(Source(str(path)), fields=["text"])
    except UserError as e:
        assert str(e) and "\n" not in str(e)
