"""What every dataset of trainer.data shares: the ``Datasets`` record, the transforms (CIFAR-style
or ImageNet-style, :func:`augment_of`), and the in-memory arrays the ``gpu`` loader reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Image folders hold arbitrary photos: the ImageNet statistics are the usual default for them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DOWNLOAD_SOCKET_TIMEOUT = 20.0  # seconds one network read may stall before the download fails


@dataclass
class Datasets:
    """The train and test splits of one dataset plus what the model and loaders need to know."""

    name: str
    train: Dataset  # (normalised float CHW tensor, int label), train augmentation
    test: Dataset  # (normalised float CHW tensor, int label), test transform
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # raw (uint8 (N, H, W, 3), int64 (N,)) for the gpu loader; None for imagefolder
    train_arrays: tuple[torch.Tensor, torch.Tensor] | None
    test_arrays: tuple[torch.Tensor, torch.Tensor] | None
    classes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what reading the files skipped, said once by the main process



# eval at ImageNet sizes: the short side resized to size / CROP_FRACTION, then the centre
# size x size crop (224 px: resize to 256, crop 224).
CROP_FRACTION = 0.875
IMAGENET_FROM = 64  # px: from this --image-size up, auto picks the ImageNet transforms


def augment_of(augment: str, image_size: int, dataset: str) -> str:
    """The transforms a run uses: ``augment``, or for ``auto`` imagenet for an image folder at
    IMAGENET_FROM px or more, else cifar (CIFAR and synthetic images are the run's size)."""
    if augment != "auto":
        return augment
    big_photos = dataset == "imagefolder" and image_size >= IMAGENET_FROM
    return "imagenet" if big_photos else "cifar"


def transforms_for(augment: str, image_size: int, mean, std,
                   resize: bool = False) -> tuple[T.Compose, T.Compose]:
    """(train, eval) PIL -> tensor transforms of a resolved ``augment`` (:func:`augment_of`):
    imagenet (the ImageNet statistics: pass them), cifar, or none (train as eval)."""
    if augment == "imagenet":
        return (T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(mean, std)]),
                T.Compose([T.Resize(int(image_size / CROP_FRACTION)), T.CenterCrop(image_size),
                           T.ToTensor(), T.Normalize(mean, std)]))
    test = eval_transform(image_size, mean, std, resize)
    return (test if augment == "none" else train_transform(image_size, mean, std, resize)), test


def train_transform(image_size: int, mean, std, resize: bool = False) -> T.Compose:
    """PIL image -> augmented, normalised tensor (RandomCrop with padding + horizontal flip)."""
    head = [T.Resize((image_size, image_size))] if resize else []
    return T.Compose(head + [T.RandomCrop(image_size, padding=image_size // 8),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(image_size: int, mean, std, resize: bool = False) -> T.Compose:
    """PIL image -> normalised tensor, no augmentation."""
    head = [T.Resize((image_size, image_size))] if resize else []
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


class ArrayDataset(Dataset):
    """uint8 (N, H, W, 3) images + labels, passed through the same PIL transforms as CIFAR."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.data, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def normalisation(augment: str, mean, std) -> tuple[tuple, tuple]:
    """The normalisation: ImageNet's with the ImageNet transforms, else the data set's."""
    return (IMAGENET_MEAN, IMAGENET_STD) if augment == "imagenet" else (mean, std)


def in_memory(ds: Datasets, augment: str) -> Datasets:
    """``ds`` without its arrays unless ``augment`` is cifar: the gpu loader augments them the
    CIFAR way only, so other transforms run in the torch loader."""
    if augment != "cifar":
        ds.train_arrays = ds.test_arrays = None
    return ds


def as_tensors(images: np.ndarray, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-memory torch views of uint8 NHWC images and int64 labels."""
    return (torch.from_numpy(np.ascontiguousarray(images)),
            torch.as_tensor(np.asarray(labels), dtype=torch.int64))



def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (for DataError messages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
