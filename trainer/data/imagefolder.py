"""An image folder: ``<dir>/train/<class>/*`` and ``<dir>/val/<class>/*`` (or ``test/``), links
followed once, each image counted once by its resolved path, loops skipped with a note."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torchvision
from PIL import Image, UnidentifiedImageError

from trainer.data.common import IMAGENET_MEAN, IMAGENET_STD, Datasets, one_line, transforms_for
from trainer.errors import DataError, cut

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _load_rgb(path: str) -> Image.Image:
    """Open any image as RGB (grayscale, palette and RGBA images are converted)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({one_line(e)}); replace or delete "
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
        reason = one_line(e).split(". ")[0]
        raise DataError(f"no usable images in {root} ({reason}); put images in "
                        f"{root}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})") from None
    return ds


def _test_split_name(root: Path) -> str:
    return "val" if (root / "val").is_dir() or not (root / "test").is_dir() else "test"


def imagefolder_classes(root: Path) -> int:
    """Class folders of train/ (the splits must exist); the images are not listed."""
    for split in ("train", _test_split_name(root)):
        if not (root / split).is_dir():
            raise DataError(f"image folder {root / split} not found; create "
                            f"{root / split}/<class>/<images> or pass --data-dir")
    return len([e for e in os.scandir(root / "train") if e.is_dir()])


def build_imagefolder(data_dir: str, image_size: int, augment: str = "cifar") -> Datasets:
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
