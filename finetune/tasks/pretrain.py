"""Pretraining a random-init model (MoRA paper, experiments.md §2.5; methods.md §3).

The model is built from its config (``model.init=random``; default ``model=smollm2-16m-random``,
a 4-layer LLaMA with the embedded SmolLM2's tokenizer) and trained on a cpt-style corpus (same
data, blocks, packing and perplexity metric as ``task=cpt``; default: the Python docs) through the
chosen method. The adapter schedules that merge into the base live in the methods:
``method=mora method.remora_every=N`` is ReMoRA, ``method=lora method.relora_every=N`` is ReLoRA.
Embeddings, norms and ``lm_head`` train in full (``task.train_modules``), as in the paper; the
run saves the resulting base weights in ``RUN_DIR/base`` next to the adapter.
"""

from __future__ import annotations

from finetune.tasks import cpt


class Task(cpt.Task):
    metric = "perplexity"
