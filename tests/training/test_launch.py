"""Multi-process training through Accelerate: the launch arguments, 2 CPU processes (gloo) equal 1
process with the same global batch, and the loop's token-level normalisation across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.allocator import find_jemalloc
from finetune.config.compose import compose
from finetune.errors import UserError
from finetune.training.launch import accelerate_args, child_args, config_file, plan_processes
from finetune.training.loop import accumulate_gradients, train

from conftest import OneProcess, tiny_config

TESTS = Path(__file__).parent
REPO = TESTS.parents[1]


def env():
    """The test's environment for child processes, without any launcher variables of its own."""
    out = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    return out


# --------------------------------------------------------------------------------------------
# What is handed to Accelerate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,expect", [
    (["launcher=ddp", "launcher.num_processes=2"], {"multi_gpu": True, "num_processes": 2}),
    # finetune shards itself: the launch is the same plain multi-process one for every launcher
    (["launcher=fsdp", "launcher.num_processes=8"], {"multi_gpu": True, "use_fsdp": False}),
    (["launcher=deepspeed", "launcher.num_processes=8"], {"multi_gpu": True, "use_deepspeed": False}),
    (["launcher=ddp", "launcher.num_processes=16", "launcher.num_machines=2", "launcher.machine_rank=1",
      "launcher.main_process_ip=10.0.0.1", "output_dir=/shared/run"],
     {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1", "num_processes": 16}),
])
def test_accelerate_accepts_the_generated_arguments(overrides, expect):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = compose(["model=tiny", *overrides])
    args = accelerate_args(cfg, cfg.launcher.num_processes, 29500, "no", child_args(["model=tiny"], None, True))
    parsed, _, _ = _validate_launch_command(launch_command_parser().parse_args(args))
    for key, value in expect.items():
        assert str(getattr(parsed, key)) == str(value), key
    assert parsed.module and parsed.training_script == "finetune"
    assert parsed.training_script_args == ["train", "model=tiny", "-q"]


def test_process_counts_and_launch_configs(tmp_path):
    with pytest.raises(UserError, match="set launcher.num_processes"):
        plan_processes(compose(["model=tiny", "launcher=fsdp"]), "cpu", 0)
    with pytest.raises(UserError, match="this machine has 2 GPU"):
        plan_processes(compose(["model=tiny", "launcher=ddp", "launcher.num_processes=4"]), "cuda", 2)
    assert plan_processes(compose(["model=tiny", "launcher=ddp"]), "cuda", 8) == 8
    assert plan_processes(compose(["model=tiny", "launcher=fsdp", "launcher.num_processes=2"]), "cpu", 0) == 2
    mine = tmp_path / "accelerate.yaml"
    mine.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    cfg = compose(["model=tiny", "launcher=ddp", "launcher.num_processes=2", f"launcher.config_file={mine}"])
    with pytest.raises(UserError, match="distributed_type FSDP is not used; finetune shards itself: set launcher=fsdp"):
        config_file(cfg.launcher)
    mine.write_text("distributed_type: MULTI_GPU\n")
    assert config_file(cfg.launcher) == str(mine)


# --------------------------------------------------------------------------------------------
# The loop's normalisation across processes (torchrun, 2 ranks, unequal token counts)
# --------------------------------------------------------------------------------------------


def test_two_ranks_with_unequal_lengths_give_the_one_process_gradient(tmp_path):
    import ddp_worker

    out = tmp_path / "grads.safetensors"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "ddp_worker.py"), str(out)],  # --standalone: torchrun picks a free port
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_file(str(out))
    model, adapter = ddp_worker.model_and_adapter()
    from finetune.data.batching import collate

    loss, tokens = accumulate_gradients(model, [collate(ddp_worker.window(), ddp_worker.PAD)], OneProcess())
    assert abs(two.pop("loss").item() - loss) < 1e-5
    assert two.pop("input_tokens").item() == tokens == sum(ddp_worker.LENGTHS)
    for name, p in adapter.named_trainable():
        torch.testing.assert_close(two[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)



# --------------------------------------------------------------------------------------------
# End to end: finetune train launcher=ddp launcher.num_processes=2
# --------------------------------------------------------------------------------------------

SMALL = ["model=tiny", "method=lora", "task.num_pairs=8", "task.eval_limit=1", "task.max_new_tokens=1",
         "trainer.max_steps=3", "trainer.lr=2e-4", "trainer.merge=false", "logger=none"]


def records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_processes_with_accumulation_equal_one_process(tmp_path):
    # 2 processes × batch 1 × accumulation 2 == 1 process × batch 4: the same global batch.
    done = subprocess.run([sys.executable, "-m", "finetune", "train", *SMALL, "trainer.batch_size=1",
                           "trainer.grad_accum=2", "trainer.save_every=2", "launcher=ddp",
                           "launcher.num_processes=2", "-q"],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = list((tmp_path / "outputs" / "memorize" / "lora").iterdir())
    assert len(runs) == 1  # one run directory, decided before the launch, shared by both ranks
    two = runs[0]
    assert json.loads(done.stdout.strip().splitlines()[-1])["run_dir"] == str(two)  # printed once
    one = tmp_path / "one"
    train(tiny_config(*SMALL, "trainer.batch_size=4", f"output_dir={one}"), quiet=True)

    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["num_processes"] == 2
    # `finetune train` started itself again with jemalloc where one is installed (CI installs it);
    # the ranks inherit it, and the numbers below match this process's glibc run all the same.
    assert info["environment"]["allocator"] == ("jemalloc" if find_jemalloc() else "system")
    for a, b in zip(records(one), records(two), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["tokens"] == b["tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]  # Adam hides a scale error
    w1, w2 = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0, msg=k)
    assert any(w1[k].abs().max() > 1e-4 for k in w1 if k.endswith("lora_B"))  # it did train

    # The 2-process checkpoint of step 2 continues in 1 process (the same global batch) to the same end.
    resumed = tmp_path / "resumed"
    train(tiny_config(*SMALL, "trainer.batch_size=4", f"output_dir={resumed}",
                      f"trainer.resume={two / 'checkpoints' / 'step-2'}"), quiet=True)
    w3 = load_file(str(resumed / "adapter.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w3[k], atol=1e-5, rtol=0, msg=k)


def test_a_refused_run_directory_stops_before_launching(tmp_path):
    one = tmp_path / "one"
    (one).mkdir()
    (one / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "finetune", "train", *SMALL, "launcher=ddp",
                           "launcher.num_processes=2", f"output_dir={one}"],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"finetune: error: output_dir={one} is not empty and not a finetune run; choose another output_dir")
    assert "Traceback" not in done.stderr
