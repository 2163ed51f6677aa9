"""Tokenizers: the built-in byte tokenizer (tests and random-init models: no download), or the
tokenizer of a model directory, hub id or GGUF file."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError, first_line
from finetune.models.gguf import converted_gguf
from finetune.models.paths import is_local, resolve_path

BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens plus <s>, </s>, <pad>; BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = BYTE_CHAT_TEMPLATE
    return fast


def load_tokenizer(cfg):
    """Tokenizer for a model config: ``bytes`` (built in), or a directory / hub id."""
    name = cfg.tokenizer or cfg.path
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    src = converted_gguf(cfg) if (cfg.gguf_file and not cfg.tokenizer) else resolve_path(name)
    if is_local(src) and not Path(src).expanduser().is_dir():
        raise UserError(f"model.{'tokenizer' if cfg.tokenizer else 'path'}={name}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise UserError(f"model.tokenizer: cannot load a tokenizer from {name!r} ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
