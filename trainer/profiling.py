"""Parameter, MAC/FLOP and latency measurements of a (pruned) ResNet-50.

Units, stated once and used everywhere: **MACs** are multiply-accumulates, the number the
lab and most pruning papers call "FLOPs"; **FLOPs** here are 2 x MACs (one multiply plus
one add). Counts come from ``thop`` on a throw-away CPU copy of the model, so the model
the caller passes in is never touched (no hooks, no ``total_ops`` buffers, same device
and train/eval mode).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import build_model, load_checkpoint, summarize_history
from trainer.errors import UserError
from trainer.models import unwrap_model

# Every stride-2 layer (3x3 conv pad 1, 3x3 max-pool pad 1, 1x1 downsample conv) maps a
# 1x1 map to 1x1, and eval-mode BatchNorm needs no spatial statistics, so the network
# accepts any size >= 1 (checked in tests for 1..9). The upper bound only guards against
# a typo allocating hundreds of GB: the stem alone needs 256 B x S^2 per image.
MIN_INPUT_SIZE = 1
MAX_INPUT_SIZE = 1024


def check_input_size(input_size: Any) -> int:
    """Return ``input_size`` as an int, or raise UserError saying which sizes work."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or not (
        MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE
    ):
        raise UserError(
            f"--input-size must be an integer from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} "
            f"(pixels per side); got {input_size!r}. CIFAR images are 32"
        )
    return input_size


def _check_batch(batch: Any, what: str = "batch") -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"{what} must be a positive integer; got {batch!r}")
    return batch


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU deep copy of the unwrapped model (the original is untouched)."""
    bare = unwrap_model(model)
    # deepcopy keeps the copy on the original's device for a moment (one extra model's worth
    # of memory, ~94 MB for the full ResNet-50); moving it afterwards leaves the original alone.
    return copy.deepcopy(bare).to(device="cpu", dtype=torch.float32).eval()


def profile_model(model: nn.Module, input_size: int = 32, batch: int = 1) -> dict[str, int]:
    """Count parameters and MACs of ``model`` at a (batch, 3, S, S) input.

    Returns ``{"params", "macs", "flops", "input_size"}``: params is the exact sum of
    ``p.numel()``; macs is thop's multiply-accumulate count (what the lab calls FLOPs);
    flops = 2 x macs. Wrappers (DataParallel, DDP, torch.compile) are stripped first.
    """
    import thop  # imported here: only profiling needs it, and it is slow-ish to import

    size = check_input_size(input_size)
    batch = _check_batch(batch)
    bare = unwrap_model(model)
    params = sum(p.numel() for p in bare.parameters())
    work = _cpu_copy(bare)
    x = torch.zeros(batch, 3, size, size)
    with torch.no_grad():
        macs, _ = thop.profile(work, inputs=(x,), verbose=False)
    macs = round(float(macs))  # thop sums in float64; exact below 2**53
    return {"params": int(params), "macs": macs, "flops": 2 * macs, "input_size": size}


def profile_checkpoint(path: str | os.PathLike, input_size: int = 32) -> dict[str, Any]:
    """Profile the model a checkpoint file describes (see :func:`profile_model`).

    Adds ``name`` (file stem), ``path`` and, when the checkpoint records one, ``best_acc``
    (best test accuracy in %). Raises CheckpointError for unusable files.
    """
    size = check_input_size(input_size)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    out: dict[str, Any] = {"name": Path(path).stem, "path": str(path)}
    out.update(profile_model(model, size))
    best = summarize_history(ckpt)["best_acc"]
    if best is not None:
        out["best_acc"] = float(best)
    return out


class Timer:
    """Seconds of the ``with`` body: CUDA events between synchronisations, else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1000.0  # ms -> s
        else:
            self.seconds = time.perf_counter() - self._t0


def _time_once(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Milliseconds of one forward pass."""
    with Timer(device) as t:
        model(x)
    return t.seconds * 1000.0


def measure_latency(model: nn.Module, device: str | torch.device, input_size: int = 32,
                    batches: Sequence[int] = (1, 256), warmup: int = 5,
                    repeats: int = 20) -> dict[str, Any]:
    """Median forward latency of ``model`` (eval mode, no_grad) on ``device``.

    Runs on a copy of the unwrapped model. Returns ``{"device", "input_size", "repeats",
    "batches": [{"batch", "ms_per_batch", "ms_per_image"}, ...]}`` (medians, milliseconds).
    """
    size = check_input_size(input_size)
    device = torch.device(device)
    _check_batch(repeats, "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"warmup must be a non-negative integer; got {warmup!r}")
    work = _cpu_copy(model).to(device)
    results = []
    with torch.no_grad():
        for batch in batches:
            batch = _check_batch(batch)
            x = torch.randn(batch, 3, size, size, device=device)
            for _ in range(warmup):
                _time_once(work, x, device)
            ms = statistics.median(_time_once(work, x, device) for _ in range(repeats))
            results.append({"batch": batch, "ms_per_batch": ms, "ms_per_image": ms / batch})
    del work
    return {"device": str(device), "input_size": size, "repeats": repeats, "batches": results}
