"""The export formats and their checks' constants, and where an export goes (pure Python: the
``export`` command's options read them without torch; the work is ``trainer.files.export``)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from trainer.config.checks import check_path_length
from trainer.errors import UserError

SAFETENSORS_SUFFIX = ".safetensors"
FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": SAFETENSORS_SUFFIX}
DEFAULT_OPSET = 17  # torch 2.4's exporter and ONNX Runtime >= 1.13 both support it
MIN_OPSET = 9  # the oldest opset that has every operator these CNNs export to
TOLERANCE = 1e-4  # max |exported - PyTorch| on the check batch
TRACE_BATCH = 2  # the example batch a dynamic-batch export is traced with
CHECK_BATCH = 4  # a different size, so the check also proves the batch axis is dynamic
CHECK_SEED = 0
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_PACKAGES = ("onnx", "onnxruntime")
# profile/compare --latency: what runs the model (onnxruntime: the exported file, CPU provider)
EXTRA_HINT = 'pip install -e ".[export]" (or pip install onnx onnxruntime)'


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use {', '.join(FORMATS[:-1])} or {FORMATS[-1]}; "
                        "see --help")
    return fmt


def require_onnx(option: str = "--format onnx") -> None:
    """UserError naming the missing packages of the ``export`` extra (onnx, onnxruntime)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if len(missing) == len(ONNX_PACKAGES):
        raise UserError(f"{option} needs {' and '.join(ONNX_PACKAGES)}, which are not "
                        f"installed; {EXTRA_HINT}")
    if missing:
        raise UserError(f"{option} needs {' and '.join(ONNX_PACKAGES)}, and {missing[0]} is not "
                        f"installed; {EXTRA_HINT}")


def default_output(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Beside the checkpoint: model.pth -> model.onnx / model.torchscript.pt / model.safetensors."""
    src = Path(checkpoint)
    stem = src.name[: -len(src.suffix)] if src.suffix else src.name
    return src.with_name(stem + SUFFIXES[fmt])


def resolve_output(checkpoint: str | os.PathLike, fmt: str,
                   output: str | os.PathLike | None) -> Path:
    """The output path (``--output`` or the default); never the input, never a folder."""
    out = Path(output) if output is not None else default_output(checkpoint, fmt)
    option = "--output" if output is not None else "the default output"
    check_path_length(option, out)
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give a file path with --output")
    if out.expanduser().resolve() == Path(checkpoint).expanduser().resolve():
        raise UserError(f"{option} {out} is the input checkpoint; choose another path with "
                        "--output (slimtune never overwrites its source)")
    return out
