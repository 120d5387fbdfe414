"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Let ``from tests.fakedata import ...`` work under a bare ``pytest`` too, not only
# ``python -m pytest`` (which puts the working directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakedata import write_fake_cifar10

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: torch's default of one thread per core in each made four
    # threads fight over two (issue 20, section 7). The CLI's subprocesses get
    # OMP_NUM_THREADS=1 from tests.helpers.cli_env; a run started in this process
    # (run_worker) reads it here, or it would choose its threads from how busy the machine
    # is, and two runs of one test could differ in their float sums.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    """A data dir holding a small fake cifar-10-batches-py/ (5 x 20 train, 30 test images)."""
    write_fake_cifar10(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One OpenMP thread: faster than two fighting other jobs on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
