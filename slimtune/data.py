"""``slimtune.dataset``: the data sets the CLI trains on, as torch Datasets."""

from __future__ import annotations

from trainer.data.common import Datasets
from trainer.data.datasets import build_datasets


def dataset(name: str = "synthetic", data_dir: str = "data", *, image_size: int = 32,
            download: bool = False, synthetic_train: int = 5000, synthetic_test: int = 1000,
            seed: int = 0) -> Datasets:
    """The train and test splits of ``name`` (cifar10, cifar100, imagefolder or synthetic)
    with the CLI's transforms: ``.train`` and ``.test`` are Datasets of (normalised image,
    label), ``.num_classes`` the class count. ``synthetic`` draws ``synthetic_train`` /
    ``synthetic_test`` images of 10 classes from ``seed`` (offline, seconds); cifar reads
    ``data_dir`` (downloading only with ``download``); imagefolder reads
    ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``."""
    return build_datasets(name, data_dir, image_size=image_size, download=download,
                          synthetic_train=synthetic_train, synthetic_test=synthetic_test,
                          seed=seed)
