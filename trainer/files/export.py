"""Export a checkpoint to a deployable file and check that the file computes what the model does.

Formats (``FORMATS``): ONNX (``torch.onnx.export``, checked with ``onnx.checker`` and run by ONNX
Runtime's CPU provider), TorchScript (``torch.jit.trace`` in eval mode, saved, reloaded and run)
and safetensors (the weights and the metadata that rebuilds the model, reloaded through
``load_checkpoint``). Every format is written to a temp file beside the output, checked on a
seeded batch against the PyTorch model in eval mode, and only then moved into place: a file
whose outputs differ by more than ``TOLERANCE`` is never left behind (exit 1, naming the
difference).

ONNX uses the TorchScript-based exporter (``dynamo=False`` where torch has that switch) with
``dynamic_axes``: it exports every slimtune model in seconds on torch 2.4 to 2.14, needs no
``onnxscript``, writes one self-contained file, and turns a channel selection's
``index_select`` with a constant index into a Gather on a constant. Where the TorchScript-based
exporter is gone, the torch.export-based one is used (with ``dynamic_shapes``).

onnx and onnxruntime (the ``export`` extra) are imported by the functions that use them.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.config.exports import (
    CHECK_BATCH,
    CHECK_SEED,
    DEFAULT_OPSET,
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    TOLERANCE,
    TRACE_BATCH,
    check_format,
    require_onnx,
    resolve_output,
)
from trainer.errors import UserError
from trainer.files.atomic import atomic_path, refuse_replacing_checkpoint, refuse_special
from trainer.files.checkpoint import (
    build_model,
    load_checkpoint,
    make_checkpoint,
    trained_input_size,
)
from trainer.files.safetensors_io import save_safetensors


class ExportMismatch(UserError):
    """The exported file does not compute what the model does (exit 1: nothing was written)."""

    exit_code = 1


@contextmanager
def _quiet():
    """torch 2.9+ warns that the TorchScript exporter and torch.jit are deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def seeded_batch(batch: int, size: int):
    """The fixed input of every check: N(0, 1) images from seed ``CHECK_SEED``."""
    gen = torch.Generator().manual_seed(CHECK_SEED)
    return torch.randn(batch, 3, size, size, generator=gen)


def _legacy_exporter_available() -> bool:
    params = inspect.signature(torch.onnx.export).parameters
    return "dynamo" not in params or "dynamic_axes" in params


def check_opset(opset: int) -> int:
    """``opset`` if this torch's ONNX exporter writes it, else UserError (before exporting:
    torch dumps the whole graph when it refuses an opset)."""
    try:  # a private constant, present from torch 2.4 to 2.14; without it torch decides
        from torch.onnx._constants import ONNX_MAX_OPSET as highest
    except ImportError:  # pragma: no cover
        highest = None
    if opset < MIN_OPSET or (highest is not None and opset > highest):
        top = f"{MIN_OPSET}..{highest}" if highest is not None else f">= {MIN_OPSET}"
        raise UserError(f"--opset {opset} is outside what torch {torch.__version__}'s ONNX "
                        f"exporter writes ({top}); use e.g. --opset {DEFAULT_OPSET}")
    return opset


