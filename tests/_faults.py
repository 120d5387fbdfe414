"""Helpers for the reliability tests: small fine-tunes through the real CLI, killing a whole
process tree, and comparing the outputs of two runs bit for bit.

Faults (a kill at a step or mid-write, a failing or NaN rank, slow steps, ...) are injected
from outside the product: ``env(SLIMTUNE_TEST_...=...)`` puts tests/_inject on PYTHONPATH,
whose ``sitecustomize`` patches them into the subprocesses (see its docstring for the list).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from tests.helpers import FAST, cli_env, make_small_checkpoint
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint


def write_start_checkpoint(path: Path) -> Path:
    """A small pruned ResNet-50 whose residual blocks start as identity (bn3 γ = 0).

    From it, a fine-tune on the fake CIFAR-10 at --lr 3e-3 improves its test accuracy in each
    of the first epochs, so the best checkpoint is rewritten every epoch.
    """
    make_small_checkpoint(path)
    model = build_model(load_checkpoint(path))
    for name, module in model.named_modules():
        if name.endswith(".bn3"):
            nn.init.zeros_(module.weight)
    save_checkpoint(path, make_checkpoint(model))
    return path


def finetune_args(*extra: str, epochs: int = 3, lr: str = "3e-3", batch_size: str = "20",
                  shared: str = "../shared", out: str = "out") -> list[str]:
    """``finetune`` on the fake CIFAR-10 (5 steps of 20 images per epoch), run in a folder
    beside ``shared/`` (start.pth + the data). The default relative paths let two runs in two
    folders save the same config, to be compared bit for bit. Outputs: <out>/x.pth,
    x.last.pth, x_metrics.csv, x.png.
    """
    fast = list(FAST)
    fast[fast.index("--batch-size") + 1] = batch_size
    return ["finetune", "--checkpoint", f"{shared}/start.pth", "--dataset", "cifar10",
            "--data-dir", shared, "--epochs", str(epochs), "--lr", lr, "--seed", "1",
            "--output", f"{out}/x.pth", "--plot", f"{out}/x.png", *fast, *extra]


def make_shared(root: Path) -> Path:
    """root/shared/ with start.pth and a fake CIFAR-10; returns root/shared."""
    from tests.fakedata import write_fake_cifar10

    shared = root / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    write_start_checkpoint(shared / "start.pth")
    write_fake_cifar10(shared)
    return shared


def env(**faults: str) -> dict[str, str]:
    """The CLI env with exactly these fault-injection variables set."""
    base = cli_env(**faults)
    base.pop("SLIMTUNE_FAILURE_DIR", None)  # a launcher's, when the tests run under one
    return base


def start(args: list[str], cwd: Path, run_env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen:
    """``python -m launch ARGS`` in its own session; output (merged) to ``log`` or a pipe."""
    argv = [sys.executable, "-m", "launch", *map(str, args)]
    if log is None:
        return subprocess.Popen(argv, cwd=cwd, env=run_env or env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=cwd, env=run_env or env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the workers below ``proc`` (the processes whose env sets RANK)."""
    found = {}
    for pid in descendants(proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if ranks and b"LOCAL_RANK=" + ranks[0] in environ:
            found[int(ranks[0])] = pid
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started, all at once (a machine going down)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def no_orphans(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Assert nothing ``proc`` started outlives it (no stray rank keeps running)."""
    wait_for(lambda: not _session_alive(proc.pid), timeout, "the job's processes to exit")


def _session_alive(sid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                return True
    return False


def assert_same_run(ref: Path, got: Path) -> None:
    """The best checkpoints (tensors, history, best_acc/epoch, config) and CSVs are identical."""
    ref, got = Path(ref) / "out", Path(got) / "out"
    a, b = load_checkpoint(ref / "x.pth"), load_checkpoint(got / "x.pth")
    assert a["history"] == b["history"]
    assert (a["best_acc"], a["best_epoch"]) == (b["best_acc"], b["best_epoch"])
    assert a["config"] == b["config"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]}"
    assert (ref / "x_metrics.csv").read_text() == (got / "x_metrics.csv").read_text()
