"""``torch.load(weights_only=True)``, with every way a file can fail turned into one line.

slimtune never loads a checkpoint any other way: a file that would need the full unpickler is
refused (loading it would run code), and a truncated, corrupt or unreadable one is named with
the fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; give the path of a .pth file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable; check its permissions")
    _refuse_inflation(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text:  # torch 2.4+: "Unsupported global: GLOBAL mod.name ..."
            raise CheckpointError(
                f"{what} {path} was refused: it holds objects other than tensors and plain "
                "values, and loading it would run code (it was not run); re-save it as "
                "{cfg, state_dict} from the environment that made it"
            ) from None
        if "weights_only" in text or "Weights only load failed" in text:
            # Not a torch file at all (text, image, random bytes) or a pickle using opcodes
            # the safe loader refuses: either way nothing in it was executed.
            raise CheckpointError(
                f"{what} {path} is not a torch checkpoint the safe loader can read "
                f"(weights_only=True refused it: {_weights_only_reason(text)}; nothing in it "
                "was run); give a .pth file written by torch.save"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a valid torch file ({_first_line(exc)})") from None
    except OSError as exc:  # it exists, but reading fails (permissions, I/O error)
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror or _first_line(exc)}); "
                              "check the file, its permissions and the disk") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        msg = _first_line(exc)
        hint = "truncated or corrupt" if _looks_truncated(msg) else "not a torch checkpoint"
        raise CheckpointError(
            f"{what} {path} is {hint} ({msg}); re-create or re-download it") from None
    except Exception as exc:  # noqa: BLE001 -- the legacy loader fails on junk in many ways
        # (a text file: KeyError from the magic-number lookup; struct.error; ...)
        raise CheckpointError(
            f"{what} {path} is not a torch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)}); give a .pth file written by torch.save") from None


# torch.save stores its zip members uncompressed; a re-zipped file may be compressed, but not
# this much: a 4 MB file of deflated zeros took 1.9 GB to refuse.
MAX_INFLATION = 16
INFLATION_SLACK = 16 << 20


def _refuse_inflation(path: Path, what: str) -> None:
    """CheckpointError for a zip whose compressed members would unpack to far more than the
    file's size (a zip bomb), found from its directory before anything is unpacked."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy torch file) or a broken one: torch.load says which
    packed = [m for m in members if m.compress_type != zipfile.ZIP_STORED]
    unpacked = sum(m.file_size for m in members)
    size = path.stat().st_size
    if packed and unpacked > MAX_INFLATION * size + INFLATION_SLACK:
        raise CheckpointError(
            f"{what} {path} was refused: its {len(packed)} compressed part(s) would unpack to "
            f"{unpacked / 1e6:,.0f} MB from a {size / 1e6:,.1f} MB file (torch.save never "
            "compresses; nothing was unpacked); re-save it with torch.save")


def _weights_only_reason(text: str) -> str:
    """The informative line of torch's long weights_only error (e.g. 'Unsupported operand 123')."""
    for line in text.splitlines():
        if line.strip().startswith("Unsupported"):
            return line.strip()[:120]
    return "unsupported content"


def _first_line(exc: BaseException) -> str:
    """The first sentence of the first line (torch appends paragraphs of advice)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.split(". ")[0][:200]


def _looks_truncated(msg: str) -> bool:
    return any(s in msg for s in ("central directory", "EOF", "truncated", "unexpected end",
                                  "failed finding"))
