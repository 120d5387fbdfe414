"""The ``export`` command (the work: trainer.files.export). Building it imports no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from trainer.cli.archopt import ArchOption, names_user_model
from trainer.cli.common import ThreadsOption, flag, use_threads
from trainer.config.exports import (
    CHECK_BATCH,
    DEFAULT_OPSET,
    FORMATS,
    SUFFIXES,
    TOLERANCE,
    check_format,
)
from trainer.errors import UserError

_DEFAULTS = ", ".join(f"{SUFFIXES[f]} for {f}" for f in FORMATS)


@names_user_model
def export_command(
    checkpoint: Annotated[Path, typer.Argument(
        help="Checkpoint to export (.pth or .safetensors).", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", show_default=False,
        help=f"File to write: {', '.join(FORMATS)}.")],
    output: Annotated[Path | None, typer.Option(
        "--output", show_default=False,
        help=f"Where the file goes (default: beside CHECKPOINT with {_DEFAULTS}; never the "
             "input, never a folder).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", show_default=False,
        help="A fixed batch size for the ONNX file, also the size of the check batch (default: "
             f"a dynamic batch axis, checked on {CHECK_BATCH} images).")] = None,
    dynamic_batch: flag("--dynamic-batch", "A dynamic batch axis (the default without "
                        "--batch-size; TorchScript and safetensors files take any "
                        "batch).") = False,
    opset: Annotated[int, typer.Option(
        "--opset", show_default=False,
        help=f"ONNX opset version (default {DEFAULT_OPSET}).")] = DEFAULT_OPSET,
    input_size: Annotated[int | None, typer.Option(
        "--input-size", show_default=False,
        help="Input height/width in pixels of the exported graph and the check (default: the "
             "image size the checkpoint was trained at, else 32).")] = None,
    json_out: flag("--json",
                   "Print one JSON object instead of the two lines (default off).") = False,
    threads: ThreadsOption = None,
    arch: ArchOption = None,
) -> None:
    """Export a checkpoint to ONNX, TorchScript or safetensors, checked against PyTorch.

    The file is written to a temp file, run on a seeded batch (ONNX: ONNX Runtime's CPU
    provider after onnx.checker; TorchScript: reloaded with torch.jit.load; safetensors:
    reloaded as a checkpoint) and compared with the model in eval mode; only a file whose
    largest difference is at most 1e-4 replaces the output (else exit 1). ONNX needs the
    export extra: pip install -e ".[export]".
    """
    check_format(fmt)
    if batch_size is not None and dynamic_batch:
        raise UserError(f"--batch-size {batch_size} fixes the batch and --dynamic-batch frees "
                        "it; give one of them, not both")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer; got {batch_size}")
    from trainer.files.export import export_checkpoint
    from trainer.measure.profiling import check_input_size

    use_threads(threads)
    info = export_checkpoint(checkpoint, fmt, output, batch=batch_size, opset=opset,
                             input_size=None if input_size is None
                             else check_input_size(input_size))
    if json_out:
        typer.echo(json.dumps(info))
        return
    what = {"onnx": f"ONNX opset {opset}", "torchscript": "TorchScript (torch.jit.trace)",
            "safetensors": "safetensors"}[fmt]
    typer.echo(f"exported {checkpoint} -> {info['output']} ({what}, {info['arch']}, batch "
               f"{info['batch']}, input 3×{info['input_size']}×{info['input_size']}; "
               f"{info['bytes'] / 1e6:.2f} MB)")
    checker = "onnx.checker passed; " if fmt == "onnx" else ""
    typer.echo(f"checked: {checker}{info['checked_with']} on a seeded batch of "
               f"{info['check_batch']}: max |Δ| vs PyTorch (eval) = {info['max_abs_diff']:.2e} "
               f"≤ {TOLERANCE:.0e}")


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""
    app.command("export")(export_command)
