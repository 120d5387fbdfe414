"""Test-only fault injection for the CLI subprocesses of the reliability tests.

Python imports ``sitecustomize`` at start-up from ``sys.path``; ``tests._faults.env`` (and
``tests.helpers.cli_env``) put this folder on PYTHONPATH only when a test sets one of the
variables below, and every process of the job (launcher, accelerate, torchrun, ranks,
DataLoader workers) inherits it. Nothing in trainer/ or launch/ reads these variables: the
faults are patched in from here, right after the module they touch is first imported.

- ``SLIMTUNE_TEST_FAIL_RANK=R``: rank R raises at the first training step.
- ``SLIMTUNE_TEST_NAN_RANK=R[:E:S]``: rank R's loss is NaN from step S (default 2) of epoch E
  (default 1) on (its input batch is NaN).
- ``SLIMTUNE_TEST_KILL_AT=E:S[:R]``: SIGKILL rank R (default 0) before step S of epoch E
  (1-based).
- ``SLIMTUNE_TEST_STEP_SLEEP=T``: sleep T seconds before each training step.
- ``SLIMTUNE_TEST_KILL_IN_SAVE=<file name>:<n>``: SIGKILL the process during its n-th
  checkpoint write of that file, half of the temp file written, before the rename.
- ``SLIMTUNE_TEST_SAVE_SLEEP=T``: sleep T seconds there (a signal can arrive mid-write).
- ``SLIMTUNE_TEST_REPORT_SLEEP=T``: sleep T seconds before a rank reports to the launcher.
- ``SLIMTUNE_TEST_WORKER_DIES_LATE=T``: a DataLoader worker that gets SIGTERM dies T seconds
  later (the main process reaches its teardown first).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import os
import signal
import sys
import time
from contextlib import contextmanager

ENV = {k: v for k, v in os.environ.items() if k.startswith("SLIMTUNE_TEST_")}


def _ints(spec: str, defaults: list[int]) -> list[int]:
    """Three ints from 'a[:b[:c]]', the missing ones from ``defaults``."""
    values = list(map(int, spec.split(":")))
    return (values + defaults[len(values):])[:3]


class _FaultyBatches:
    """The training loader as ``train_one_epoch`` sees it, with the faults applied before
    each step."""

    def __init__(self, loader, epoch: int) -> None:
        self.loader, self.epoch = loader, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from trainer.train import dist

        rank = dist.rank()
        for step, (x, y) in enumerate(self.loader):
            here = (self.epoch + 1, step + 1)
            if "SLIMTUNE_TEST_FAIL_RANK" in ENV and int(ENV["SLIMTUNE_TEST_FAIL_RANK"]) == rank:
                raise RuntimeError(f"injected failure on rank {rank} (SLIMTUNE_TEST_FAIL_RANK)")
            if "SLIMTUNE_TEST_KILL_AT" in ENV:
                e, s, r = _ints(ENV["SLIMTUNE_TEST_KILL_AT"], [0, 0, 0])
                if (e, s, r) == (*here, rank):
                    os.kill(os.getpid(), signal.SIGKILL)
            if "SLIMTUNE_TEST_NAN_RANK" in ENV:
                r, e, s = _ints(ENV["SLIMTUNE_TEST_NAN_RANK"], [0, 1, 2])
                if r == rank and here >= (e, s):
                    x = x * math.nan
            if "SLIMTUNE_TEST_STEP_SLEEP" in ENV:
                time.sleep(float(ENV["SLIMTUNE_TEST_STEP_SLEEP"]))
            yield x, y


def _patch_engine(engine) -> None:
    real = engine.train_one_epoch

    def train_one_epoch(model, loader, *args, epoch, **kwargs):
        return real(model, _FaultyBatches(loader, epoch), *args, epoch=epoch, **kwargs)

    engine.train_one_epoch = train_one_epoch


_SAVES: dict[str, int] = {}


def _patch_checkpoint(checkpoint) -> None:
    real = checkpoint.atomic_path

    @contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            # the temp file is written and closed; the rename comes when this block ends
            name = os.path.basename(path)
            _SAVES[name] = _SAVES.get(name, 0) + 1
            spec = ENV.get("SLIMTUNE_TEST_KILL_IN_SAVE", "")
            if spec.rpartition(":")[0] == name and _SAVES[name] == int(spec.rpartition(":")[2]):
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            if "SLIMTUNE_TEST_SAVE_SLEEP" in ENV:
                time.sleep(float(ENV["SLIMTUNE_TEST_SAVE_SLEEP"]))

    checkpoint.atomic_path = atomic_path


def _patch_dist(dist) -> None:
    real = dist.report_to_launcher

    def report_to_launcher(message: str, code: int) -> None:
        time.sleep(float(ENV["SLIMTUNE_TEST_REPORT_SLEEP"]))
        real(message, code)

    dist.report_to_launcher = report_to_launcher


def _late_death(_signum, _frame) -> None:
    time.sleep(float(ENV["SLIMTUNE_TEST_WORKER_DIES_LATE"]))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _patch_loaders(loaders) -> None:
    real = loaders.ignore_ctrl_c

    def worker_init(worker_id: int) -> None:
        real(worker_id)
        signal.signal(signal.SIGTERM, _late_death)

    loaders.ignore_ctrl_c = worker_init


PATCHES = {
    "trainer.train.loop": (_patch_engine, ("SLIMTUNE_TEST_FAIL_RANK", "SLIMTUNE_TEST_KILL_AT",
                                       "SLIMTUNE_TEST_NAN_RANK", "SLIMTUNE_TEST_STEP_SLEEP")),
    "trainer.files.checkpoint": (_patch_checkpoint, ("SLIMTUNE_TEST_KILL_IN_SAVE",
                                               "SLIMTUNE_TEST_SAVE_SLEEP")),
    "trainer.train.dist": (_patch_dist, ("SLIMTUNE_TEST_REPORT_SLEEP",)),
    "trainer.data.loaders": (_patch_loaders, ("SLIMTUNE_TEST_WORKER_DIES_LATE",)),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module in PATCHES, it wraps the real loader so that the
    patch runs once the module's code has run (before anyone imports names from it)."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real_exec = spec.loader.exec_module
        patch = PATCHES[name][0]

        def exec_module(module):
            real_exec(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


PATCHES = {name: p for name, p in PATCHES.items() if any(v in ENV for v in p[1])}
if PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
