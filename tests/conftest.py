"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Let ``from tests.fakedata import ...`` work under a bare ``pytest`` too, not only
# ``python -m pytest`` (which puts the working directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakedata import write_fake_cifar10


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
