"""The CLI tests' in-process runner (tests/_inprocess.py): a run gives what ``python -m launch``
in a new interpreter gives, captures what the run and its subprocesses print, and leaves the
test process as it found it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests import _inprocess
from tests.helpers import cli_env, make_small_checkpoint, run_cli


def _probe(module: str, argv: list[str]) -> int:
    """What a command might do to its process."""
    print("out", argv)
    print("err", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "print('child')"], check=True)  # fd 1, inherited
    warnings.warn("a user warning")
    logging.getLogger("some.library").warning("a logged warning")
    os.environ["SLIMTUNE_PROBE"] = "set"
    signal.signal(signal.SIGTERM, lambda *_: None)
    torch.set_num_threads(2)
    torch.manual_seed(123)
    os.chdir("/")
    sys.exit("error: a message")


def test_a_run_is_captured_and_leaves_no_trace(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(_inprocess, "_run_app", _probe)
    cwd, env, threads = os.getcwd(), dict(os.environ), torch.get_num_threads()
    handler, rng = signal.getsignal(signal.SIGTERM), torch.get_rng_state()
    r = run_cli("x", cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 1  # sys.exit with a message, as an interpreter ends
    assert r.stdout.splitlines() == ["out ['x']", "child"]
    err = r.stderr.splitlines()
    assert err[0] == "err" and err[-2:] == ["a logged warning", "error: a message"]
    assert any("UserWarning: a user warning" in line for line in err)
    assert (os.getcwd(), dict(os.environ), torch.get_num_threads()) == (cwd, env, threads)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow  # two new interpreters
def test_in_process_and_a_new_interpreter_say_the_same(tmp_path: Path):
    make_small_checkpoint(tmp_path / "s.pth")
    for args in (["info", "s.pth"], ["info", "missing.pth"]):
        here = run_cli(*args, cwd=tmp_path)
        there = run_cli(*args, cwd=tmp_path, process=True)
        assert (here.returncode, here.stdout, here.stderr) == \
            (there.returncode, there.stdout, there.stderr)
