"""The ``bench`` command and bench/gpu_bench.py, run tiny on CPU: fields and sane ratios.

Nothing here asserts a speed (the machine is shared); the figures live in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, cli_env, make_small_checkpoint, run_cli
from trainer.errors import ConfigError, ParamError
from trainer.measure import bench


def _ratio_ok(x: float) -> bool:
    return 0 < x <= 1.5


@pytest.mark.slow
def test_bench_json_fields_and_ratios(tmp_path: Path) -> None:
    proc = run_cli("bench", "--cpu", "--steps", "2", "--repeats", "2", "--batch-size", "4",
                   "--num-workers", "0", "--json", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    d = json.loads(lines[0])
    assert d["device"] == "cpu" and d["batch_size"] == 4
    assert d["steps"] == 2 and d["repeats"] == 2 and d["torch"] == torch.__version__
    assert d["default_loader"] == "torch" and set(d["loop_img_s"]) == {"torch", "gpu"}
    assert d["model_limit_img_s"] > 0 and all(v > 0 for v in d["loop_img_s"].values())
    assert _ratio_ok(d["loop_over_model_limit"])
    assert all(_ratio_ok(v) for v in d["loop_over_model_limit_per_loader"].values())
    assert all(len(runs) == 2 for runs in d["runs_img_s"].values())
    assert d["inference_img_s"]["pruned"] > 0 and d["inference_img_s"]["unpruned"] > 0
    m = d["model"]
    assert m["ratio"] == 0.9 and m["pruned_macs"] < m["unpruned_macs"] / 3
    assert "round_to" not in d  # only with --round-to


@pytest.mark.slow
def test_bench_times_the_round_to_model_beside_the_pruned_one(tmp_path: Path) -> None:
    proc = run_cli("bench", "--cpu", "--steps", "1", "--repeats", "1", "--batch-size", "4",
                   "--num-workers", "0", "--loaders", "torch", "--round-to", "8", "--json",
                   cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert d["round_to"]["k"] == 8
    assert d["round_to"]["inference_img_s"] > 0 and d["round_to"]["model_limit_img_s"] > 0
    assert d["model"]["pruned_params"] <= d["model"]["rounded_params"]


@pytest.mark.slow
def test_gpu_bench_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), str(out),
                           "--cpu", "--quick"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and d["quick"] is True
    for model in ("pruned_0.9", "unpruned"):
        fig = d["training"]["batch_4"][model]
        assert fig["model_limit_img_s"] > 0 and fig["inference_img_s"] > 0
        assert set(fig["loop_img_s"]) == {"torch", "gpu"}
    epoch = d["epoch_50k"]["gpu_loader"]
    assert epoch["images"] == 16 and epoch["epoch_s"] > 0 and epoch["eval_images"] == 16
    assert "skipped" in d["epoch_50k"]["gpu_loader_compile"]
    assert "skipped" in d["multi_gpu"]


@pytest.mark.slow
def test_gpu_bench_ddp_part_on_cpu(tmp_path: Path) -> None:
    """The multi-GPU section's DDP half (torchrun + --ddp-worker), as two gloo ranks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    args = gpu_bench.parse_args([str(tmp_path / "res.json"), "--cpu", "--steps", "1",
                                 "--repeats", "2", "--num-workers", "0"])
    res = gpu_bench.run_ddp(args, 2, 8, timeout=240)
    assert res.get("processes") == 2 and res["global_batch"] == 8, res
    assert len(res["runs_img_s"]) == 2 and res["img_s"] > 0


def test_bench_checkpoint_models(tmp_path: Path) -> None:
    ckpt = make_small_checkpoint(tmp_path / "small.pth", width=4)
    pruned, unpruned, info = bench.bench_models(checkpoint=str(ckpt))
    assert info["checkpoint"] == str(ckpt) and pruned.widths != unpruned.widths
    assert info["pruned_params"] < info["unpruned_params"]
    with pytest.raises(ConfigError, match="not both"):
        bench.bench_models(checkpoint=str(ckpt), ratio=0.5)
    with pytest.raises(ParamError, match=r"^ratio 1.5 is outside \(0, 1\)"):
        bench.bench_models(ratio=1.5)


def test_random_gamma_model_is_seeded() -> None:
    a, b = bench.random_gamma_model(seed=3), bench.random_gamma_model(seed=3)
    assert torch.equal(a.bn1.weight, b.bn1.weight)
    assert 0 <= float(a.bn1.weight.detach().min()) and float(a.bn1.weight.detach().max()) <= 1


def test_bench_bad_options(tmp_path: Path) -> None:
    for opts, message in ((bench.BenchOptions(steps=0), "--steps 0"),
                          (bench.BenchOptions(repeats=0), "--repeats 0"),
                          (bench.BenchOptions(num_workers=-1), "--num-workers -1"),
                          (bench.BenchOptions(loaders=()), "--loaders")):
        with pytest.raises(ConfigError, match=message):
            bench.check_options(opts)
    proc = run_cli("bench", "--cpu", "--loaders", "torch,dali", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --loaders 'torch,dali'")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda(tmp_path: Path) -> None:
    proc = run_cli("bench", "--steps", "5", "--repeats", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["device"].startswith("cuda") and d["default_loader"] == "gpu"
