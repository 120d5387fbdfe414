"""CIFAR-10/100 from torchvision's python folders: downloaded when absent, every pickle read by a
safe unpickler (numpy arrays only) before torchvision reads it, one-line DataError otherwise."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torchvision

from trainer.data.common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    Datasets,
    as_tensors,
    in_memory,
    normalisation,
    one_line,
    transforms_for,
)
from trainer.errors import DataError

DOWNLOAD_SOCKET_TIMEOUT = 20.0  # seconds one network read may stall before the download fails


_NUMPY_GLOBALS = {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _safe_unpickle(path: Path) -> Any:
    """Load a CIFAR pickle allowing numpy arrays only; DataError if it is corrupt or unsafe."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        if "refusing" in str(e):
            raise DataError(f"{path} holds objects other than arrays ({e}); it is not a CIFAR "
                            "file: delete it and download the dataset again") from None
        raise DataError(f"{path} is truncated or corrupt ({one_line(e)}); delete it and "
                        "download the dataset again") from None


class _LocalFilesMixin:
    """torchvision CIFAR that checks the files exist instead of matching their md5 sums.

    torchvision refuses any file whose md5 differs from the official release, which rules out
    the small fake CIFAR folders our tests write in the real on-disk format. Existence is enough
    here because :func:`_check_cifar_files` already opened every file with a safe unpickler and
    checked its arrays, which catches truncation and corruption with a clearer message.
    """

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, f)) for f, _ in
                   self.train_list + self.test_list)


class LocalCIFAR10(_LocalFilesMixin, torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 without the md5 check (see _LocalFilesMixin)."""

    meta: ClassVar[dict] = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # exists = ok


class LocalCIFAR100(_LocalFilesMixin, torchvision.datasets.CIFAR100):
    """torchvision's CIFAR-100 without the md5 check (see _LocalFilesMixin)."""

    meta: ClassVar[dict] = {**torchvision.datasets.CIFAR100.meta, "md5": None}


CIFAR = {  # name -> (class, title, label key, num_classes, mean, std)
    "cifar10": (LocalCIFAR10, "CIFAR-10", "labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (LocalCIFAR100, "CIFAR-100", "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _download_cifar(cls: type, title: str, data_dir: str) -> None:
    """Fetch and unpack the official archive into data_dir; DataError on any failure."""
    folder = cls.base_folder
    old = socket.getdefaulttimeout()
    # what a failed download must not leave behind: the folders it made, a partial archive
    made = _missing_folders(Path(data_dir))
    archive = Path(data_dir) / cls.filename
    had_archive = archive.exists()
    # torchvision's urlopen has no timeout: a firewalled network would hang for minutes.
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT)
    try:
        torchvision.datasets.utils.download_and_extract_archive(
            cls.url, data_dir, filename=cls.filename, md5=cls.tgz_md5)
    except BaseException as e:
        if not had_archive:
            archive.unlink(missing_ok=True)
        for made_folder in made:  # deepest first
            try:
                made_folder.rmdir()
            except OSError:
                break
        if not isinstance(e, Exception):
            raise  # a stop or an interrupt stays one
        raise DataError(f"{title} not found in {data_dir} and could not be downloaded "
                        f"({one_line(e)}); put {folder}/ in {data_dir} or pass "
                        "--data-dir") from None
    finally:
        socket.setdefaulttimeout(old)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    here = Path(os.path.abspath(folder))
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    return missing


def _cifar_file_names(cls: type) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def check_cifar_present(cls: type, title: str, data_dir: str) -> None:
    """Every CIFAR file is there (without reading them)."""
    folder = Path(data_dir) / cls.base_folder
    for fname in _cifar_file_names(cls):
        if not (folder / fname).is_file():
            raise DataError(f"{title} folder {folder} is incomplete (no {fname}); delete it "
                            "and download the dataset again")


def _check_cifar_files(cls: type, title: str, data_dir: str, label_key: str,
                       num_classes: int) -> None:
    """Every file present, loadable with the safe unpickler and shaped like CIFAR."""
    folder = Path(data_dir) / cls.base_folder
    check_cifar_present(cls, title, data_dir)
    for fname in _cifar_file_names(cls):
        path = folder / fname
        entry = _safe_unpickle(path)
        key = "data" if fname != cls.meta["filename"] else cls.meta["key"]
        if not isinstance(entry, dict) or key not in entry:
            raise DataError(f"{path} is not a {title} file (no '{key}'); delete it and "
                            "download the dataset again")
        if key == "data":
            _check_cifar_batch(path, entry, label_key, title)
            _check_cifar_labels(path, entry[label_key], title, num_classes)


def _check_cifar_batch(path: Path, entry: dict, label_key: str, title: str) -> None:
    data, labels = entry["data"], entry.get(label_key)
    ok = (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3 * 32 * 32 and labels is not None and len(labels) == len(data))
    if not ok:
        raise DataError(f"{path} does not hold {title} images (uint8 rows of 3072 with one "
                        f"'{label_key}' each); delete it and download the dataset again")


def _check_cifar_labels(path: Path, labels, title: str, num_classes: int) -> None:
    """Integer labels in 0..num_classes-1: a bad one would only fail mid-epoch."""
    arr = np.asarray(labels)
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= num_classes):
        bad = next((v for v in arr.tolist() if not (isinstance(v, int) and 0 <= v < num_classes)),
                   arr.flat[0])
        raise DataError(f"{path} has a label {bad!r} outside 0..{num_classes - 1}; it is not a "
                        f"{title} file: delete it and download the dataset again")


def cifar_there(name: str, data_dir: str, image_size: int, download: bool) -> bool:
    """True if the CIFAR folder exists; DataError if it cannot be used and is not to be
    downloaded (False: download it)."""
    cls, title = CIFAR[name][:2]
    if image_size != 32:
        raise DataError(f"{title} images are 32x32 but image size {image_size} was asked; "
                        "pass --image-size 32")
    if (Path(data_dir) / cls.base_folder).is_dir():
        return True
    if not download:
        raise DataError(f"{title} not found in {data_dir} (download disabled); put "
                        f"{cls.base_folder}/ in {data_dir} or pass --data-dir")
    return False


def build_cifar(name: str, data_dir: str, image_size: int, download: bool,
                 augment: str = "cifar") -> Datasets:
    cls, title, label_key, num_classes, mean, std = CIFAR[name]
    if not cifar_there(name, data_dir, image_size, download):
        _download_cifar(cls, title, data_dir)
    _check_cifar_files(cls, title, data_dir, label_key, num_classes)
    mean, std = normalisation(augment, mean, std)
    train_tf, test_tf = transforms_for(augment, 32, mean, std)
    try:  # the files passed the safe unpickler above, so torchvision's pickle.load is safe
        train = cls(data_dir, train=True, transform=train_tf)
        test = cls(data_dir, train=False, transform=test_tf)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise DataError(f"{title} in {data_dir} could not be read ({one_line(e)}); delete "
                        f"{cls.base_folder}/ and download the dataset again") from None
    for split in (train, test):  # one contiguous copy, shared with the gpu loader's arrays
        split.data = np.ascontiguousarray(split.data)
    return in_memory(Datasets(name, train, test, num_classes, mean, std,
                              as_tensors(train.data, train.targets),
                              as_tensors(test.data, test.targets), tuple(train.classes)), augment)
