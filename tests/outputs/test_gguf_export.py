"""GGUF export, checked by programs other than our writer: plain transformers loads the written file
(`gguf_file=`) and its logits equal the merged model's (written by `finetune merge`, loaded by plain
transformers); its tokenizer encodes like the run's; and the embedded model's own GGUF, written by
llama.cpp's converter, equals our f32 export of the same weights tensor by tensor and key by key
(read with the `gguf` package's reader)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from finetune.config.compose import compose
from finetune.errors import UserError
from finetune.models.gguf import fix_pre_tokenizer, gguf_pre
from finetune.outputs.export import export_run
from finetune.outputs.gguf import TYPES, gguf_architecture, llama3_rope_factors, write_gguf
from finetune.outputs.merge import merge_run
from finetune.training.loop import train

from bpe_models import bpe_model_dir

STRINGS = ["Hello world", "café naïve über 東京 ½ ²", "a   1 and  42  ", "price: $3.50, or 1,000!", "tab\tnew\nline\n\n",
           "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "emoji 🙂 and Ω", ""]
RUN_ARGS = ["method=lora", "task=memorize", "task.num_pairs=4", "task.eval_limit=1", "task.max_new_tokens=2",
            "trainer.max_steps=3", "trainer.batch_size=2", "trainer.lr=0.01", "trainer.merge=false"]
# Largest |Δlogit| allowed against the fp32 merged model, per type, on these tiny random models
# (|logits| up to ~1); the embedded model's measured differences are in docs/bench/gguf-cpu.md.
BOUNDS = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2, "q5_0": 0.1, "q5_1": 0.1, "q4_0": 0.2, "q4_1": 0.2}


def train_run(tmp, model_dir, *overrides):
    run = tmp / "run"
    train(compose([f"model.path={model_dir}", "model.gguf_file=null", *RUN_ARGS, *overrides, f"output_dir={run}"]),
          quiet=True)
    return run


def read_back(path):
    """The file as plain transformers reads it: model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def plain(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(directory)))


def batch(vocab, seed=0):
    return torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def same_tokens(a, b):
    for text in STRINGS:
        ids = a(text)["input_ids"]
        assert b(text)["input_ids"] == ids, text
        assert b.decode(ids, skip_special_tokens=False) == a.decode(ids, skip_special_tokens=False), text
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    assert a.apply_chat_template(messages, tokenize=False) == b.apply_chat_template(messages, tokenize=False)


# --------------------------------------------------------------------------------------------
# A trained LoRA run on a Llama model with a SmolLM-style tokenizer: every type
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-lora")
    model_dir = bpe_model_dir(tmp / "model", kind="smollm")
    run = train_run(tmp, model_dir)
    merged = merge_run(run, quiet=True)
    return run, plain(merged), plain(model_dir)[0]


@pytest.mark.parametrize("kind", TYPES)
def test_the_file_computes_the_merged_model(lora_run, tmp_path, kind):
    run, (merged, _), base = lora_run
    out = export_run(run, "gguf", tmp_path / f"m-{kind}.gguf", gguf_type=kind)
    model, _ = read_back(out)
    x = batch(merged.config.vocab_size)
    want = logits(merged, x)
    assert (want - logits(base, x)).abs().max() > 0.05  # the adapter changed the model: ΔW is in the file
    assert (logits(model, x) - want).abs().max() <= BOUNDS[kind]


