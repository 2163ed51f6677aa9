"""The embedded GGUF model's tokenizer splits text the way its file says (``tokenizer.ggml.pre``):
checked against an independent splitter written from llama.cpp's description of that name."""

import json

import pytest
import regex

from finetune.config.compose import compose
from finetune.models.gguf import gguf_pre
from finetune.models.paths import resolve_path
from finetune.models.tokenizer import load_tokenizer

# GPT-2's split, which llama.cpp's "smollm" pre-tokenizer applies after isolating every numeral.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Runs of spaces before digits, numerals outside ASCII, digits glued to letters and punctuation.
STRINGS = ["a   1", "x  ½ 3", "٣٤ apples and ²", "   42   ", "Total: 1,234.56", "tab\t7\n\n8",
           "Ⅻ chapter", "mix日本語123abc", "version 3.10.4 (2024)", "   ", "no digits here"]


def smollm_pieces(text: str) -> list[str]:
    """llama.cpp's split for ``pre=smollm``: each ``\\p{N}`` isolated, then GPT-2's regex."""
    out = []
    for part in regex.split(r"(\p{N})", text):
        out += regex.findall(GPT2_SPLIT, part) if part else []
    return out


@pytest.fixture(scope="module")
def embedded():
    cfg = compose([]).model
    return cfg, load_tokenizer(cfg)


def test_the_embedded_file_names_its_split(embedded):
    cfg, _ = embedded
    assert gguf_pre(resolve_path(cfg.path) + "/" + cfg.gguf_file) == "smollm"


def test_the_embedded_tokenizer_splits_as_llama_cpp_does(embedded):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, tok = embedded
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    bpe = Tokenizer(models.BPE(vocab=spec["vocab"], merges=merges))  # the same merges, no split of its own
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2_only = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    gpt2_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    differs = 0
    for text in STRINGS:
        expected = [i for piece in smollm_pieces(text) for i in bpe.encode(piece, add_special_tokens=False).ids]
        got = tok(text, add_special_tokens=False)["input_ids"]
        assert got == expected, text
        assert tok.decode(got) == text
        differs += gpt2_only.encode(text, add_special_tokens=False).ids != expected
    assert differs >= 3  # the strings do tell the two splits apart
