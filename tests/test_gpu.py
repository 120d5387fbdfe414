"""Checks that need a CUDA GPU: the paths that only run there, through the real CLI.

Marked ``gpu`` (deselected by default): ``python -m pytest -m gpu`` on a GPU machine, or
``bash bench/gpu_check.sh`` which also runs the GPU benchmark. ``SLIMTUNE_GPU_TESTS_ON_CPU=1``
runs them on the CPU instead (``--cpu``), to check the tests' own logic on a machine without
a GPU; what only a GPU can show (the gpu loader by default, DataParallel) is then skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests._faults import env
from tests.helpers import make_small_checkpoint, run_cli
from trainer.files.checkpoint import load_checkpoint, safe_torch_load

ON_CPU = os.environ.get("SLIMTUNE_GPU_TESTS_ON_CPU") == "1"
DEVICE = ["--cpu"] if ON_CPU else []
# The CPU rehearsal only checks that the script and the tests run (bf16 on a CPU is slow):
# 3 steps of 100 per epoch there, 10 on a GPU.
N_TRAIN, N_TEST = (300, 100) if ON_CPU else (1000, 300)
DATA = ["--dataset", "synthetic", "--synthetic-train", str(N_TRAIN),
        "--synthetic-test", str(N_TEST), "--num-workers", "2"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()),
                                 reason="needs a CUDA GPU")]


def _ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _finetune(tmp_path: Path, *extra: str, epochs: int = 2, env_=None) -> Path:
    src = tmp_path / "s.pth"
    if not src.exists():
        make_small_checkpoint(src, width=8)
    _ok(run_cli("finetune", "--checkpoint", src, "--epochs", str(epochs), "--batch-size", "100",
                *DATA, *DEVICE, *extra, cwd=tmp_path, timeout=600, env=env_))
    return tmp_path / "s_finetune.pth"


def _evaluate(tmp_path: Path, ckpt: Path, *extra: str) -> dict:
    out = _ok(run_cli("evaluate", ckpt, "--json", "--batch-size", "100", *DATA, *extra,
                      cwd=tmp_path, timeout=600))
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][0])


def test_finetune_defaults_on_one_gpu(tmp_path):
    """The CUDA defaults (gpu loader, channels_last, cudnn.benchmark, TF32): a run that
    learns, whose checkpoint reloads on the CPU and evaluates there as it did in the run."""
    ckpt = load_checkpoint(_finetune(tmp_path))
    assert ckpt["config"]["loader"] == ("torch" if ON_CPU else "gpu")
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    best = ckpt["best_epoch"]
    cpu = _evaluate(tmp_path, tmp_path / "s_finetune.pth", "--cpu")
    assert cpu["total"] == N_TEST
    # TF32 convolutions on the GPU: a few logits near a tie may flip, not more
    assert abs(cpu["accuracy"] - ckpt["history"]["test_acc"][best - 1]) <= 100 * 3 / N_TEST
    assert cpu["loss"] == pytest.approx(ckpt["history"]["test_loss"][best - 1], rel=2e-2)


def test_strict_fp32_evaluation_matches_the_cpu(tmp_path):
    """--no-tf32 gives IEEE FP32 convolutions: the GPU's loss equals the CPU's to ~1e-5."""
    src = make_small_checkpoint(tmp_path / "r.pth", width=8, seed=2)
    gpu = _evaluate(tmp_path, src, "--no-tf32", *DEVICE)
    cpu = _evaluate(tmp_path, src, "--cpu")
    assert gpu["correct"] == cpu["correct"] and gpu["total"] == N_TEST
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4)


def test_compile_on_the_gpu(tmp_path):
    result = run_cli("finetune", "--checkpoint", make_small_checkpoint(tmp_path / "s.pth", 8),
                     "--compile", "--epochs", "1", "--batch-size", "100", *DATA, *DEVICE,
                     cwd=tmp_path, timeout=600)
    lines = [ln for ln in _ok(result).splitlines() if ln.startswith("torch.compile: ")]
    assert len(lines) == 1, result.stdout[-2000:]
    tuned = safe_torch_load(tmp_path / "s_finetune.pth")
    assert not [k for k in tuned["state_dict"] if "_orig_mod" in k]


def test_bf16_mixed_precision_runs(tmp_path):
    ckpt = load_checkpoint(_finetune(tmp_path, "--mixed-precision", "bf16", epochs=1))
    assert ckpt["config"]["mixed_precision"] == "bf16"
    assert all(t.dtype != torch.bfloat16 for t in ckpt["state_dict"].values())  # FP32 weights


def test_resume_after_a_kill_on_the_gpu(tmp_path):
    """A run killed in epoch 2 resumes (optimizer state back onto the GPU) and finishes."""
    src = make_small_checkpoint(tmp_path / "s.pth", width=8)
    args = ["finetune", "--checkpoint", src, "--epochs", "3", "--batch-size", "100", *DATA,
            *DEVICE]
    killed = run_cli(*args, cwd=tmp_path, timeout=600, env=env(SLIMTUNE_TEST_KILL_AT="2:3"))
    assert killed.returncode != 0
    assert safe_torch_load(tmp_path / "s_finetune.last.pth")["epoch"] == 1
    _ok(run_cli(*args, "--resume", cwd=tmp_path, timeout=600))
    state = safe_torch_load(tmp_path / "s_finetune.last.pth")
    assert state["epoch"] == 3 and state["finished"] and state["history"]["epoch"] == [1, 2, 3]


@pytest.mark.parametrize("mode", ["ddp", "dp"])
def test_two_gpus(tmp_path, mode):
    if ON_CPU and mode == "dp":
        pytest.skip("DataParallel needs GPUs")
    if not ON_CPU and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ckpt = load_checkpoint(_finetune(tmp_path, "--gpus", "2", "--mode", mode, epochs=1))
    assert ckpt["config"]["mode"] == mode
    assert not [k for k in ckpt["state_dict"] if k.startswith("module.")]


def test_fp16_resume_carries_the_loss_scaler(tmp_path):
    """fp16 on CUDA gives Accelerate a GradScaler; its state travels in the resume state, so a
    killed run resumes at the loss scale it had reached (exactness: tests/test_kd.py, CPU)."""
    if ON_CPU:
        pytest.skip("fp16 needs CUDA")
    src = make_small_checkpoint(tmp_path / "s.pth", width=8)
    args = ["finetune", "--checkpoint", src, "--epochs", "3", "--batch-size", "100",
            "--mixed-precision", "fp16", *DATA]
    killed = run_cli(*args, cwd=tmp_path, timeout=600, env=env(SLIMTUNE_TEST_KILL_AT="2:3"))
    assert killed.returncode != 0
    state = safe_torch_load(tmp_path / "s_finetune.last.pth")
    assert state["epoch"] == 1 and state["scaler"]["scale"] > 0
    _ok(run_cli(*args, "--resume", cwd=tmp_path, timeout=600))
    state = safe_torch_load(tmp_path / "s_finetune.last.pth")
    assert state["finished"] and state["history"]["epoch"] == [1, 2, 3]


def test_sync_bn_keeps_plain_batchnorm_checkpoints(tmp_path):
    """--sync-bn: SyncBatchNorm across a multi-GPU job (one GPU: nothing to sync); the saved
    state_dict keeps BatchNorm's keys, so every command loads it as before."""
    if ON_CPU:
        r = run_cli("finetune", "--sync-bn", "--cpu", cwd=tmp_path)
        assert r.returncode == 2 and "--sync-bn synchronises BatchNorm" in r.stderr
        return
    gpus = "2" if torch.cuda.device_count() >= 2 else "1"
    ckpt = load_checkpoint(_finetune(tmp_path, "--sync-bn", "--gpus", gpus, epochs=1))
    assert ckpt["config"]["sync_bn"] is True
    assert "layer1.0.bn1.running_mean" in ckpt["state_dict"]
