"""Running the CLI inside the test process: ``python -m launch ARGS`` as ``run_app`` would run
it, with the exit code, stdout and stderr a subprocess would give, and nothing left behind.

A CLI subprocess spends 3-5 s of a 2-core machine importing torch, torchvision and accelerate;
most CLI tests only look at the exit code, the output and the files, which ``run_app`` gives
without a process. What a fresh interpreter would have and a test process might not, or
what a run changes and a fresh interpreter would throw away, is set and restored here:

- output: file descriptors 1 and 2 (and ``sys.stdout``/``sys.stderr``) go to one file each,
  so prints, rich's console (it writes to ``sys.stdout`` at call time) and the output of
  processes the run starts (``accelerate launch`` jobs) are all captured;
- the working directory and ``os.environ`` (the run's ``env``; ``OMP_NUM_THREADS`` there sets
  torch's thread count, as it would in a new process);
- signal handlers (``trainer.train.loop.STOP`` installs SIGINT/SIGTERM ones), torch's thread
  count, its RNG and anomaly mode, ``random``'s and numpy's RNG, the stop flag;
- Accelerate's process-wide state (a run with other ``--cpu``/``--mixed-precision`` settings
  than the last would otherwise be refused);
- warnings and logging as an interpreter has them: the warning filters without pytest's, and
  a root logger without pytest's handlers (a library's warning then reaches stderr through
  logging's last resort), both printed on the captured stderr.

One run at a time (the state above is the process's); the ``timeout`` of a run is left to
pytest-timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

_LOCK = threading.Lock()


def run_in_process(argv: list[str], module: str, cwd: Path,
                   env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` (MODULE ``launch`` or ``trainer``) run by ``run_app`` here."""
    with _LOCK, tempfile.TemporaryDirectory(prefix="slimtune-cli-") as tmp:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        with _restored(), _environ(env), _chdir(cwd), _captured(out, err), _warnings(), \
                _logging():
            try:
                code = _run_app(module, argv)
            except SystemExit as exc:
                code = _exit_code(exc)
        # read as subprocess.run(text=True) reads a pipe: universal newlines
        return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code,
                                           out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def _run_app(module: str, argv: list[str]) -> int:
    from trainer.cli.app import build_app, run_app

    if module == "launch":
        from launch.cli import make_app

        app, prog = make_app(), "slimtune"  # as launch.cli.main
    else:
        app, prog = build_app(), "python -m trainer"  # as trainer.__main__
    return run_app(app, argv, prog=prog)


def _exit_code(exc: SystemExit) -> int:
    """The exit code of an interpreter ended by ``exc`` (a message goes to stderr)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _captured(out: Path, err: Path) -> Iterator[None]:
    """fds 1 and 2 and sys.stdout/stderr to ``out``/``err`` (appending: one file each that
    this process and any it starts write to in turn)."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    files = [open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
             for path in (out, err)]
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        sys.stdout, sys.stderr = files
        yield
    finally:
        for f in files:
            with contextlib.suppress(ValueError):
                f.flush()
        sys.stdout, sys.stderr = streams
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        for f in files:
            f.close()


@contextlib.contextmanager
def _chdir(cwd: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    before = dict(os.environ)
    threads = torch.get_num_threads()
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # what a process started with it would use
        torch.set_num_threads(max(int(env["OMP_NUM_THREADS"]), 1))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)
        torch.set_num_threads(threads)


def _signals() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread can set handlers (the run then installs none)
    handlers = {}
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if handler is not None:  # None: set from C, not restorable from Python
                handlers[sig] = handler
    return handlers


@contextlib.contextmanager
def _restored() -> Iterator[None]:
    """Process state a run may change, as it was; Accelerate's as a fresh process has it."""
    handlers = _signals()
    rng = torch.get_rng_state(), random.getstate(), _numpy_rng()
    anomaly = torch.is_anomaly_enabled()
    _reset_accelerate()
    try:
        yield
    finally:
        _reset_accelerate()
        for sig, handler in handlers.items():
            if signal.getsignal(sig) != handler:
                signal.signal(sig, handler)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        if rng[2] is not None:
            sys.modules["numpy"].random.set_state(rng[2])
        torch.autograd.set_detect_anomaly(anomaly)
        loop = sys.modules.get("trainer.train.loop")
        if loop is not None:
            loop.STOP.signum = None
            loop.STOP._previous.clear()


def _numpy_rng():
    numpy = sys.modules.get("numpy")
    return numpy.random.get_state() if numpy is not None else None


def _reset_accelerate() -> None:
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _warnings() -> Iterator[None]:
    """The interpreter's warning filters (pytest's taken out), shown on the captured stderr."""
    with warnings.catch_warnings():
        warnings.filters[:] = [f for f in warnings.filters if not _from_pytest(f)]
        warnings._filters_mutated()  # forget which warnings were already shown
        warnings.showwarning = _show
        yield


def _from_pytest(entry: tuple) -> bool:
    action, _, category, module, _ = entry
    if category.__module__.split(".")[0] in ("_pytest", "pytest"):
        return True
    # pytest shows every deprecation warning during a test; an interpreter ignores them
    return (action == "always" and module is None
            and category in (DeprecationWarning, PendingDeprecationWarning))


@contextlib.contextmanager
def _logging() -> Iterator[None]:
    """The root logger as an interpreter starts it: no handlers, level WARNING."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
