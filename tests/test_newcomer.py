"""What a newcomer hit (issue 20 §8): a checkpoint's own data settings are the defaults of the
commands that read it, ``info`` says what the file is, export's missing-extra error says it
once."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import FAST, make_small_checkpoint, run_cli
from trainer.config.settings import RunConfig
from trainer.errors import UserError

SYNTHETIC = {"dataset": "synthetic", "image_size": 16, "synthetic_train": 40,
             "synthetic_test": 20, "data_dir": "nowhere"}


def test_finetune_takes_the_data_its_checkpoint_was_trained_on(tmp_path):
    """`finetune --checkpoint demo/checkpoints/model_prune_50.pth` ran on CIFAR-10 (and failed
    for lack of it): the file records the synthetic set at 16 px."""
    src = make_small_checkpoint(tmp_path / "p.pth", config=SYNTHETIC)
    out = tmp_path / "o.pth"
    r = run_cli("finetune", "--checkpoint", str(src), "--epochs", "1", "--output", str(out),
                *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "data as p.pth was trained: --dataset synthetic, --data-dir nowhere, " \
           "--image-size 16, --synthetic-train 40, --synthetic-test 20" in r.stdout
    from trainer.files.checkpoint import load_checkpoint

    saved = load_checkpoint(out)["config"]
    assert {k: saved[k] for k in SYNTHETIC} == SYNTHETIC


def test_flags_given_win_over_the_checkpoint(tmp_path):
    from trainer.commands.train import inherit_data_settings

    src = make_small_checkpoint(tmp_path / "p.pth", config=SYNTHETIC)
    run = RunConfig(command="evaluate", checkpoint=str(src), dataset=None, data_dir=None,
                    image_size=24, synthetic_train=None, synthetic_test=8)
    got = inherit_data_settings(run, quiet=True)
    assert (got.dataset, got.image_size, got.synthetic_train, got.synthetic_test) == \
        ("synthetic", 24, 40, 8)
    lab = make_small_checkpoint(tmp_path / "lab.pth")  # records no settings: the defaults
    got = inherit_data_settings(run.replace(checkpoint=str(lab), image_size=None), quiet=True)
    assert (got.dataset, got.data_dir, got.image_size) == ("cifar10", "./data", 32)


def test_info_says_what_the_file_is(tmp_path):
    from trainer.cli.info import _format, history_line
    from trainer.commands.info import describe

    unpruned = make_small_checkpoint(tmp_path / "u.pth", width=None) if False else None
    del unpruned
    src = make_small_checkpoint(tmp_path / "p.pth", config={"epochs": 2},
                                history={"epoch": [1], "test_acc": [40.0]}, best_acc=40.0,
                                best_epoch=1)
    d = describe(str(src))
    assert history_line(d) == ("history: 2 epochs run; this file holds the first 1 (up to its "
                               "best epoch), best test accuracy 40.00% at epoch 1")
    assert _format(d) == "slimtune checkpoint"


def test_info_of_an_unpruned_model_and_of_a_resume_file(tmp_path):
    import torch

    from trainer.files.checkpoint import make_checkpoint
    from trainer.models.build import new_model

    model = new_model("vgg11", 10)
    ckpt = make_checkpoint(model)
    torch.save(ckpt, tmp_path / "v.pth")
    torch.save({"kind": "resume", "model": ckpt["state_dict"], "arch": "vgg11",
                "cfg": ckpt["cfg"], "optimizer": {}, "epoch": 1, "best_acc": 1.0,
                "best_epoch": 1, "history": {}, "config": {}, "finished": False},
               tmp_path / "v.last.pth")
    r = run_cli("info", "v.pth", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "channels per stage (unpruned: kept = full)" in r.stdout
    assert "pruned channels per stage" not in r.stdout
    r = run_cli("info", "v.last.pth", cwd=tmp_path)
    assert "(slimtune resume state: the weights of its last finished epoch, not its best)" \
        in r.stdout and "lab {cfg" not in r.stdout
    first = r.stdout.splitlines()[0]
    assert first.startswith("v.last.pth  vgg11, 10 classes") and first.endswith("best)")


@pytest.mark.parametrize("missing, says", [
    (("onnx", "onnxruntime"), "needs onnx and onnxruntime, which are not installed; pip"),
    (("onnxruntime",), "needs onnx and onnxruntime, and onnxruntime is not installed; pip"),
])
def test_the_missing_export_extra_is_said_once(monkeypatch, missing, says):
    from trainer.config.exports import require_onnx

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(UserError) as err:
        require_onnx()
    assert says in str(err.value)
    assert "and onnx and onnxruntime" not in str(err.value)  # was: '..., and onnx and ...'
