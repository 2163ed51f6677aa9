"""FSDP2 and DeepSpeed ZeRO-3 executed on the CPU: 2 processes over gloo, the tiny model, every
method (and a 4-bit base under FSDP), gradient accumulation included, against one process with the
same global batch: the same losses and gradient norms at every step, the same weights, complete
adapter files, sharded checkpoints that resume in one process and from one process, merged models
that plain transformers loads. One torchrun launch per engine trains all its cases."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.run import checkpoints
from finetune.training.distributed import free_port
from finetune.training.loop import train

from conftest import tiny_config

TESTS = Path(__file__).parent
REPO = TESTS.parents[1]

COMMON = ["model=tiny", "task.num_pairs=8", "task.eval_limit=2", "task.max_new_tokens=2", "trainer.max_steps=4",
          "trainer.lr=1e-4", "trainer.save_every=2", "trainer.keep_checkpoints=0", "trainer.merge=false",
          "logger=none"]
ONE = ["trainer.batch_size=4"]  # one process × batch 4 × accumulation 1
TWO = ["trainer.batch_size=1", "trainer.grad_accum=2", "launcher.num_processes=2"]  # 2 × 1 × 2
CASES = {
    "lora": ["method=lora", "trainer.merge=true"],
    "mora1": ["method=mora", "method.type=1"],
    "mora6": ["method=mora", "method.type=6"],
    "vblora": ["method=vblora", "method.vector_length=32"],
    "full": ["method=full"],
}
QUANTIZED = {"qlora": ["method=lora", "model.quantize=4bit"]}  # FSDP keeps the 4-bit base whole
ENGINES = {"fsdp": {**CASES, **QUANTIZED}, "deepspeed": CASES}
FROM_ONE = ("lora", "full")  # cases also resumed from a one-process checkpoint by the sharded engine


def env():
    out = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS.parent), str(TESTS)]))
    return out


def losses(run):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_close_weights(a, b, atol=1e-5):
    wa, wb = load_file(str(Path(a) / "adapter.safetensors")), load_file(str(Path(b) / "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype, k  # whole tensors, not one shard
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_runs(request, tmp_path_factory):
    """One process per case, then one 2-process launch of the engine training every case afresh
    and continuing the one-process checkpoints of FROM_ONE; returns (engine, root)."""
    engine = request.param
    root = tmp_path_factory.mktemp(engine)
    for name, overrides in ENGINES[engine].items():
        train(tiny_config(*COMMON, *overrides, *ONE, f"output_dir={root / name}-one"), quiet=True)
    runs = [[*COMMON, *overrides, *TWO, f"launcher={engine}", f"output_dir={root / name}-two"]
            for name, overrides in ENGINES[engine].items()]
    runs += [[*COMMON, *ENGINES[engine][name], *TWO, f"launcher={engine}", f"output_dir={root / name}-from-one",
              f"trainer.resume={root / name}-one/checkpoints/step-2"] for name in FROM_ONE]
    (root / "runs.json").write_text(json.dumps(runs))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "train_worker.py"), str(root / "runs.json")],
                          env=env(), cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ShareMemComm" not in done.stdout + done.stderr  # no C++ op was built
    return engine, root


@pytest.mark.parametrize("case", list(CASES) + list(QUANTIZED))
def test_two_processes_equal_one_process(engine_runs, case):
    engine, root = engine_runs
    if case not in ENGINES[engine]:
        assert engine == "deepspeed"  # ZeRO-3 cannot partition 4-bit weights: refused (test_bad_input)
        return
    one, two = root / f"{case}-one", root / f"{case}-two"
    for a, b in zip(losses(one), losses(two), strict=True):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"])
    assert_close_weights(one, two)
    info_one, info_two = (json.loads((r / "run.json").read_text()) for r in (one, two))
    assert info_two["status"] == "finished" and info_two["num_processes"] == 2
    assert info_two["params"] == info_one["params"]  # counted from the real sizes, before sharding
    assert info_two["metrics"] == info_one["metrics"]
    # the random-init base is drawn and saved whole, as in one process
    base_one, base_two = load_file(str(one / "base" / "model.safetensors")), load_file(str(two / "base" / "model.safetensors"))
    assert base_one.keys() == base_two.keys() and all(torch.equal(base_one[k], base_two[k]) for k in base_one)
    # each rank wrote its own pieces of the sharded tensors
    step2 = two / "checkpoints" / "step-2"
    assert checkpoints.is_complete(step2)
    assert {p.name for p in step2.glob("*.safetensors")} >= {"weights.0.safetensors", "weights.1.safetensors",
                                                            "optimizer.0.safetensors", "optimizer.1.safetensors"}
    # the 2-process checkpoint continues in one process (another process count and launcher)
    resumed = root / f"{case}-two-to-one"
    train(tiny_config(*COMMON, *ENGINES[engine][case], *ONE, f"output_dir={resumed}",
                      f"trainer.resume={step2}"), quiet=True)
    assert_close_weights(one, resumed)


@pytest.mark.parametrize("case", FROM_ONE)
def test_a_one_process_checkpoint_continues_sharded(engine_runs, case):
    _, root = engine_runs
    assert_close_weights(root / f"{case}-one", root / f"{case}-from-one")
    info = json.loads((root / f"{case}-from-one" / "run.json").read_text())
    assert info["resumed_from"].endswith("step-2") and info["num_processes"] == 2


def test_merged_and_evaluated_after_a_sharded_run(engine_runs):
    from transformers import AutoModelForCausalLM

    from finetune.inference.evaluate import evaluate_path

    _, root = engine_runs
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for which in ("one", "two"):
        model = AutoModelForCausalLM.from_pretrained(root / f"lora-{which}" / "merged").eval()
        with torch.no_grad():
            logits[which] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["two"], logits["one"], atol=1e-4, rtol=0)
    run = root / "lora-two"
    assert evaluate_path(run)["metrics"] == json.loads((run / "run.json").read_text())["metrics"]


# --------------------------------------------------------------------------------------------
# Through the command line: a rank killed mid-run, and two "machines" on one host
# --------------------------------------------------------------------------------------------

CLI = ["model=tiny", "method=lora", "task.num_pairs=8", "task.eval_limit=1", "task.max_new_tokens=1",
       "trainer.lr=1e-4", "trainer.merge=false", "logger=none", "trainer.batch_size=1", "trainer.grad_accum=2",
       "launcher=fsdp", "launcher.num_processes=2"]


def finetune(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "finetune", "train", *args, "-q"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def rank_process(run_dir: Path, rank: int) -> int:
    """The pid of the training process of ``rank`` for ``run_dir`` (found through its environment)."""
    wanted = {f"RANK={rank}".encode(), f"FINETUNE_RUN_DIR={run_dir}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def test_a_rank_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    run, steps = tmp_path / "run", 40
    proc = finetune(*CLI, f"trainer.max_steps={steps}", "trainer.save_every=4", f"output_dir={run}")
    deadline = time.time() + 300
    while not checkpoints.is_complete(run / "checkpoints" / "step-8"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    os.kill(rank_process(run.resolve(), 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run finished before the kill"
    assert json.loads((run / "run.json").read_text())["status"] != "finished"
    killed_at = checkpoints.step_of(checkpoints.latest(run))
    assert 8 <= killed_at < steps

    again = finetune(*CLI, f"trainer.max_steps={steps}", "trainer.save_every=4", f"output_dir={run}",
                     "trainer.resume=auto")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][-1]["step"] == killed_at
    one = tmp_path / "one"
    train(tiny_config(*CLI[:8], "trainer.batch_size=4", f"trainer.max_steps={steps}", f"output_dir={one}"),
          quiet=True)
    assert_close_weights(one, run)


def test_two_machines_on_one_host_train_like_one_process(tmp_path):
    run, port = tmp_path / "shared", free_port()
    machine = [*CLI, "trainer.max_steps=4", "trainer.save_every=2", "launcher.num_machines=2",
               "launcher.main_process_ip=127.0.0.1", f"launcher.main_process_port={port}", f"output_dir={run}"]
    procs = [finetune(*machine, f"launcher.machine_rank={r}") for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert json.loads(results[0][0].strip().splitlines()[-1])["run_dir"] == str(run)  # printed by machine 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["num_processes"] == 2
    step4 = run / "checkpoints" / "step-4"
    assert (step4 / "weights.0.safetensors").is_file() and (step4 / "weights.1.safetensors").is_file()
    one = tmp_path / "one"
    train(tiny_config(*CLI[:8], "trainer.batch_size=4", "trainer.max_steps=4", f"output_dir={one}"), quiet=True)
    assert_close_weights(one, run)
