"""Checkpoints as safetensors files: the weights, plus the metadata that rebuilds the model.

A safetensors file is a JSON header and raw tensor bytes: reading one runs no code, and the
Hugging Face and timm tools read it as it is. slimtune writes its checkpoint's fields into the
header's ``__metadata__`` (string -> string): ``arch`` as it is, every other field as JSON text::

    format: "pt", format_version: "1", arch: "resnet50", num_classes: "10",
    cfg: "[64, 8, 4, ...]", and where the checkpoint has them: best_acc, best_epoch,
    history, prune, config

:func:`load_safetensors` returns the same raw dict as ``safe_torch_load`` (``{arch,
num_classes, cfg, state_dict, ...}``), so ``trainer.files.checkpoint.load_checkpoint`` validates a
.safetensors file exactly like a .pth (the same one-line errors). A file without slimtune's
metadata comes back as a bare state_dict: its architecture is read from its keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trainer.config.exports import SAFETENSORS_SUFFIX as SUFFIX
from trainer.errors import CheckpointError, shown
from trainer.files.atomic import atomic_path

# The header's first 8 bytes are its length (little-endian u64); the JSON starts at byte 8.
_HEADER_START = 8
_MAX_HEADER = 100_000_000  # the safetensors library's own limit
PLAIN = ("arch",)  # stored as they are; every other field is JSON text
REQUIRED = ("arch", "num_classes", "cfg")
OPTIONAL = ("format_version", "best_acc", "best_epoch", "history", "prune", "config")


def is_safetensors(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` path, or a file that starts like one (any name)."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_START + 2)
    except OSError:  # missing, a folder, unreadable: the torch loader names the problem
        return False
    if len(head) < _HEADER_START + 2:
        return False
    size = int.from_bytes(head[:_HEADER_START], "little")
    return 2 <= size <= _MAX_HEADER and head[_HEADER_START:_HEADER_START + 2] == b'{"'


def save_safetensors(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> Path:
    """Write checkpoint dict ``ckpt`` (``trainer.files.checkpoint.make_checkpoint``) atomically."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"a checkpoint needs {', '.join(missing)} to be saved as safetensors")
    metadata = {"format": "pt"}
    for key in (*REQUIRED, *OPTIONAL):
        if ckpt.get(key) is not None:
            value = ckpt[key]
            metadata[key] = str(value) if key in PLAIN else json.dumps(_jsonable(value))
    # separate, contiguous storage per tensor: safetensors refuses shared or strided memory
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["state_dict"].items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tuples to lists, one-element tensors to numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # a tensor (a lab file keeps accuracies as tensors)
        return value.tolist()
    return value


def load_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """The raw checkpoint dict of a safetensors file (see the module docstring); every
    failure is a one-line CheckpointError."""
    path = Path(path)
    _check_readable(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 -- not a dict
    except SafetensorError as exc:
        raise CheckpointError(f"{what} {path} is not a valid safetensors file ({_line(exc)}); "
                              "re-create it (slimtune export CKPT --format safetensors)") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror or _line(exc)}); "
                              "check the file, its permissions and the disk") from None
    if not any(k in header for k in REQUIRED):
        return state  # no slimtune metadata: a bare state_dict, recognised by its keys
    raw: dict[str, Any] = {"state_dict": state}
    for key in (*REQUIRED, *OPTIONAL):
        if key in header:
            raw[key] = header[key] if key in PLAIN else _parse(path, key, header[key])
    return raw


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; give the path of a {SUFFIX} file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable; check its permissions")


MAX_DEPTH = 32  # nesting of a header field's JSON; slimtune's own fields nest 3 deep


def _parse(path: Path, key: str, text: str) -> Any:
    """A header field's JSON value: valid, at most MAX_DEPTH deep (a deeper one crashed the
    parser), and with finite numbers only ('1e999999' reads as infinity)."""
    def refused(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: the safetensors header field {shown(key)} {why}; the "
                               "file was edited or damaged: re-create it")

    if _depth(text) > MAX_DEPTH:
        raise refused(f"nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise refused(f"holds the number {exc}, which is not finite") from None
    except (ValueError, RecursionError) as exc:
        raise refused(f"is not valid JSON ({_line(exc)})") from None


class _NotFinite(Exception):
    pass


def _no_constant(name: str) -> float:
    raise _NotFinite(name)  # NaN, Infinity, -Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _NotFinite(text[:40])
    return value


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (counted without parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