def export_onnx(model, path: str | os.PathLike, *, input_size: int = 32,
                opset: int = DEFAULT_OPSET, batch: int | None = None) -> None:
    """Write ``model`` (eval mode, CPU) as ONNX; ``batch`` None: a dynamic batch axis."""
    check_opset(opset)
    x = seeded_batch(batch or TRACE_BATCH, input_size)
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME],
                              "opset_version": opset}
    if _legacy_exporter_available():
        if batch is None:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False
    else:  # pragma: no cover -- a torch without the TorchScript-based exporter
        kwargs.update(dynamo=True, external_data=False)
        if batch is None:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model.eval(), (x,), str(path), **kwargs)
    except (RuntimeError, ValueError) as exc:
        if "opset" in str(exc).lower():
            raise UserError(f"--opset {opset} is not supported by torch {torch.__version__}'s "
                            f"ONNX exporter ({_line(exc)}); use e.g. --opset "
                            f"{DEFAULT_OPSET}") from None
        raise


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session on the CPU provider (``threads``: intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_onnx(path: Path, x) -> Any:
    import onnx
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportMismatch(f"onnx.checker rejected the exported file ({_line(exc)}); nothing "
                             "was written") from None
    try:
        out = onnx_session(path).run(None, {INPUT_NAME: x.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own exception types
        raise ExportMismatch(f"ONNX Runtime cannot run the exported file ({_line(exc)}); "
                             f"nothing was written; try --opset {DEFAULT_OPSET}") from None
    return torch.from_numpy(out)


def export_torchscript(model, path: str | os.PathLike, *, input_size: int = 32,
                       batch: int | None = None) -> None:
    """``torch.jit.trace`` of ``model`` in eval mode, saved to ``path``."""
    x = seeded_batch(batch or TRACE_BATCH, input_size)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model.eval(), x, check_trace=False)  # checked below instead
        torch.jit.save(traced, str(path))


def _check_torchscript(path: Path, x) -> Any:
    with _quiet(), torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu").eval()(x)


def _check_safetensors(path: Path, x) -> Any:
    model = build_model(load_checkpoint(path)).eval()  # a torchvision replay needs autograd
    with torch.no_grad():
        return model(x)


def max_abs_diff(a, b) -> float:
    """max |a - b| (inf when the shapes differ or a value is not finite)."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    diff = (a.double() - b.double()).abs().max().item()
    return diff if diff == diff else float("inf")  # NaN -> inf


def _runtime_name(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime

        return f"ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)"
    if fmt == "torchscript":
        return "torch.jit.load"
    return "load_checkpoint + build_model"


def _write(fmt: str, model, ckpt: dict, path: Path, *, input_size: int, opset: int,
           batch: int | None) -> None:
    if fmt == "onnx":
        export_onnx(model, path, input_size=input_size, opset=opset, batch=batch)
    elif fmt == "torchscript":
        export_torchscript(model, path, input_size=input_size, batch=batch)
    else:
        extra = {k: ckpt[k] for k in ("history", "best_acc", "best_epoch", "prune", "config")
                 if ckpt.get(k) is not None}
        save_safetensors(path, make_checkpoint(model, **extra))


CHECKS = {"onnx": _check_onnx, "torchscript": _check_torchscript,
          "safetensors": _check_safetensors}


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike | None
                      = None, *, batch: int | None = None, opset: int = DEFAULT_OPSET,
                      input_size: int | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` as ``fmt``, check it, and move it into place; returns what was done.

    ``batch`` None: a dynamic batch axis (ONNX), checked on ``CHECK_BATCH`` images; else the
    file's fixed batch, checked on that many. Raises UserError for bad input and
    ExportMismatch (exit 1) when the file's outputs differ by more than ``TOLERANCE``.
    """
    check_format(fmt)
    if fmt == "onnx":
        require_onnx()
        check_opset(opset)
    out = resolve_output(checkpoint, fmt, output)
    option = "--output" if output is not None else "the default output"
    refuse_special(out, option)
    refuse_replacing_checkpoint(out, option)  # an export never takes a checkpoint's place
    ckpt = load_checkpoint(checkpoint)
    if input_size is None:  # the size it was trained at
        input_size = trained_input_size(ckpt)
    model = build_model(ckpt).eval()
    x = seeded_batch(batch or CHECK_BATCH, input_size)
    try:
        with torch.no_grad():
            want = model(x)
    except RuntimeError as exc:
        raise UserError(f"the {ckpt['arch']} of {checkpoint} does not run at input "
                        f"3×{input_size}×{input_size} ({_line(exc)}); choose another "
                        "--input-size (CIFAR: 32)") from None
    try:
        with atomic_path(out) as tmp:  # checked before it replaces anything
            _write(fmt, model, ckpt, tmp, input_size=input_size, opset=opset, batch=batch)
            diff = max_abs_diff(CHECKS[fmt](tmp, x), want)
            if not diff <= TOLERANCE:
                raise ExportMismatch(
                    f"the exported {fmt} file differs from the PyTorch model: max |Δ| = "
                    f"{diff:.3g} > {TOLERANCE:.0e} on a seeded batch of {len(x)}; nothing was "
                    f"written to {out}")
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); choose a writable "
                        "--output") from None
    return {"checkpoint": str(checkpoint), "output": str(out), "format": fmt,
            "arch": ckpt["arch"], "opset": opset if fmt == "onnx" else None,
            "batch": batch if batch is not None else "dynamic", "input_size": input_size,
            "bytes": out.stat().st_size, "check_batch": len(x), "max_abs_diff": diff,
            "tolerance": TOLERANCE, "checked_with": _runtime_name(fmt)}


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
