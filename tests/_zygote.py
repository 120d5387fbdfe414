"""A fork server for the CLI tests: ``python -m launch ...`` without paying for imports.

A CLI subprocess spends 3-5 s of its start-up on a 2-core machine importing torch,
torchvision and accelerate, and most CLI tests start one or more. The server is one process
that imports them (and slimtune) once, started with the CLI's environment; each run is a fork
of it that takes the test's working directory, argv and output files and runs the module as
``-m`` would. The test sees a real process: its own exit code (negative for a signal),
stdout, stderr.

It serves only runs whose environment equals its own: a run with fault-injection variables
(whose ``sitecustomize`` must patch modules as they are first imported), or any other change
of environment, gets a fresh interpreter (``tests.helpers.run_cli`` decides). The server
refuses to start if its imports printed anything or started a thread, so a fork neither hides
an import-time warning from the tests that count stderr lines nor inherits a lock.

Protocol, over a Unix socket, one connection per run: the client sends a JSON line
``{argv, module, cwd, env, stdout, stderr}``; the server forks a handler, which forks the run and
answers ``{"pid": ...}`` then ``{"rc": ...}``.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import pkgutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Variables that change from test to test and that nothing reads at import time: a run whose
# environment differs from the server's only in these is still served (with its own values).
VOLATILE = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")


def import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that a fork must share with the server."""
    return {k: v for k, v in env.items() if k not in VOLATILE}


# Third-party modules slimtune imports lazily (inside functions) on common paths; not
# onnxruntime, whose import starts a thread.
LAZY = ("accelerate", "thop", "torch_pruning", "safetensors.torch", "onnx",
        "matplotlib.pyplot", "rich.console", "typer")


def preload() -> None:
    """Import every module of launch/ and trainer/ (but their ``__main__``) and ``LAZY``."""
    import importlib

    for package in ("launch", "trainer"):
        names = [m.name for m in pkgutil.iter_modules([str(REPO / package)])]
        for name in names:
            if name != "__main__":
                importlib.import_module(f"{package}.{name}")
    for name in LAZY:
        importlib.import_module(name)


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def serve(path: str) -> None:
    """The server: preload, check, then fork a handler per connection until the parent dies."""
    parent = os.getppid()
    sys.stdout.flush()
    with contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        preload()
    said = out.getvalue() + err.getvalue()
    if said or _native_threads() != 1:  # Python's threads are among the native ones
        sys.exit(f"fork server not started: imports printed {said!r}, "
                 f"{_native_threads()} threads")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(1.0)
    print("ready", flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle(conn)
        conn.close()


def _handle(conn: socket.socket) -> None:
    """A handler: fork the run, report its pid, wait, report its exit code."""
    request = json.loads(conn.makefile().readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    status = os.waitpid(pid, 0)[1]
    rc = os.waitstatus_to_exitcode(status)
    conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")
    conn.close()
    os._exit(0)


def _run(request: dict) -> None:
    """The run itself, as ``python -m MODULE ARGV`` in ``cwd`` would do it; never returns."""
    import random
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # what -m puts first
    random.seed()  # a fresh interpreter's seed, not the server's
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY),
                           (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        os.dup2(os.open(name, mode), fd)
    sys.argv = [request["module"], *request["argv"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # what an interpreter does with an uncaught ^C
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    _finish()
    os._exit(code)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finish() -> None:
    """What interpreter shutdown does that a test could see: join threads, atexit, flush."""
    import gc

    # The interpreter's own step: threading's exit hooks (a ThreadPoolExecutor's workers are
    # told to stop there, torch.compile's pool among them), then join non-daemon threads.
    threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()  # __del__ methods run, as at a real exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class Server:
    """The client side: start the server on first use, run CLIs through it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = import_env(env)
        self.dir = tempfile.mkdtemp(prefix="slimtune-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._zygote", self.path], cwd=REPO, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"fork server failed: {line}{self.proc.stderr.read()}")
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)

    def serves(self, env: dict[str, str]) -> bool:
        return import_env(env) == self.env and self.proc.poll() is None

    def run(self, argv: list[str], module: str, cwd: Path, env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess:
        """Like ``subprocess.run([python, -m, module, *argv], capture_output=True, text=True)``."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")
            out.touch()
            err.touch()
            rc = self._ask({"argv": argv, "module": module, "cwd": str(Path(cwd).resolve()),
                            "env": env, "stdout": str(out), "stderr": str(err)}, timeout)
            return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], rc,
                                               out.read_text(), err.read_text())

    def _ask(self, request: dict, timeout: float) -> int:
        """Send one run to the server; its exit code. Past ``timeout`` it is SIGKILLed."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            replies = conn.makefile()
            pid = json.loads(replies.readline())["pid"]
            conn.settimeout(timeout)
            try:
                return json.loads(replies.readline())["rc"]
            except BaseException as e:  # our timeout, or the test's own (pytest-timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if isinstance(e, TimeoutError):
                    argv = [request["module"], *request["argv"]]
                    raise subprocess.TimeoutExpired(argv, timeout) from None
                raise


if __name__ == "__main__":
    serve(sys.argv[1])
