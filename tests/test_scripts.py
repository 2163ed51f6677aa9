"""The scripts under scripts/: the GPU acceptance script runs its checks end to end (on the CPU with
the tiny model, --smoke), so that the one GPU run it is meant for does not fail on a bug of its own;
the profiler and memory scripts account for a step; the throughput benchmark's MFU is FLOPs over time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--out",
                           str(tmp_path / "check")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "check.json").read_text())["results"]
    names = [r["check"] for r in results]
    assert len(names) == 15 and all(r["ok"] for r in results)
    assert {"bf16 vblora", "4bit mora6", "8bit lora", "fsdp x1 full", "deepspeed x1 lora"} <= set(names)
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in results)


def test_profile_step_accounts_for_the_step(tmp_path):
    """The profiler window holds whole training steps and every operator lands in one kind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--warmup", "1", "--steps",
                           "2", "--out", str(tmp_path / "profile"), "model=tiny", "method=lora"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "profile.json").read_text())
    kinds = result["kinds_s"]
    assert kinds["GEMM"] > 0 and kinds["attention"] > 0 and kinds["optimizer"] > 0
    assert abs(sum(v for k, v in kinds.items() if not k.startswith("outside")) - result["operator_seconds"]) < 1e-6
    assert 0 < result["operator_seconds"] <= result["wall_seconds"] * 1.05
    assert result["tokens_per_s_unprofiled"] > 0


def test_memory_step_counts_what_autograd_keeps(tmp_path):
    """One step's saved tensors, grouped by what made them, add up; in real training the lean gated
    MLP is on (no SiLU output kept) and the layers keep their norms' inputs only (no hidden-sized
    tensor kept by the projections that read a norm's output), and gradient checkpointing keeps
    far less."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_CACHE": str(tmp_path / "cache")}
    results = {}
    for name, extra in (("plain", []), ("recompute", ["trainer.gradient_checkpointing=true"])):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_step.py"), "--job", "memorize", "--warmup", "1", "--out",
                               str(tmp_path / name), "model=tiny", "method=lora", *extra],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    plain = results["plain"]
    assert plain["positions"] > 0 and plain["layers"] == 2
    assert abs(sum(g["bytes"] for g in plain["groups"]) / 2**20 - plain["saved_mb"]) < 1e-9
    # the tiny model's MLP is 384 wide: the MLP keeps gate's and up's outputs (2 per layer), and no
    # SiLU output or product is kept, by the MLP or by down_proj
    wide = {(g["kept_by"], g["tensors"]) for g in plain["groups"] if g["values_per_position"] == 384}
    assert wide == {("layers.*.mlp", 4)}
    # 128 wide: the norms keep their inputs; no projection reading a norm's output keeps that output
    hidden = {g["kept_by"] for g in plain["groups"] if g["values_per_position"] == 128}
    assert {"layers.*.input_layernorm", "layers.*.post_attention_layernorm"} <= hidden
    readers = {f"layers.*.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")} | {"layers.*.mlp.gate_proj",
                                                                                      "layers.*.mlp.up_proj"}
    assert not hidden & readers
    # the kernel's resident counters are per-CPU and summed lazily: a high-water mark read later can
    # trail an earlier resident reading by a few pages
    assert plain["peak_rss_mb"] >= plain["rss_before_step_mb"] - 1 > 0
    assert results["recompute"]["saved_mb"] < plain["saved_mb"] / 2


def test_throughput_mfu_over_the_timed_steps_is_their_flops_over_their_time():
    """The benchmark's MFU over the steps it times: from each step's logged MFU and tokens/s, the
    warm-up left out, it equals those steps' FLOPs over their seconds against the peak."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_throughput import timed_mfu
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    peak = 100.0
    flops, seconds, tokens = [900.0, 300.0, 500.0], [20.0, 4.0, 6.0], [1000, 1200, 1400]  # step 1: the warm-up
    steps = [{"mfu": f / s / peak, "tokens_per_s": n / s} for f, s, n in zip(flops, seconds, tokens)]
    assert timed_mfu(steps, tokens, warmup=1) == pytest.approx((300 + 500) / (4 + 6) / peak)
    assert timed_mfu(steps, tokens, warmup=0) == pytest.approx(sum(flops) / sum(seconds) / peak)
    assert timed_mfu(steps[:1], tokens[:1], warmup=1) is None  # no step after the warm-up
