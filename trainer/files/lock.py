"""One run per output: a lock file beside it (``<output stem>.lock``; a pipeline's in its
--workdir) that a run holds for its whole life.

The lock is two POSIX record locks (``fcntl``) on one byte each of that file; the kernel drops
them when their process ends, however it ends, so a lock file left by a killed run never
blocks (it is only a file: the next run takes it over and removes it when it ends).

- byte 0, the *run*: held by the process that started the run: the launcher of a job, or the
  one process of an in-process run;
- byte 1, the *writer*: held by the process that writes the outputs: rank 0 of a job, or the
  one process.

A new run must take both, so it is refused, in one line naming the holder's pid, while a run
on the same output is going and also while the ranks of a job whose launcher is gone still
live. A launcher takes both before its job starts and hands the writer byte to its rank 0 (a
new run then still finds the run byte held). The file holds the pid of the run's starter.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from trainer.errors import ConfigError
from trainer.files.atomic import make_folder

RUN, WRITER = 0, 1  # the byte of each role
BOTH = (RUN, WRITER)
LAUNCHER_ENV = "SLIMTUNE_RUN_LOCKED"  # set by a launcher that holds the run byte for its job


class OutputLock:
    """The lock of ``path`` (the lock file) guarding ``what`` ('--output out/x.pth',
    '--workdir w': the option that moves the run elsewhere, and its value)."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self, roles: tuple[int, ...] = BOTH) -> OutputLock:
        """Take ``roles`` (bytes RUN and/or WRITER) without waiting; ConfigError naming the
        holder when another process has one of them."""
        for _ in range(10):  # a holder may remove the file between our open and our lock
            fd = self._open()
            try:
                for role in roles:
                    _lock(fd, role, self._refusal)
                if _same_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover -- ten removals in a row
            raise ConfigError(f"{self.what}: its lock file {self.path} keeps disappearing; "
                              "is another run starting and ending there?")
        self.fd = fd
        if RUN in roles:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def _open(self) -> int:
        try:
            make_folder(self.path.parent)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write to {self.path.parent} ({exc.strerror or exc}); "
                              "choose a writable --output / --plot / --workdir") from None

    def hand_over(self, role: int) -> None:
        """Release ``role`` (the launcher's WRITER byte, for its rank 0), keeping the rest."""
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, role)

    def release(self) -> None:
        """Drop the lock; the last holder removes the file."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, len(BOTH), 0)
            except OSError:
                return  # another process still holds a byte (a launcher, or its rank 0)
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refusal(self, pid: int | None) -> ConfigError:
        who = f"pid {pid}" if pid else "another process"
        return ConfigError(f"{self.what} is in use by another slimtune run ({who}); wait for it "
                           f"to end (or stop it), or give another {self.what.split()[0]}")


def _lock(fd: int, role: int, refusal) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, role)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise refusal(_holder(fd, role)) from None


def _holder(fd: int, role: int) -> int | None:
    """The pid holding byte ``role`` (F_GETLK), else the pid the file records."""
    try:  # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid}
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, role, 1, 0)
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        if l_type != fcntl.F_UNLCK and pid > 0:
            return pid
    except (OSError, struct.error):
        pass
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one removed since it was opened)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def roles_here(world_size: int, environ: dict[str, str] | None = None) -> tuple[int, ...]:
    """What this process of a run takes: both bytes in one process on its own; the writer
    byte in rank 0 of a job (or under a launcher, which holds the run byte)."""
    environ = os.environ if environ is None else environ
    return (WRITER,) if world_size > 1 or environ.get(LAUNCHER_ENV) else BOTH
