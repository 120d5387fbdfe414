"""Datasets by name: CIFAR-10/100 (trainer.data.cifar), an image folder (trainer.data.imagefolder),
built-in synthetic shapes (here); the loaders: trainer.data.loaders.

Every dataset yields ``(normalised float CHW tensor, int label)``; the train split with the
CIFAR augmentation (random crop with zero padding image_size // 8, horizontal flip), or for an
image folder at 64 px or more ImageNet's (RandomResizedCrop + flip; eval: resize the short side
to size / 0.875, centre crop), or what ``augment`` says (:func:`augment_of`). Datasets that
fit in memory also expose their raw uint8 arrays for the device-resident ``gpu`` loader.

Problems the user can fix (missing or corrupt files, empty folders) raise
:class:`trainer.errors.DataError` with a one-line message naming the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config.settings import DATASETS
from trainer.data import synthetic
from trainer.data.cifar import CIFAR, build_cifar, check_cifar_present, cifar_there
from trainer.data.common import (
    ArrayDataset,
    Datasets,
    as_tensors,
    augment_of,
    in_memory,
    normalisation,
    transforms_for,
)
from trainer.data.imagefolder import build_imagefolder, imagefolder_classes
from trainer.errors import DataError


def build_datasets(name: str, data_dir: str, *, image_size: int = 32, download: bool = True,
                   synthetic_train: int = 5000, synthetic_test: int = 1000,
                   seed: int = 0, augment: str = "auto") -> Datasets:
    """Load dataset ``name`` (one of DATASETS) from ``data_dir``; raise DataError if unusable.

    cifar10/cifar100 read torchvision's python folders (downloaded if absent and ``download``);
    imagefolder reads ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``);
    synthetic draws ``synthetic_train`` / ``synthetic_test`` images from ``seed`` (offline).
    ``augment``: the transforms (:func:`augment_of`).
    """
    augment = augment_of(augment, image_size, name)
    if name in ("cifar10", "cifar100"):
        return build_cifar(name, data_dir, image_size, download, augment)
    if name == "imagefolder":
        return build_imagefolder(data_dir, image_size, augment)
    if name == "synthetic":
        return _build_synthetic(image_size, synthetic_train, synthetic_test, seed, augment)
    raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def dataset_classes(name: str, data_dir: str, *, image_size: int = 32, download: bool = True,
                    synthetic_train: int = 5000, synthetic_test: int = 1000) -> int | None:
    """The class count of dataset ``name``, from the cheap checks of :func:`build_datasets`
    (files and folders there, sizes sane; nothing is read, downloaded or written); None when
    it is yet to be downloaded. DataError for what build_datasets would refuse the same way.
    """
    if name in CIFAR:
        there = cifar_there(name, data_dir, image_size, download)
        if there:
            check_cifar_present(*CIFAR[name][:2], data_dir)
        return CIFAR[name][3] if there else None
    if name == "imagefolder":
        return imagefolder_classes(Path(data_dir))
    if name == "synthetic":
        _check_synthetic(image_size, synthetic_train, synthetic_test)
        return synthetic.NUM_CLASSES
    raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def check_classes(name: str, classes: int | None, num_classes: int, what: str) -> None:
    """DataError when dataset ``name`` has another class count than ``what`` (a model's
    file); ``classes`` None (not yet downloaded) passes."""
    if classes is not None and classes != num_classes:
        raise DataError(f"the {name} data has {classes} classes but {what} has {num_classes}; "
                        "use a matching --dataset/--data-dir or checkpoint")


# --------------------------------------------------------------------------- synthetic


def _check_synthetic(image_size: int, n_train: int, n_test: int) -> None:
    if n_train < 1 or n_test < 1 or image_size < 8:
        raise DataError(f"synthetic data needs train/test sizes >= 1 and image size >= 8 (got "
                        f"{n_train}/{n_test}, {image_size}); pass positive --synthetic-train/"
                        "--synthetic-test and --image-size >= 8")


def _build_synthetic(image_size: int, n_train: int, n_test: int, seed: int,
                     augment: str = "cifar") -> Datasets:
    _check_synthetic(image_size, n_train, n_test)
    xtr, ytr = synthetic.make_synthetic(n_train, seed, image_size)
    xte, yte = synthetic.make_synthetic(n_test, seed + synthetic.TEST_SEED_OFFSET, image_size)
    mean, std = normalisation(augment, synthetic.MEAN, synthetic.STD)
    train_tf, test_tf = transforms_for(augment, image_size, mean, std)
    return in_memory(Datasets("synthetic", ArrayDataset(xtr, ytr, train_tf),
                              ArrayDataset(xte, yte, test_tf), synthetic.NUM_CLASSES, mean, std,
                              as_tensors(xtr, ytr), as_tensors(xte, yte), synthetic.CLASSES),
                     augment)
