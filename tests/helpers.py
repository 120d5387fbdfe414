"""Test helpers: tiny checkpoints and running the real CLI (in this process or a new one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from trainer.files.checkpoint import make_checkpoint, save_checkpoint
from trainer.models.family import batchnorms
from trainer.models.resnet import ResNet50, default_widths, prunable_indices

REPO = Path(__file__).resolve().parent.parent


def small_cfg(width: int = 4) -> list[int]:
    """A heavily pruned cfg: every bn1/bn2 at ``width`` channels (fast on CPU)."""
    cfg = default_widths()
    for i in prunable_indices():
        cfg[i] = width
    return cfg


def make_small_checkpoint(path: Path, width: int = 4, num_classes: int = 10, seed: int = 0,
                          **extra) -> Path:
    """Write a slimtune checkpoint of a pruned ResNet-50 with random (seeded) weights."""
    torch.manual_seed(seed)
    model = ResNet50(num_classes, small_cfg(width))
    save_checkpoint(path, make_checkpoint(model, **extra))
    return Path(path)


# Fault-injection variables (tests/_inject/sitecustomize.py reads them; the product never does).
FAULT_VARS = ("SLIMTUNE_TEST_KILL_AT", "SLIMTUNE_TEST_KILL_IN_SAVE", "SLIMTUNE_TEST_FAIL_RANK",
              "SLIMTUNE_TEST_NAN_RANK", "SLIMTUNE_TEST_STEP_SLEEP", "SLIMTUNE_TEST_SAVE_SLEEP",
              "SLIMTUNE_TEST_REPORT_SLEEP", "SLIMTUNE_TEST_WORKER_DIES_LATE")
INJECT = REPO / "tests" / "_inject"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess; with fault variables in ``extra``, tests/_inject
    goes on PYTHONPATH so that its sitecustomize patches the faults in."""
    env = {k: v for k, v in os.environ.items() if k not in FAULT_VARS}
    paths = [str(REPO)] + ([str(INJECT)] if set(extra) & set(FAULT_VARS) else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # 2-core machine: ranks must not oversubscribe
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, module: str = "launch", timeout: float = 300,
            env: dict[str, str] | None = None,
            process: bool = False) -> subprocess.CompletedProcess:
    """``python -m launch ARGS`` (or ``python -m trainer``) in ``cwd``: its exit code and text
    output, as ``subprocess.run(..., capture_output=True, text=True)`` gives them.

    It runs in this process (tests/_inprocess.py: output captured, process state restored)
    unless a real process is the point: ``process=True`` (signals, end-to-end runs), fault
    injection (``env`` with FAULT_VARS: tests/_inject patches modules as a fresh interpreter
    imports them), a module other than the CLI's, or a rank's environment (``WORLD_SIZE`` > 1).
    ``timeout`` bounds a subprocess; an in-process run is bounded by pytest-timeout.
    """
    env = env or cli_env()
    argv = list(map(str, args))
    if not process and not needs_process(module, env):
        from tests._inprocess import run_in_process

        return run_in_process(argv, module, Path(cwd), env)
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def needs_process(module: str, env: dict[str, str]) -> bool:
    """True when ``python -m module`` in ``env`` cannot run in the test process."""
    return (module not in ("launch", "trainer") or bool(set(env) & set(FAULT_VARS))
            or env.get("WORLD_SIZE", "1") not in ("", "1"))


def cli_text(exc: BaseException) -> str:
    """An error as the command line prints it (a ParamError's parameters said as flags)."""
    from trainer.errors import ParamError

    return exc.cli_message() if isinstance(exc, ParamError) else str(exc)


# Options for a fast fine-tune on the fake CIFAR-10 written by tests.fakedata.
FAST = ["--cpu", "--num-workers", "0", "--batch-size", "20"]


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of processes run side by side; none outlives the call (a hung
    rendezvous must not outlive the test)."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine params and running stats, so eval-mode outputs depend on all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()
