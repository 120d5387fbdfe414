"""The transforms a run uses (issue 22 §3): ImageNet's for an image folder at 64 px or more
(RandomResizedCrop + flip; eval: short side to size/0.875, centre crop; ImageNet mean/std), the
CIFAR pad-and-crop below, and ``--augment`` to choose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tests.fakedata import write_imagefolder
from tests.helpers import FAST, run_cli
from trainer.data.common import IMAGENET_MEAN, IMAGENET_STD, augment_of
from trainer.data.datasets import build_datasets
from trainer.data.loaders import TorchTrainLoader, make_train_loader
from trainer.files.checkpoint import load_checkpoint


def _kinds(tf: T.Compose) -> list[str]:
    return [type(t).__name__ for t in tf.transforms]


@pytest.mark.parametrize("augment, size, dataset, chosen", [
    ("auto", 63, "imagefolder", "cifar"), ("auto", 64, "imagefolder", "imagenet"),
    ("auto", 224, "imagefolder", "imagenet"), ("auto", 224, "synthetic", "cifar"),
    ("auto", 32, "cifar10", "cifar"), ("cifar", 224, "imagefolder", "cifar"),
    ("imagenet", 32, "synthetic", "imagenet"), ("none", 224, "imagefolder", "none"),
])
def test_which_transforms_a_run_uses(augment, size, dataset, chosen):
    assert augment_of(augment, size, dataset) == chosen


def test_an_image_folder_at_64_px_gets_the_imagenet_transforms(tmp_path: Path):
    write_imagefolder(tmp_path, classes=2, per_class=2, size=(120, 80))
    ds = build_datasets("imagefolder", str(tmp_path), image_size=64)
    train, test = ds.train.transform, ds.test.transform
    assert _kinds(train) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                             "Normalize"]
    assert _kinds(test) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert test.transforms[0].size == 73 and test.transforms[1].size == (64, 64)  # 64/0.875
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert tuple(test.transforms[3].mean) == IMAGENET_MEAN
    for split in (ds.train, ds.test):
        x, y = split[0]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert x.shape == (3, 64, 64) and isinstance(y, int)


def test_below_64_px_an_image_folder_keeps_the_cifar_pad_and_crop(tmp_path: Path):
    write_imagefolder(tmp_path, classes=2, per_class=2)
    ds = build_datasets("imagefolder", str(tmp_path), image_size=32)
    assert _kinds(ds.train.transform) == ["Resize", "RandomCrop", "RandomHorizontalFlip",
                                          "ToTensor", "Normalize"]
    assert ds.train.transform.transforms[1].padding == 4
    assert _kinds(ds.test.transform) == ["Resize", "ToTensor", "Normalize"]
    assert ds.train[0][0].shape == ds.test[0][0].shape == (3, 32, 32)


def test_imagenet_eval_takes_the_centre_and_cifar_eval_squashes_the_whole(tmp_path: Path):
    """A 300x100 image in thirds (red, green, blue): the centre crop of the short side resized
    to 73 is all green; the CIFAR-style resize to a square keeps red and blue."""
    write_imagefolder(tmp_path, classes=2, per_class=1)
    stripes = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        stripes.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
    for split in ("train", "val"):
        stripes.save(tmp_path / split / "class0" / "img0.png")
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD)
    centre = build_datasets("imagefolder", str(tmp_path), image_size=64).test
    x = centre[[p for p, _ in centre.samples].index(str(tmp_path / "val/class0/img0.png"))][0]
    assert torch.allclose(x, green[:, None, None].expand_as(x), atol=0.05)
    whole = build_datasets("imagefolder", str(tmp_path), image_size=64, augment="cifar").test
    x = whole[[p for p, _ in whole.samples].index(str(tmp_path / "val/class0/img0.png"))][0]
    assert x.shape == (3, 64, 64) and x[0, :, 0].mean() > 1.5 and x[2, :, -1].mean() > 1.5


def test_augment_none_trains_on_the_eval_transform_and_imagenet_on_synthetic(tmp_path: Path):
    ds = build_datasets("synthetic", "", image_size=16, synthetic_train=4, synthetic_test=2,
                        augment="none")
    assert ds.train.transform is ds.test.transform
    assert _kinds(ds.train.transform) == ["ToTensor", "Normalize"]
    ds = build_datasets("synthetic", "", image_size=16, synthetic_train=4, synthetic_test=2,
                        augment="imagenet")
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert ds.train_arrays is None  # the gpu loader augments the CIFAR way only: torch's runs
    loader = make_train_loader(ds, batch_size=2, num_workers=0, kind="gpu")
    assert isinstance(loader, TorchTrainLoader)
    assert next(iter(loader))[0].shape == (2, 3, 16, 16)


@pytest.mark.slow  # two CLI runs (~10-20 s on 2 busy cores)
def test_train_records_augment_and_refuses_an_unknown_one(tmp_path: Path):
    args = ["train", "--dataset", "synthetic", "--synthetic-train", "20", "--synthetic-test",
            "10", "--image-size", "16", "--arch", "resnet18", "--epochs", "1", *FAST,
            "--output", "a.pth"]
    res = run_cli(*args, "--augment", "imagenet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(tmp_path / "a.pth")["config"]["augment"] == "imagenet"
    res = run_cli(*args, "--augment", "autoaugment", "--overwrite", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--augment 'autoaugment'" in res.stderr and "cifar" in res.stderr
