"""Datasets: CIFAR-10/100, an image folder, built-in synthetic shapes (loaders: trainer.data.loaders).

Every dataset yields ``(normalised float CHW tensor, int label)``; the train split with the
CIFAR augmentation (random crop with zero padding image_size // 8, horizontal flip), or for an
image folder at 64 px or more ImageNet's (RandomResizedCrop + flip; eval: resize the short side
to size / 0.875, centre crop), or what ``augment`` says (:func:`augment_of`). Datasets that
fit in memory also expose their raw uint8 arrays for the device-resident ``gpu`` loader.

Problems the user can fix (missing or corrupt files, empty folders) raise
:class:`trainer.errors.DataError` with a one-line message naming the problem and the fix.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from trainer.data import synthetic
from trainer.config.settings import DATASETS
from trainer.errors import DataError, cut

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Image folders hold arbitrary photos: the ImageNet statistics are the usual default for them.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
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
        return _build_cifar(name, data_dir, image_size, download, augment)
    if name == "imagefolder":
        return _build_imagefolder(data_dir, image_size, augment)
    if name == "synthetic":
        return _build_synthetic(image_size, synthetic_train, synthetic_test, seed, augment)
    raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def dataset_classes(name: str, data_dir: str, *, image_size: int = 32, download: bool = True,
                    synthetic_train: int = 5000, synthetic_test: int = 1000) -> int | None:
    """The class count of dataset ``name``, from the cheap checks of :func:`build_datasets`
    (files and folders there, sizes sane; nothing is read, downloaded or written); None when
    it is yet to be downloaded. DataError for what build_datasets would refuse the same way.
    """
    if name in _CIFAR:
        there = _cifar_there(name, data_dir, image_size, download)
        if there:
            _check_cifar_present(*_CIFAR[name][:2], data_dir)
        return _CIFAR[name][3] if there else None
    if name == "imagefolder":
        return _imagefolder_classes(Path(data_dir))
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


# --------------------------------------------------------------------------- CIFAR


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
        raise DataError(f"{path} is truncated or corrupt ({_one_line(e)}); delete it and "
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


_CIFAR = {  # name -> (class, title, label key, num_classes, mean, std)
    "cifar10": (LocalCIFAR10, "CIFAR-10", "labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (LocalCIFAR100, "CIFAR-100", "fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


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
                        f"({_one_line(e)}); put {folder}/ in {data_dir} or pass "
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


def _check_cifar_present(cls: type, title: str, data_dir: str) -> None:
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
    _check_cifar_present(cls, title, data_dir)
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


def _cifar_there(name: str, data_dir: str, image_size: int, download: bool) -> bool:
    """True if the CIFAR folder exists; DataError if it cannot be used and is not to be
    downloaded (False: download it)."""
    cls, title = _CIFAR[name][:2]
    if image_size != 32:
        raise DataError(f"{title} images are 32x32 but image size {image_size} was asked; "
                        "pass --image-size 32")
    if (Path(data_dir) / cls.base_folder).is_dir():
        return True
    if not download:
        raise DataError(f"{title} not found in {data_dir} (download disabled); put "
                        f"{cls.base_folder}/ in {data_dir} or pass --data-dir")
    return False


def _build_cifar(name: str, data_dir: str, image_size: int, download: bool,
                 augment: str = "cifar") -> Datasets:
    cls, title, label_key, num_classes, mean, std = _CIFAR[name]
    if not _cifar_there(name, data_dir, image_size, download):
        _download_cifar(cls, title, data_dir)
    _check_cifar_files(cls, title, data_dir, label_key, num_classes)
    mean, std = _stats(augment, mean, std)
    train_tf, test_tf = transforms_for(augment, 32, mean, std)
    try:  # the files passed the safe unpickler above, so torchvision's pickle.load is safe
        train = cls(data_dir, train=True, transform=train_tf)
        test = cls(data_dir, train=False, transform=test_tf)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise DataError(f"{title} in {data_dir} could not be read ({_one_line(e)}); delete "
                        f"{cls.base_folder}/ and download the dataset again") from None
    for split in (train, test):  # one contiguous copy, shared with the gpu loader's arrays
        split.data = np.ascontiguousarray(split.data)
    return _in_memory(Datasets(name, train, test, num_classes, mean, std,
                               _arrays(train.data, train.targets),
                               _arrays(test.data, test.targets), tuple(train.classes)), augment)


def _stats(augment: str, mean, std):
    """The normalisation: ImageNet's with the ImageNet transforms, else the data set's."""
    return (IMAGENET_MEAN, IMAGENET_STD) if augment == "imagenet" else (mean, std)


def _in_memory(ds: Datasets, augment: str) -> Datasets:
    """``ds`` without its arrays unless ``augment`` is cifar: the gpu loader augments them the
    CIFAR way only, so other transforms run in the torch loader."""
    if augment != "cifar":
        ds.train_arrays = ds.test_arrays = None
    return ds


def _arrays(images: np.ndarray, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared-memory torch views of uint8 NHWC images and int64 labels."""
    return (torch.from_numpy(np.ascontiguousarray(images)),
            torch.as_tensor(np.asarray(labels), dtype=torch.int64))


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
    mean, std = _stats(augment, synthetic.MEAN, synthetic.STD)
    train_tf, test_tf = transforms_for(augment, image_size, mean, std)
    return _in_memory(Datasets("synthetic", ArrayDataset(xtr, ytr, train_tf),
                               ArrayDataset(xte, yte, test_tf), synthetic.NUM_CLASSES, mean, std,
                               _arrays(xtr, ytr), _arrays(xte, yte), synthetic.CLASSES), augment)


