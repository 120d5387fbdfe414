"""The other architectures through the real CLI: pipeline end to end, the official code's files
evaluated and fine-tuned, a 2-process DDP fine-tune of a pruned VGG, bad --arch values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fakedata import write_fake_cifar10
from tests.helpers import FAST, run_cli
from tests.test_archs import official_resnet164_state, official_vgg_state
from tests.test_distributed import check_finetune_output
from trainer.files.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.build import new_model
from trainer.prune.engine import prune

SMALL = ["--dataset", "synthetic", "--cpu", "--synthetic-train", "64", "--synthetic-test", "32",
         "--train-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
         "--finetune-batch-size", "16", "--num-workers", "0"]


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow  # ~20-40 s each on 2 cores
@pytest.mark.parametrize("arch", ["vgg11", "torchvision:resnet18"])
def test_pipeline_runs_end_to_end_for(arch, tmp_path):
    result = run_cli("pipeline", "--arch", arch, *SMALL, "--workdir", "w", cwd=tmp_path,
                     timeout=600)
    ok(result)
    ckpts = tmp_path / "w" / "checkpoints"
    for name in ("model_sparse.pth", "model_prune_50.pth", "model_prune_90_finetune.pth"):
        assert load_checkpoint(ckpts / name)["arch"] == arch, name
    sparse = load_checkpoint(ckpts / "model_sparse.pth")
    pruned = load_checkpoint(ckpts / "model_prune_90.pth")
    assert pruned["prune"]["params_after"] < sparse_params(sparse)
    report = (tmp_path / "w" / "report.md").read_text()
    assert f"| {arch} |" in report  # the arch column of the results table


def sparse_params(ckpt: dict) -> int:
    return sum(v.numel() for k, v in ckpt["state_dict"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                  "indexes")))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar10(root, n_per_batch=20, n_test=31)
    return root


@pytest.mark.slow
def test_an_official_vgg19_file_evaluates_and_fine_tunes(data, tmp_path):
    cfg = list(new_model("vgg19", 10).widths)
    cfg = [v if v == "M" else max(4, v // 8) for v in cfg]
    torch.save({"cfg": cfg, "state_dict": official_vgg_state(cfg)}, tmp_path / "vgg.pth")
    common = ["--dataset", "cifar10", "--data-dir", str(data), "--no-download", *FAST]
    ok(run_cli("evaluate", tmp_path / "vgg.pth", *common, cwd=tmp_path))
    out = tmp_path / "ft.pth"
    ok(run_cli("finetune", "--checkpoint", tmp_path / "vgg.pth", "--epochs", "1",
               "--output", out, *common, cwd=tmp_path))
    tuned = load_checkpoint(out)
    assert tuned["arch"] == "vgg19" and tuned["cfg"] == cfg


@pytest.mark.slow
def test_an_official_resnet164_file_evaluates_and_fine_tunes(data, tmp_path):
    cfg = [max(1, w // 8) for w in new_model("resnet164", 10).widths]
    torch.save({"cfg": cfg, "state_dict": official_resnet164_state(cfg)}, tmp_path / "r.pth")
    common = ["--dataset", "cifar10", "--data-dir", str(data), "--no-download", *FAST]
    ok(run_cli("evaluate", tmp_path / "r.pth", *common, cwd=tmp_path))
    out = tmp_path / "ft.pth"
    ok(run_cli("finetune", "--checkpoint", tmp_path / "r.pth", "--epochs", "1",
               "--limit-batches", "2", "--output", out, *common, cwd=tmp_path))
    tuned = load_checkpoint(out)
    assert tuned["arch"] == "resnet164" and tuned["cfg"] == cfg


@pytest.mark.slow  # two processes, ~20-40 s
def test_a_two_process_fine_tune_of_a_pruned_vgg11_measures_exactly(data, tmp_path):
    torch.manual_seed(0)
    model = new_model("vgg11", 10)
    src = tmp_path / "vgg11_pruned.pth"
    save_checkpoint(src, make_checkpoint(prune(model, 0.5).model))
    out = tmp_path / "out"
    ok(run_cli("finetune", "--checkpoint", src, "--dataset", "cifar10", "--data-dir", data,
               "--no-download", *FAST, "--epochs", "2", "--limit-batches", "2", "--gpus", "2",
               "--output", out / "x.pth", "--plot", out / "x.png", cwd=tmp_path, timeout=600))
    ckpt = check_finetune_output(out, data, epochs=2, extra_files={"accelerate_cpu_ddp_2proc.yaml"})
    assert ckpt["arch"] == "vgg11"


@pytest.mark.parametrize("arch, needle", [
    ("alexnet", "--arch 'alexnet' is unknown; use one of resnet50"),
    ("torchvision:fasterrcnn_resnet50_fpn", "'fasterrcnn_resnet50_fpn' is not a torchvision "
                                            "classification model"),
])
def test_a_bad_arch_is_one_line_and_exit_2(arch, needle, tmp_path):
    result = run_cli("train", "--arch", arch, "--dataset", "synthetic", "--cpu", "--epochs", "1",
                     "--synthetic-train", "16", "--synthetic-test", "8", cwd=tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert not list(tmp_path.iterdir())  # nothing written
