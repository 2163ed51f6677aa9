"""Run by tests/training/test_launch.py under torchrun (2 CPU processes, gloo): each rank takes its half of one
accumulation window of variable-length examples, in two micro-batches, through the training loop's
``accumulate_gradients`` on a DDP-wrapped model; rank 0 writes the averaged gradients and the loss.

    python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_worker.py OUT.safetensors
"""

import sys

import torch

LENGTHS = [3, 5, 4, 6, 40, 31, 57, 22]  # rank 0 gets short examples, rank 1 long ones
PAD = 258


def window():
    """Eight examples with a prompt (no loss) and an answer; lengths very unequal between halves."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def model_and_adapter():
    """The tiny LLaMA with LoRA, B non-zero so that every adapter tensor gets a gradient."""
    from finetune import adapters
    from finetune.config.compose import compose
    from finetune.models.load import load_model

    torch.manual_seed(0)
    model = load_model(compose(["model=tiny", "method=lora"]).model)
    adapter = adapters.attach(model, "lora", {"rank": 4, "alpha": 8})
    for layer in adapter.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model, adapter


def main(out: str) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from finetune.data.batching import collate
    from finetune.training.loop import accumulate_gradients
    from finetune.training.parallel import Parallel

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    model, adapter = model_and_adapter()
    names = [name for name, _ in adapter.named_trainable()]
    model = accelerator.prepare(model)
    mine = window()[rank * 4:(rank + 1) * 4]
    micro = [collate(mine[:2], PAD), collate(mine[2:], PAD)]
    loss, tokens = accumulate_gradients(model, micro, Parallel(accelerator))
    grads = {name: p.grad.detach().clone() for name, p in zip(names, adapter.parameters())}
    if rank == 0:
        grads["loss"] = torch.tensor([loss], dtype=torch.float64)
        grads["input_tokens"] = torch.tensor([tokens])
        save_file(grads, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
