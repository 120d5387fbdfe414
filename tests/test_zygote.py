"""The CLI tests' fork server (tests/_zygote.py) ends a run as a fresh interpreter would: the
same exit code, stdout and stderr for a clean exit with a thread pool and atexit hooks left
over (torch.compile leaves one), an uncaught exception, a death by signal and ``sys.exit``
with a message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import cli_env, run_cli

PROBES = {
    "pool-and-atexit": """
        import atexit, sys
        from concurrent.futures import ThreadPoolExecutor
        # idle workers, held for the life of the process as a library holds its pool
        sys.probe_pool = pool = ThreadPoolExecutor(2)
        print(pool.submit(sum, [1, 2]).result())
        atexit.register(print, "atexit ran", file=sys.stderr)
        print("buffered, never flushed by the probe", end="")
        sys.exit(3)
    """,
    "exception": """
        print("before")
        raise ValueError("boom")
    """,
    "signal": """
        import os, signal
        print("dying", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    """,
    "exit-message": """
        import sys
        sys.exit("error: a message")
    """,
}


@pytest.mark.parametrize("name", PROBES)
def test_a_fork_ends_as_a_fresh_interpreter(tmp_path: Path, name: str) -> None:
    (tmp_path / "slimtune_probe.py").write_text(textwrap.dedent(PROBES[name]))
    forked = run_cli(cwd=tmp_path, module="slimtune_probe", timeout=60)
    fresh = subprocess.run([sys.executable, "-m", "slimtune_probe"], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=60)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    # the traceback names the file, and the fork's frames above the probe are the server's
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]
    assert forked.returncode == {"pool-and-atexit": 3, "exception": 1, "signal": -15,
                                 "exit-message": 1}[name]
