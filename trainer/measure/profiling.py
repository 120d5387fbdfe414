"""Parameter, MAC/FLOP and latency measurements of a (pruned) model.

Units, stated once and used everywhere: **MACs** are multiply-accumulates, the number the
lab and most pruning papers call "FLOPs"; **FLOPs** here are 2 x MACs (one multiply plus
one add). Counts come from ``thop`` on a throw-away CPU copy of the model, so the model
the caller passes in is never touched (no hooks, no ``total_ops`` buffers, same device
and train/eval mode).

Latency is measured, not derived: milliseconds per forward pass of a batch (CUDA events on
a GPU, ``perf_counter`` on the CPU), after warm-up, in rounds interleaved over the models,
reported as median and min–max; images/s = batch / median. Fewer MACs need not mean less
time (memory-bound layers, small convolutions that use the cores badly, kernel launches),
which is why both are reported side by side.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import thop
import torch
from torch import nn

from trainer.config.settings import DEVICES, RUNTIMES
from trainer.errors import UserError
from trainer.files.checkpoint import (
    build_model,
    load_checkpoint,
    summarize_history,
    trained_input_size,
)
from trainer.files.export import INPUT_NAME, export_onnx, onnx_session
from trainer.models.family import unwrap_model
from trainer.prune.engine import copy_to_meta

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


def check_input_fits(model: nn.Module, size: int, flag: str = "--input-size") -> None:
    """UserError when ``model`` cannot run on ``size`` x ``size`` images (VGG's five max-pools
    need 32), naming the smallest size it runs at. Run on a weightless copy where the family
    has one (else a CPU copy), one image, in eval mode: the model is untouched."""
    bare = unwrap_model(model)
    shape = copy_to_meta(bare).eval()
    device = next(shape.parameters()).device

    def error_at(side: int) -> str | None:
        try:
            with torch.no_grad():
                shape(torch.zeros(1, 3, side, side, device=device))
        except (RuntimeError, ValueError, IndexError) as exc:
            lines = str(exc).strip().splitlines()
            return (lines[0] if lines else type(exc).__name__)[:160]
        return None

    why = error_at(size)
    if why is None:
        return
    low, high = size, next((s for s in (2 ** k for k in range(1, 13)) if s > size
                            and error_at(s) is None), None)
    while high is not None and high - low > 1:  # the smallest side it runs at
        mid = (low + high) // 2
        low, high = (low, mid) if error_at(mid) is None else (mid, high)
    fix = f"use {flag} {high} or more" if high else f"choose another {flag}"
    raise UserError(f"{flag} {size} is too small for {bare.arch} ({why}); {fix}")


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
    size = check_input_size(input_size)
    batch = _check_batch(batch)
    bare = unwrap_model(model)
    check_input_fits(bare, size)
    params = sum(p.numel() for p in bare.parameters())
    work = _cpu_copy(bare)
    x = torch.zeros(batch, 3, size, size)
    with torch.no_grad():
        macs, _ = thop.profile(work, inputs=(x,), verbose=False)
    macs = round(float(macs))  # thop sums in float64; exact below 2**53
    return {"params": int(params), "macs": macs, "flops": 2 * macs, "input_size": size}


def profile_checkpoint(path: str | os.PathLike, input_size: int | None = None,
                       arch: str | None = None) -> dict[str, Any]:
    """Profile the model a checkpoint file describes (see :func:`profile_model`), at
    ``input_size`` (None: the size it was trained at, else 32); ``arch``: that of a file naming
    none (as ``--arch``).

    Adds ``name`` (file stem), ``path`` and, when the checkpoint records one, ``best_acc``
    (best test accuracy in %). Raises CheckpointError for unusable files.
    """
    ckpt = load_checkpoint(path, arch)
    size = check_input_size(trained_input_size(ckpt) if input_size is None else input_size)
    model = build_model(ckpt)
    out: dict[str, Any] = {"name": Path(path).stem, "path": str(path), "arch": ckpt["arch"]}
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


def _torch_runner(model: nn.Module, device: torch.device) -> Callable[[Any], Any]:
    return _cpu_copy(model).to(device)


def _onnx_runner(model: nn.Module, folder: str, index: int, size: int) -> Callable[[Any], Any]:
    """ONNX Runtime's CPU provider on the model exported to ``folder`` (dynamic batch), with
    as many intra-op threads as torch uses, so the two runtimes share the cores alike."""
    path = Path(folder) / f"model{index}.onnx"
    export_onnx(_cpu_copy(model), path, input_size=size)
    session = onnx_session(path, threads=torch.get_num_threads())
    return lambda x: session.run(None, {INPUT_NAME: x})


def _inputs(batches: Sequence[int], size: int, device: torch.device, runtime: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, size, size, generator=gen) for b in batches}
    return {b: x.numpy() if runtime == "onnxruntime" else x.to(device) for b, x in xs.items()}


def _timed_ms(run: Callable[[Any], Any], x: Any, device: torch.device) -> float:
    """Milliseconds of one forward pass (CUDA events on a GPU, see Timer)."""
    with Timer(device) as t:
        run(x)
    return t.seconds * 1000.0


def _check_latency_args(device: torch.device, runtime: str, warmup: Any, repeats: Any) -> None:
    _check_batch(repeats, "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"warmup must be a non-negative integer; got {warmup!r}")
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: use {' or '.join(RUNTIMES)}; see --help")
    if runtime == "onnxruntime" and device.type != "cpu":
        raise UserError("--runtime onnxruntime times ONNX Runtime's CPU provider; use "
                        "--device cpu (or --runtime torch on the GPU)")


def measure_latencies(models: Mapping[str, nn.Module], device: str | torch.device,
                      input_size: int = 32, batches: Sequence[int] = (1, 256),
                      warmup: int = 5, repeats: int = 20,
                      runtime: str = "torch") -> dict[str, dict[str, Any]]:
    """Forward latency of several models (eval mode, no_grad), measured in interleaved rounds.

    Each model and batch size first runs ``warmup`` untimed passes; then round 1 times one
    pass of every model at every batch size, round 2 the next, ... (``repeats`` rounds), so
    a change in machine load hits every model alike. ``runtime`` "onnxruntime" exports each
    model to a temp ONNX file and times ONNX Runtime's CPU provider. Runs on copies (the
    models are untouched). Returns per model ``{"device", "runtime", "threads",
    "input_size", "warmup", "repeats", "batches": [{"batch", "ms_per_batch" (median),
    "ms_min", "ms_max", "ms_per_image", "images_per_s"}, ...]}`` (milliseconds).
    """
    size = check_input_size(input_size)
    device = torch.device(device)
    _check_latency_args(device, runtime, warmup, repeats)
    batches = [_check_batch(b) for b in batches]
    for model in models.values():
        check_input_fits(model, size)
        check_batches_fit(model, batches, size, device)
    at = {"batch": batches[0]}  # the batch being made or timed, for an out-of-memory message
    try:
        times = _time_rounds(models, device, size, batches, warmup, repeats, runtime, at)
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        raise UserError(f"--batch-sizes {at['batch']}: out of memory timing a batch of "
                        f"{at['batch']:,} images of 3×{size}×{size} on {device} "
                        f"({_first_line(exc)}); give smaller --batch-sizes") from None
    head = {"device": str(device), "runtime": runtime, "threads": torch.get_num_threads(),
            "input_size": size, "warmup": warmup, "repeats": repeats}
    return {name: {**head, "batches": [_summary(b, times[name, b]) for b in batches]}
            for name in models}


def _time_rounds(models: Mapping[str, nn.Module], device: torch.device, size: int,
                 batches: list[int], warmup: int, repeats: int, runtime: str,
                 at: dict[str, int]) -> dict[tuple[str, int], list[float]]:
    """The milliseconds of every (model, batch): warm-up, then interleaved rounds."""
    with tempfile.TemporaryDirectory(prefix="slimtune-latency-") as folder, torch.no_grad():
        runners = {name: (_onnx_runner(m, folder, i, size) if runtime == "onnxruntime"
                          else _torch_runner(m, device))
                   for i, (name, m) in enumerate(models.items())}
        xs = {}
        for b in batches:
            at["batch"] = b
            xs.update(_inputs([b], size, device, runtime))
        timer_device = device if runtime == "torch" else torch.device("cpu")
        for run in runners.values():
            for b in batches:
                at["batch"] = b
                for _ in range(warmup):
                    _timed_ms(run, xs[b], timer_device)
        times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in batches}
        for _ in range(repeats):
            for name, run in runners.items():
                for b in batches:
                    at["batch"] = b
                    times[name, b].append(_timed_ms(run, xs[b], timer_device))
        del runners
    return times


def check_batches_fit(model: nn.Module, batches: Sequence[int], size: int,
                      device: torch.device) -> None:
    """UserError for a batch whose input and largest layer output (eval mode, no grad: the
    least a forward pass holds at once) exceed the memory free on ``device``: found before
    allocating, as a kernel out-of-memory kill gives no message at all."""
    free = _free_bytes(device)
    if free is None:
        return
    per_image = 4 * (3 * size * size + 2 * _largest_output(model, size))
    for b in batches:
        if b * per_image > free:
            raise UserError(f"--batch-sizes {b}: a batch of {b:,} images of 3×{size}×{size} "
                            f"needs at least {b * per_image / 1e9:,.1f} GB on {device} and "
                            f"{free / 1e9:,.1f} GB are free (out of memory); give smaller "
                            "--batch-sizes")


def _largest_output(model: nn.Module, size: int) -> int:
    """The most elements one layer outputs for one image (a weightless copy where possible)."""
    shape = copy_to_meta(unwrap_model(model)).eval()
    device = next(shape.parameters()).device
    largest = [0]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    handles = [m.register_forward_hook(hook) for m in shape.modules()]
    try:
        with torch.no_grad():
            shape(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation: the device's, or on the CPU the smaller of what Linux
    has available and what this process's address-space limit leaves; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text()
            used = next(int(ln.split()[1]) * 1024 for ln in status.splitlines()
                        if ln.startswith("VmSize:"))
            free = min(free if free is not None else limit, max(limit - used, 0))
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    return free


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def _summary(batch: int, ms: list[float]) -> dict[str, Any]:
    median = statistics.median(ms)
    return {"batch": batch, "ms_per_batch": median, "ms_min": min(ms), "ms_max": max(ms),
            "ms_per_image": median / batch,
            "images_per_s": batch / (median / 1000.0) if median > 0 else float("inf")}


def measure_latency(model: nn.Module, device: str | torch.device, input_size: int = 32,
                    batches: Sequence[int] = (1, 256), warmup: int = 5,
                    repeats: int = 20, runtime: str = "torch") -> dict[str, Any]:
    """Median forward latency of one model (see :func:`measure_latencies`)."""
    return measure_latencies({"model": model}, device, input_size, batches, warmup, repeats,
                             runtime)["model"]


def resolve_device(device: str | None, cpu: bool = False, runtime: str = "torch") -> str:
    """``--device`` (``--cpu`` = ``--device cpu``); default: cuda when available and the
    runtime is torch, else cpu."""
    if cpu and device not in (None, "cpu"):
        raise UserError(f"--cpu and --device {device} contradict each other; give one of them")
    device = "cpu" if cpu else device
    if device is None:
        return "cuda" if runtime == "torch" and torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: use {' or '.join(DEVICES)}; see --help")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible on this machine; use "
                        "--device cpu")
    return device