def test_the_file_carries_the_runs_tokenizer_and_settings(lora_run, tmp_path):
    import gguf

    run, (merged, merged_tok), _ = lora_run
    out = export_run(run, "gguf", tmp_path / "m.gguf", gguf_type="f16")
    _, tokenizer = read_back(out)
    # transformers does not rebuild the "smollm" split from the file; finetune's reader does (models/gguf).
    same_tokens(merged_tok, fix_pre_tokenizer(tokenizer, gguf_pre(out)))
    fields = gguf.GGUFReader(str(out)).fields
    value = {k: f.contents() for k, f in fields.items() if k != "tokenizer.ggml.merges"}
    cfg = merged.config
    assert value["general.architecture"] == "llama" and value["tokenizer.ggml.pre"] == "smollm"
    assert value["llama.context_length"] == cfg.max_position_embeddings
    assert (value["llama.attention.head_count"], value["llama.attention.head_count_kv"]) == (4, 2)
    assert value["tokenizer.ggml.bos_token_id"] == merged_tok.bos_token_id
    assert value["tokenizer.ggml.eos_token_id"] == merged_tok.eos_token_id
    assert value["tokenizer.chat_template"] == merged_tok.chat_template
    assert len(value["tokenizer.ggml.tokens"]) == cfg.vocab_size  # padded with unused tokens
    assert value["tokenizer.ggml.token_type"][len(merged_tok)] == gguf.TokenType.UNUSED
    assert value["tokenizer.ggml.token_type"][merged_tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: written once


def test_a_merged_model_directory_exports_too(lora_run, tmp_path):
    run, (merged, merged_tok), _ = lora_run
    model, tokenizer = read_back(export_run(run / "merged", "gguf", tmp_path / "m.gguf", gguf_type="f32"))
    x = batch(merged.config.vocab_size)
    assert (logits(model, x) - logits(merged, x)).abs().max() <= 1e-5
    same_tokens(merged_tok, fix_pre_tokenizer(tokenizer, "smollm"))


def test_cli_export_gguf(lora_run, tmp_path):
    run = lora_run[0]
    out = tmp_path / "cli.gguf"
    proc = subprocess.run([sys.executable, "-m", "finetune", "export", str(run), "--format", "gguf", "--out",
                           str(out), "--type", "q8_0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"exported gguf q8_0 model to {out}"
    import gguf

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left aside


# --------------------------------------------------------------------------------------------
# Other methods, bases and tokenizers (f32: exact)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,arch,overrides", [
    ("qwen2", "qwen2", []),
    ("gpt2", "llama", ["method=mora", "method.rank=8"]),
    ("gpt2", "llama", ["method=vblora", "method.vector_length=16", "method.num_vectors=32"]),
    ("llama-bpe", "llama", ["method=full", "method.lr=1e-3"]),
    ("spm", "mistral", ["method=lora", "model.quantize=4bit"]),
], ids=["qwen2-lora", "mora", "vblora", "llama3-split-full", "spm-mistral-4bit"])
def test_methods_bases_and_tokenizers(tmp_path, kind, arch, overrides):
    model_dir = bpe_model_dir(tmp_path / "model", kind=kind, arch=arch)
    run = train_run(tmp_path, model_dir, *overrides)
    merged, merged_tok = plain(merge_run(run, quiet=True))
    out = export_run(run, "gguf", tmp_path / "m.gguf", gguf_type="f32")
    model, tokenizer = read_back(out)
    x = batch(merged.config.vocab_size)
    assert (logits(model, x) - logits(merged, x)).abs().max() <= 1e-5
    same_tokens(merged_tok, tokenizer)


def test_a_random_init_run_exports_its_saved_base(tmp_path):
    model_dir = bpe_model_dir(tmp_path / "model", kind="smollm")
    run = train_run(tmp_path, model_dir, "model.init=random")
    assert (run / "base").is_dir()
    merged, _ = plain(merge_run(run, quiet=True))
    model, _ = read_back(export_run(run, "gguf", tmp_path / "m.gguf", gguf_type="f32"))
    x = batch(merged.config.vocab_size)
    assert (logits(model, x) - logits(merged, x)).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------
# The embedded model: our f32 export of its weights equals its own GGUF, as llama.cpp wrote it
# --------------------------------------------------------------------------------------------


def test_the_embedded_models_round_trip(tmp_path):
    import gguf

    from finetune.models.load import load_model
    from finetune.models.paths import resolve_path
    from finetune.models.tokenizer import load_tokenizer

    cfg = compose([]).model
    shipped = f"{resolve_path(cfg.path)}/{cfg.gguf_file}"
    out = write_gguf(load_model(cfg), load_tokenizer(cfg), tmp_path / "smollm2.gguf", "f32", source_gguf=shipped)
    theirs, ours = gguf.GGUFReader(shipped), gguf.GGUFReader(str(out))
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:  # dequantized with the gguf package's own code
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(mine[t.name].data.shape)
        assert mine[t.name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(mine[t.name].data), want), t.name
    assert set(ours.fields) == set(theirs.fields)
    for key, field in theirs.fields.items():
        if key == "general.file_type":  # theirs is Q4_1, ours f32
            assert ours.fields[key].contents() == gguf.LlamaFileType.ALL_F32
            continue
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    _, tokenizer = read_back(out)
    same_tokens(load_tokenizer(cfg), fix_pre_tokenizer(tokenizer, gguf_pre(out)))


# --------------------------------------------------------------------------------------------
# Pieces: RoPE scaling, architectures
# --------------------------------------------------------------------------------------------


def test_llama3_rope_factors_match_transformers():
    """llama.cpp divides each rotary frequency by its factor: base frequencies / factors must equal
    the frequencies transformers computes for Llama 3.1's scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=scaling)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ours = llama3_rope_factors(config, 128).double()
    assert torch.allclose(base / ours, theirs.double(), rtol=1e-6)
    assert ours.min() == 1.0 and ours.max() == 8.0  # both ends of the band are reached


def test_unsupported_architectures_are_refused():
    from transformers import AutoConfig

    with pytest.raises(UserError, match="model type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        gguf_architecture(AutoConfig.for_model("gpt2"))


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    import gguf
    from transformers import AutoTokenizer

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model_dir = bpe_model_dir(tmp_path / "model", kind="llama-bpe", rope_parameters=scaling)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    out = write_gguf(model, AutoTokenizer.from_pretrained(str(model_dir)), tmp_path / "m.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    want = llama3_rope_factors(model.config, 16).numpy()
    assert np.array_equal(np.asarray(tensors["rope_freqs.weight"].data), want)
    assert want.min() == 1.0 and want.max() == 8.0


def spm_encode(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece-style tokenization as it describes it: spaces become ▁ with one
    prepended, then repeatedly the adjacent pair whose joined text is a normal token with the highest
    score is merged (the leftmost on ties); what is left unknown falls back to <0xXX> byte tokens."""
    index = {t: i for i, t in enumerate(tokens) if types[i] == 1}
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in index and (best is None or scores[index[joined]] > best[0]):
                best = (scores[index[joined]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for s in symbols:
        out += [index[s]] if s in index else [tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


def test_spm_scores_give_llama_cpps_tokenization(tmp_path):
    """A SentencePiece-style vocabulary is tokenized by llama.cpp from the scores, not the merges:
    the scores written must make its algorithm cut text as the run's tokenizer does."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = bpe_model_dir(tmp_path / "model", kind="spm")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = write_gguf(AutoModelForCausalLM.from_pretrained(str(model_dir)), tok, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(str(out)).fields
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    for text in STRINGS[:5] + ["the cat sat on a mat", "emoji 🙂 and Ω"]:
        assert spm_encode(text, tokens, scores, types) == tok(text, add_special_tokens=False)["input_ids"], text
