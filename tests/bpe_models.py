"""Small models with real BPE tokenizers, built offline: a tokenizer trained with `tokenizers` on
generated text (a GPT-2/SmolLM-style byte-level BPE, a Qwen2-style one, or a SentencePiece-style
BPE with byte fallback like Llama 2's), saved with a random-init model as a Hugging Face directory.
The `tiny` model's byte tokenizer has no merges, so it has no GGUF form; these do."""

import json
import random

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("the cat sat on a mat while it rained and question answer value key memorize train model "
         "numbers are like 12 345 6789 0 and prices $3.50 or 1,000; café naïve über 東京 日本語 ½ ²").split()


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + ("\n" if rng.random() < 0.2 else ""))
    return lines


def bpe_tokenizer(kind="smollm", vocab_size=700):
    """A trained fast tokenizer: ``kind`` is smollm (digits apart, then GPT-2's split), gpt2, qwen2,
    llama-bpe (Llama 3's split) or spm (Llama-2-like: ▁ for spaces, byte fallback, BOS added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "spm":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        bytes_ = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                      show_progress=False)
        tok.train_from_iterator(corpus(), trainer)
        spec = json.loads(tok.to_str())  # the byte tokens live in the vocabulary only, as in Llama 2's
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]
        tok = Tokenizer.from_str(json.dumps(spec))
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="</s>")
    else:
        tok = Tokenizer(models.BPE())
        splits = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind not in splits)
        steps = ([pre_tokenizers.Split(Regex(splits[kind]), behavior="isolated")] if kind in splits else
                 [pre_tokenizers.Digits(individual_digits=True)] if kind == "smollm" else [])
        tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE if kind != "spm" else CHAT_TEMPLATE.replace("<|im_start|>", "[INST]").replace(
        "<|im_end|>", "[/INST]")
    return fast


def bpe_model_dir(path, kind="smollm", arch="llama", seed=0, **config):
    """``path``: a random-init model (2 layers, hidden 64, GQA 4/2 heads, vocabulary padded past the
    tokenizer's) with a ``kind`` tokenizer, saved as a Hugging Face directory. Returns ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = bpe_tokenizer(kind)
    settings = dict(vocab_size=len(tokenizer) + 20, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=arch == "llama", bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5)
    settings.update(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **settings), dtype=torch.float32)
    with torch.no_grad():  # norms away from 1, so that a mistake in writing them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
