"""Atomic file writes: every file slimtune writes appears whole or not at all, and only ever
replaces a regular file.

The content goes to a temp file beside the target (``.<name>.<random>.tmp``, the pattern
``fit`` cleans up after a SIGKILL), is flushed to disk, gets the user's usual file mode
(``mkstemp`` creates 0600) and then replaces the target with ``os.replace``, unless the
target is a device, a FIFO or a socket (``os.replace`` would put a file in its place: as root,
``--output /dev/null`` replaced the system's null device).

Folders made for a run's outputs are remembered (:func:`make_folder`), so that a run that
fails removes those it left empty (:func:`remove_empty_made`).
"""

from __future__ import annotations

import errno
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.config.checks import special_kind
from trainer.errors import ConfigError

_MADE: list[Path] = []  # folders make_folder created, oldest first


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its missing parents (``..`` resolved first: 'x/../../w' makes
    no 'x'), remembering each one it created."""
    folder = Path(folder).resolve()
    missing = []
    here = folder
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    folder.mkdir(parents=True, exist_ok=True)
    _MADE.extend(reversed(missing))
    return folder


def remove_empty_made() -> None:
    """Remove the folders :func:`make_folder` created that are still empty (newest first)."""
    while _MADE:
        try:
            _MADE.pop().rmdir()
        except OSError:  # not empty (the run wrote there), or already gone
            pass


def refuse_special(path: str | os.PathLike, what: str = "the output") -> None:
    """ConfigError when ``path`` exists and is not a regular file (nor a link to one)."""
    kind = special_kind(Path(path))
    if kind is not None:
        raise ConfigError(f"{what} {path} is a {kind}, not a regular file; slimtune never "
                          "writes over one: choose another path")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without error it becomes
    ``path``, on any error (or signal) it is removed and ``path`` is left as it was."""
    path = Path(path)
    refuse_special(path)
    make_folder(path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before the rename, so a crash keeps one version
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        refuse_special(path)  # again: it may have appeared while the content was made
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there (root ignores mode bits)."""
    try:
        make_folder(folder)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder} ({exc.strerror or exc}); "
                          "choose a writable --output / --plot / --workdir") from None


def disk_full(exc: BaseException | None) -> OSError | None:
    """The full-disk (or quota) error behind ``exc``, if any: torch.save wraps it in a
    RuntimeError ('unexpected pos ...'), so the chain of causes is searched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- what a write must not replace

_LEGACY_TORCH = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # torch.save's pre-zip magic number
_SAFETENSORS_HEADER = 8  # a little-endian u64 header length, then the JSON header


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """What the file at ``path`` is, when it is a checkpoint or resume state (torch.save's zip
    or legacy pickle, or a safetensors file), whatever its name says; else None. TorchScript
    archives (code/, constants.pkl) are not checkpoints."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(max(len(_LEGACY_TORCH), _SAFETENSORS_HEADER + 2))
    except OSError:
        return None
    if head.startswith(_LEGACY_TORCH):
        return "a torch checkpoint"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        torch_save = any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)
        script = any(n.endswith("/constants.pkl") for n in names)
        return "a torch checkpoint" if torch_save and not script else None
    size = int.from_bytes(head[:_SAFETENSORS_HEADER], "little") if len(head) >= 10 else 0
    if 2 <= size <= 100_000_000 and head[_SAFETENSORS_HEADER:_SAFETENSORS_HEADER + 2] == b'{"':
        return "a safetensors checkpoint"
    return None


def refuse_replacing_checkpoint(path: str | os.PathLike, what: str) -> None:
    """ConfigError when ``path`` holds a checkpoint or resume state: a figure, a YAML file or an
    export never takes its place (by content: a checkpoint named x.png is one too)."""
    kind = checkpoint_kind(path)
    if kind is not None:
        raise ConfigError(f"{what} {path} is {kind}; slimtune never replaces a checkpoint or "
                          "resume state with another kind of file: choose another path")
