#!/usr/bin/env python
"""How far each GGUF type moves the model: logits of the exported file, read back by plain
transformers (`gguf_file=`), against the model finetune exported, for every type `finetune export
--format gguf --type` writes.

The model is the embedded default (SmolLM2-135M-Instruct, its base weights as finetune loads them)
or, with --run, a finished run's merged model (base + ΔW, as `finetune export RUN` writes it). The
prompts are the first --prompts questions of GSM8K's test split in the model's chat template, cut
to --tokens tokens each, as one batch. Per type: file size, export time, the largest and mean
absolute logit difference over every position and vocabulary entry, the largest difference of
log-probabilities, and how often the top-1 token agrees.

    python scripts/gguf_accuracy.py
    python scripts/gguf_accuracy.py --run outputs/gsm8k/lora/<timestamp> --types f32 q8_0

Writes docs/bench/gguf-<device>.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, bench_parser, hardware_info, md_heading, md_table, output_path, print_hardware, write_outputs  # noqa: E402,I001

GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def prompts(tokenizer, n: int, length: int, path: Path):
    import torch

    rows = []
    with open(path) as f:
        for line in f:
            question = json.loads(line)["question"]
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == n:
                break
    return torch.tensor(rows)


def main() -> None:
    from finetune.outputs.gguf import TYPES

    p = bench_parser(__doc__, "gguf")
    p.add_argument("--run", default=None, help="a finished run (default: the embedded model's base)")
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--data", default=str(GSM8K_TEST), help="GSM8K test.jsonl")
    args = p.parse_args()
    info = hardware_info(args.device)
    print_hardware(info)

    import torch
    from transformers import AutoModelForCausalLM

    from finetune import progress
    from finetune.outputs.gguf import write_gguf

    progress.set_quiet(True)
    torch.manual_seed(0)
    if args.run:
        from finetune.outputs.merge import dequantize_model, load_for_merge
        from finetune.run.directory import RunDir

        def load():
            model, adapter, tokenizer, *_ = load_for_merge(RunDir(args.run))
            dequantize_model(model)
            return model, adapter, tokenizer
        what = f"run {args.run}"
    else:
        from finetune.config.compose import compose
        from finetune.models.load import load_model
        from finetune.models.tokenizer import load_tokenizer

        cfg = compose([]).model

        def load():
            return load_model(cfg).eval(), None, load_tokenizer(cfg)
        what = "SmolLM2-135M-Instruct (the embedded model's weights, as finetune loads them)"

    model, adapter, tokenizer = load()
    x = prompts(tokenizer, args.prompts, args.tokens, Path(args.data))
    if adapter is not None:  # the reference: the merged model in fp32 (ΔW added to the weights)
        adapter.merge()
        adapter.unwrap()
    with torch.no_grad():
        reference = model(x).logits.float()
    if adapter is not None:
        model, adapter, tokenizer = load()
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="finetune-gguf-") as tmp:
        for kind in args.types:
            if model is None:
                model, adapter, tokenizer = load()
            path = Path(tmp) / f"model-{kind}.gguf"
            t0 = time.perf_counter()
            write_gguf(model, tokenizer, path, kind, adapter=adapter)
            export_s = time.perf_counter() - t0
            if adapter is not None:  # writing unwraps the adapter: load the run again for the next type
                model = adapter = None
            loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = loaded(x).logits.float()
            del loaded
            diff = (logits - reference).abs()
            logp = (torch.log_softmax(logits, -1) - torch.log_softmax(reference, -1)).abs()
            top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            r = {"file_mb": path.stat().st_size / 2**20, "export_s": export_s, "max_abs_logit_diff": diff.max().item(),
                 "mean_abs_logit_diff": diff.mean().item(), "max_abs_logprob_diff": logp.max().item(),
                 "top1_agreement": top1}
            results[kind] = r
            rows.append([kind, r["file_mb"], r["export_s"], f"{r['max_abs_logit_diff']:.3g}",
                         f"{r['mean_abs_logit_diff']:.3g}", f"{r['max_abs_logprob_diff']:.3g}", f"{100 * top1:.1f}%"])
            print(f"{kind}: {json.dumps(r)}", flush=True)
            path.unlink()
    scale = reference.abs().max().item()
    command = "python scripts/gguf_accuracy.py " + " ".join(sys.argv[1:])
    md = (md_heading(f"GGUF export: logit differences per type ({args.device})", info, f"Model: {what}",
                     f"Prompts: {x.shape[0]} GSM8K test questions in the chat template, {x.shape[1]} tokens "
                     f"each; logits over all {x.shape[0] * x.shape[1]} positions × {reference.shape[-1]} tokens "
                     f"(largest |logit| of the reference: {scale:.3g}).")
          + "Each file was read back by plain transformers (`from_pretrained(dir, gguf_file=...)`, which dequantizes "
          "to fp32) and compared with the model finetune exported, in fp32.\n\n"
          + md_table(["type", "file MiB", "export s", "largest logit diff", "mean logit diff",
                      "largest log-prob diff", "top-1 agrees"], rows) + "\n")
    write_outputs(output_path(args, "gguf"), {"hardware": info, "command": command, "model": what,
                                               "prompts": list(x.shape), "reference_max_abs_logit": scale,
                                               "results": results}, md)


if __name__ == "__main__":
    main()