# --------------------------------------------------------------------------- image folder


def _load_rgb(path: str) -> Image.Image:
    """Open any image as RGB (grayscale, palette and RGBA images are converted)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({_one_line(e)}); replace or delete "
                        "it") from None


class _ImageFolder(torchvision.datasets.DatasetFolder):
    """torchvision's DatasetFolder over :func:`scan_images` (links followed once, each image
    counted once, no empty class); what the scan skipped is in ``notes``."""

    notes: tuple[str, ...] = ()

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        samples, self.notes = scan_images(Path(directory), class_to_idx)
        return samples


def scan_images(root: Path, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]],
                                                                    tuple[str, ...]]:
    """(path, class index) of every image under ``root/<class>/`` and notes on what was
    skipped. Links are followed, except a folder link back into a folder it sits in (a loop:
    followed, 'emu/loop -> ..' made 41 nested copies of the set, and two such loops made paths
    without end) and a link into another class's folder (its images are that class's). Each
    image is counted once, by its resolved path. DataError naming the classes without one."""
    roots = {name: os.path.realpath(root / name) for name in class_to_idx}
    samples, seen, skipped = [], set(), {"loop": [], "other class": []}
    empty = []
    for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
        others = tuple(r for n, r in roots.items() if n != name and not _inside(roots[name], r))
        found = 0
        for path in _image_files(root / name, others, skipped):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                samples.append((path, index))
                found += 1
        if not found:
            empty.append(name)
    if empty:
        _no_images(root, empty, len(class_to_idx))
    notes = tuple(f"skipped {len(links)} link(s) {why} ({links[0][0]} -> {links[0][1]})"
                  for why, links in (("that loop back into their own folder", skipped["loop"]),
                                     ("into another class's folder", skipped["other class"]))
                  if links)
    return samples, notes


def _no_images(root: Path, empty: list[str], classes: int) -> None:
    exts = ", ".join(IMAGE_EXTENSIONS)
    if len(empty) == classes:
        raise DataError(f"no usable images in {root} (Found no valid file for the classes "
                        f"{cut(', '.join(empty), 200)}); put images in {root}/<class>/ "
                        f"(extensions {exts})")
    more = (f" (nor in {len(empty) - 1} other class folders: {cut(', '.join(empty[1:]), 120)})"
            if len(empty) > 1 else "")
    raise DataError(f"no usable images in {root}/{cut(empty[0], 80)}{more}, while the other "
                    f"classes have some; put images in it (extensions {exts}) or remove it")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _image_files(top: Path, others: tuple[str, ...],
                 skipped: dict[str, list[tuple[str, str]]]) -> Iterator[str]:
    """Image files under ``top`` (sorted, links followed); a folder link to a folder it sits
    in, or anything resolving into a folder of ``others``, is recorded in ``skipped``; no
    folder is read twice."""
    stack, visited = [str(top)], set()
    while stack:
        folder = stack.pop()
        here = os.path.realpath(folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        below = []
        for entry in entries:
            real = os.path.realpath(entry.path)
            if any(_inside(real, other) for other in others):
                skipped["other class"].append((entry.path, real))
            elif _is_dir(entry) and _inside(here, real):
                skipped["loop"].append((entry.path, real))
            elif _is_dir(entry) and real not in visited:
                visited.add(real)
                below.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and _is_file(entry):
                yield entry.path
        stack.extend(reversed(below))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _image_split(root: Path, size: int, train: bool,
                 augment: str = "cifar") -> torchvision.datasets.DatasetFolder:
    """Image folder dataset over root/<class>/*; DataError if root, classes or images lack."""
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; create {root}/<class>/<images> or "
                        "pass --data-dir")
    tf = transforms_for(augment, size, IMAGENET_MEAN, IMAGENET_STD, resize=True)[0 if train
                                                                                 else 1]
    try:
        ds = _ImageFolder(str(root), loader=_load_rgb, extensions=IMAGE_EXTENSIONS, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        # torchvision's message repeats the extension list; keep its first sentence
        reason = _one_line(e).split(". ")[0]
        raise DataError(f"no usable images in {root} ({reason}); put images in "
                        f"{root}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})") from None
    return ds


def _test_split_name(root: Path) -> str:
    return "val" if (root / "val").is_dir() or not (root / "test").is_dir() else "test"


def _imagefolder_classes(root: Path) -> int:
    """Class folders of train/ (the splits must exist); the images are not listed."""
    for split in ("train", _test_split_name(root)):
        if not (root / split).is_dir():
            raise DataError(f"image folder {root / split} not found; create "
                            f"{root / split}/<class>/<images> or pass --data-dir")
    return len([e for e in os.scandir(root / "train") if e.is_dir()])


def _build_imagefolder(data_dir: str, image_size: int, augment: str = "cifar") -> Datasets:
    root = Path(data_dir)
    test_name = _test_split_name(root)
    train = _image_split(root / "train", image_size, train=True, augment=augment)
    test = _image_split(root / test_name, image_size, train=False, augment=augment)
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes)) or ["(order)"]
        raise DataError(f"train/ and {test_name}/ in {root} have different class folders "
                        f"(e.g. {cut(only[0], 80)}); give both the same class subfolders")
    return Datasets("imagefolder", train, test, len(train.classes), IMAGENET_MEAN, IMAGENET_STD,
                    None, None, tuple(train.classes), notes=train.notes + test.notes)
