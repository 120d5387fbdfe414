"""The workflow through the real CLI (``python -m launch``): the pipeline end to end on
synthetic data, and the basic bad inputs of train / prune / finetune (one line, exit 2)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, cli_env, make_small_checkpoint, run_cli, small_cfg
from trainer.files.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    safe_torch_load,
    save_checkpoint,
)
from trainer.models.resnet import ResNet50

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_one_line_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


PIPELINE = ["pipeline", "--dataset", "synthetic", "--cpu", "--ratios", "0.3,0.6",
            "--train-epochs", "1", "--finetune-epochs", "1", "--synthetic-train", "128",
            "--synthetic-test", "64", "--batch-size", "32", "--limit-batches", "2",
            "--num-workers", "0", "--workdir", "w"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_synthetic_data(tmp_path):
    r = run_cli(*PIPELINE, cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_pipeline_outputs(tmp_path, r)
    _check_pipeline_resume(tmp_path)


def _check_pipeline_resume(tmp_path: Path) -> None:
    """--resume skips finished stages only when they ran with the settings asked now."""
    ck = tmp_path / "w" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    r = run_cli(*PIPELINE, "--resume", cwd=tmp_path, timeout=200)
    assert r.returncode == 0 and "epoch 1/1" not in r.stdout, r.stdout[-2000:] + r.stderr
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before  # nothing redone
    for extra, needles in ((["--train-epochs", "2"], ["model_sparse.pth", "epochs: 1 -> 2"]),
                           (["--scope", "all"], ["model_prune_30.pth", "'prunable' -> 'all'"]),
                           (["--finetune-lr", "0.01"], ["model_prune_30_finetune.pth",
                                                        "lr: 0.001 -> 0.01"])):
        r = run_cli(*PIPELINE, "--resume", *extra, cwd=tmp_path, timeout=200)
        assert_one_line_error(r, "pipeline --resume refused:", *needles, "--force-resume")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    # the same folder spelt absolute is the same study
    r = run_cli(*PIPELINE, "--resume", "--workdir", tmp_path / "w", cwd=tmp_path, timeout=200)
    assert r.returncode == 0 and "epoch 1/1" not in r.stdout, r.stdout[-2000:] + r.stderr
    # forced: a changed fine-tune lr redoes the fine-tunes (from the start), nothing else
    r = run_cli(*PIPELINE, "--resume", "--force-resume", "--finetune-lr", "0.01", cwd=tmp_path,
                timeout=200)
    assert r.returncode == 0 and r.stdout.count("epoch 1/1") == 2, r.stdout[-2000:] + r.stderr
    for name in ("model_sparse.pth", "model_prune_30.pth", "model_prune_60.pth"):
        assert (ck / name).read_bytes() == before[name], name
    tuned = load_checkpoint(ck / "model_prune_30_finetune.pth")
    assert tuned["config"]["lr"] == 0.01 and tuned["history"]["lr"] == [0.01]


@pytest.mark.slow
def test_pipeline_without_resume_refuses_to_redo_an_interrupted_study(tmp_path):
    """Checked before any stage: the sparse model and pruned files are not redone first."""
    args = [*PIPELINE[:PIPELINE.index("--train-epochs")], "--train-epochs", "2",
            *PIPELINE[PIPELINE.index("--train-epochs") + 2:]]
    r = run_cli(*args, cwd=tmp_path, timeout=200, env=cli_env(SLIMTUNE_TEST_KILL_AT="2:1"))
    assert r.returncode != 0
    last = tmp_path / "w" / "checkpoints" / "model_sparse.last.pth"
    before = last.read_bytes()
    r = run_cli(*args, cwd=tmp_path, timeout=200)
    assert_one_line_error(r, "model_sparse.last.pth holds an interrupted run (1 of 2 epochs "
                          "done); add --resume")
    assert last.read_bytes() == before and "== 1." not in r.stdout


def _check_pipeline_outputs(tmp_path: Path, r) -> None:
    work = tmp_path / "w"
    ck, plots = work / "checkpoints", work / "plots"
    for name in ("model_sparse.pth", "model_prune_30.pth", "model_prune_60.pth",
                 "model_prune_30_finetune.pth", "model_prune_60_finetune.pth"):
        assert (ck / name).is_file(), name
    pngs = ["model_sparse.png", "model_prune_30_gamma.png", "model_prune_60_gamma.png",
            "model_prune_30_finetune.png", "model_prune_60_finetune.png",
            "comparison_30_vs_60_finetuned.png"]
    for name in pngs:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC, name
    report = (work / "report.md").read_text()
    assert "comparison_30_vs_60_finetuned.png" in report
    assert "n/a" not in report  # every number of the study is filled in (MACs included)
    sparse = load_checkpoint(ck / "model_sparse.pth")
    assert sparse["config"]["sparsity"] == 1e-4 and sparse["config"]["optimizer"] == "sgd"
    assert len(sparse["history"]["epoch"]) == 1
    params = {}
    for tag, ratio in (("30", 0.3), ("60", 0.6)):
        pruned = load_checkpoint(ck / f"model_prune_{tag}.pth")
        meta = pruned["prune"]
        assert meta["ratio"] == ratio and Path(meta["source"]).name == "model_sparse.pth"
        assert meta["acc_after"] is not None  # the synthetic test set is always there
        tuned = load_checkpoint(ck / f"model_prune_{tag}_finetune.pth")
        assert tuned["cfg"] == pruned["cfg"] and tuned["prune"]["ratio"] == ratio
        assert tuned["best_acc"] == max(tuned["history"]["test_acc"])
        assert tuned["config"]["optimizer"] == "adam" and tuned["config"]["epochs"] == 1
        with (ck / f"model_prune_{tag}_finetune_metrics.csv").open() as fh:
            assert len(list(csv.DictReader(fh))) == 1
        params[tag] = meta["params_after"]
        params["before"] = meta["params_before"]
        assert f"{meta['params_after']:,}" in r.stdout  # the summary table
    assert "pipeline summary" in r.stdout
    # pruning removes channels, at least as many at the larger ratio
    assert params["60"] <= params["30"] < params["before"], params


# ---------------------------------------------------------------- bad inputs (issue 3)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", ["0", "1.5"])  # more values in-process (test_prune)
def test_prune_ratio_outside_open_interval(tmp_path, ratio):
    src = make_small_checkpoint(tmp_path / "s.pth", width=2)
    out = tmp_path / "p.pth"
    out.write_bytes(b"keep me")
    r = run_cli("prune", "--checkpoint", src, "--ratio", ratio, "--output", out, "--no-eval",
                "--cpu", cwd=tmp_path)
    assert_one_line_error(r, f"--ratio {float(ratio)}", "(0, 1)")
    assert out.read_bytes() == b"keep me"  # nothing overwritten


@pytest.mark.slow
def test_finetune_epochs_zero(tmp_path):
    src = make_small_checkpoint(tmp_path / "s.pth", width=2)
    r = run_cli("finetune", "--checkpoint", src, "--epochs", "0", "--dataset", "synthetic",
                *FAST, cwd=tmp_path)
    assert_one_line_error(r, "--epochs 0")
    assert not (tmp_path / "s_finetune.pth").exists()
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_prune_non_finite_gamma_checkpoint(tmp_path):
    model = ResNet50(widths=small_cfg(2))
    with torch.no_grad():
        model.layer2[0].bn2.weight.fill_(float("nan"))  # a diverged run
    src = tmp_path / "model_sparse.pth"
    save_checkpoint(src, make_checkpoint(model))
    out = tmp_path / "p.pth"
    r = run_cli("prune", "--checkpoint", src, "--ratio", "0.5", "--output", out, "--cpu",
                cwd=tmp_path)
    assert_one_line_error(r, "not finite")
    assert not out.exists()


@pytest.mark.slow
def test_pipeline_with_two_processes(tmp_path):
    """Under DDP every rank starts a stage only after the main process wrote the previous
    stage's checkpoint (a rank reading model_sparse.pth early failed or pruned stale weights)."""
    r = run_cli("pipeline", "--dataset", "synthetic", "--cpu", "--gpus", "2", "--ratios", "0.5",
                "--train-epochs", "2", "--finetune-epochs", "1", "--synthetic-train", "64",
                "--synthetic-test", "32", "--batch-size", "16", "--finetune-batch-size", "16",
                "--limit-batches", "1", "--num-workers", "0", "--workdir", "w", cwd=tmp_path,
                timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = tmp_path / "w" / "checkpoints"
    sparse = load_checkpoint(ck / "model_sparse.pth")
    pruned = load_checkpoint(ck / "model_prune_50.pth")
    assert sparse["config"]["num_processes"] == 2
    assert safe_torch_load(ck / "model_sparse.last.pth")["epoch"] == 2  # both epochs ran
    assert pruned["prune"]["acc_before"] == sparse["best_acc"]  # pruned the final best weights
    tuned = load_checkpoint(ck / "model_prune_50_finetune.pth")
    assert tuned["config"]["batch_size"] == 16 and tuned["cfg"] == pruned["cfg"]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU (inductor) needs a C++ compiler")
def test_finetune_compile(tmp_path):
    """--compile really compiles (inductor on CPU), reports the compile time on its own line
    once, and saves a checkpoint without torch.compile's ``_orig_mod.`` key prefix."""
    src = make_small_checkpoint(tmp_path / "s.pth", width=2)
    r = run_cli("finetune", "--checkpoint", src, "--compile", "--epochs", "2",
                "--dataset", "synthetic", "--synthetic-train", "60", "--synthetic-test", "20",
                *FAST, cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("torch.compile: ")]
    assert len(lines) == 1 and "first step of epoch 1" in lines[0], r.stdout
    assert float(lines[0].split()[1]) >= 0
    tuned = safe_torch_load(tmp_path / "s_finetune.pth")
    assert tuned["config"]["compile"] is True
    assert not [k for k in tuned["state_dict"] if "_orig_mod" in k or "module." in k]
    load_checkpoint(tmp_path / "s_finetune.pth")  # rebuilds and loads strictly


def test_a_run_says_its_threads_first_and_threads_sets_them(tmp_path):
    """The header line names the process count and the threads chosen (issue 20 §7): the run's
    own --threads wins over OMP_NUM_THREADS, which wins over the free cores."""
    args = ["train", "--dataset", "synthetic", "--synthetic-train", "40", "--synthetic-test",
            "20", "--image-size", "16", "--arch", "resnet18", "--epochs", "1", *FAST,
            "--output", "a.pth"]
    res = run_cli(*args, "--threads", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == ("train on cpu: 1 process, 2 threads per process "
                                          "(--threads)")
    res = run_cli(*args, "--overwrite", cwd=tmp_path)  # tests' env: OMP_NUM_THREADS=1
    assert res.stdout.splitlines()[0] == ("train on cpu: 1 process, 1 thread per process "
                                          "(OMP_NUM_THREADS=1)")
