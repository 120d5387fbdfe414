"""Small fake datasets in the real on-disk formats, for fast offline tests.

The CIFAR writers produce torchvision's python folders (pickled dicts with a uint8 (N, 3072)
'data' array of row-major R, G, B planes); only the sizes and the md5 sums differ from the real
release. Images are weakly learnable: each class has its own mean colour plus noise.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]


def class_colour(label: int, num_classes: int) -> np.ndarray:
    """A distinct mean RGB colour (0..255) per class: evenly spaced hues."""
    hue = label / num_classes
    rgb = 0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    return rgb * 255


def fake_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3): the class colour plus Gaussian noise (std 40 of 255)."""
    means = np.stack([class_colour(int(c), num_classes) for c in labels])
    img = means[:, None, None, :] + rng.normal(0, 40, (len(labels), size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) with the R plane, then G, then B (the CIFAR layout)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the release files are Python 2 pickles


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes)


def write_fake_cifar10(root: Path, n_per_batch: int = 20, n_test: int = 30,
                       seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/ (5 train batches, test_batch, batches.meta); return it."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    splits = [(f"data_batch_{i}", n_per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    for fname, n, batch_label in splits + [("test_batch", n_test, "testing batch 1 of 1")]:
        labels = _labels(n, 10, rng)
        _dump(folder / fname, {"batch_label": batch_label, "labels": labels.tolist(),
                               "data": _rows(fake_images(labels, 10, rng)),
                               "filenames": [f"fake_{fname}_{i}.png" for i in range(n)]})
    _dump(folder / "batches.meta", {"label_names": CIFAR10_LABELS,
                                    "num_cases_per_batch": n_per_batch, "num_vis": 3072})
    return folder


def write_fake_cifar100(root: Path, n_train: int = 200, n_test: int = 100,
                        seed: int = 0) -> Path:
    """Write root/cifar-100-python/ (train, test, meta) with 100 fine / 20 coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, 100, rng)
        _dump(folder / fname, {"filenames": [f"fake_{fname}_{i}.png" for i in range(n)],
                               "batch_label": f"{fname}ing batch 1 of 1",
                               "fine_labels": fine.tolist(),
                               "coarse_labels": (fine // 5).tolist(),
                               "data": _rows(fake_images(fine, 100, rng))})
    _dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return folder


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 4,
                      split_names: Sequence[str] = ("train", "val"),
                      size: tuple[int, int] = (40, 24), seed: int = 0) -> Path:
    """Write root/<split>/class<k>/img<i>.png RGB images of ``size`` (W, H); return root."""
    rng = np.random.default_rng(seed)
    for split in split_names:
        for k in range(classes):
            folder = Path(root) / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            labels = np.full(per_class, k)
            imgs = fake_images(labels, classes, rng, size=max(size))[:, :size[1], :size[0]]
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"img{i}.png")
    return Path(root)


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut ``path`` to its first ``keep_fraction`` of bytes (a partial download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep_fraction)])
