"""The ``profile`` and ``compare`` commands (numbers and tables: trainer.measure.report; latency:
trainer.measure.profiling). Building them imports no torch."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trainer.cli.archopt import ArchOption, names_user_model
from trainer.cli.common import ThreadsOption, flag, use_threads
from trainer.config.checks import check_path_length
from trainer.config.exports import require_onnx
from trainer.config.paths import COMPARE_FIGURE
from trainer.config.settings import DEVICES, RUNTIMES
from trainer.errors import UserError
from trainer.files.atomic import refuse_replacing_checkpoint, refuse_special


def _console() -> Console:
    console = Console()
    # piped or captured output: rich would assume 80 columns and squeeze the tables
    return console if console.is_terminal else Console(width=160)


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{option} must be comma-separated positive integers (e.g. 1,256); "
                        f"got {text!r}")
    return values


InputSize = Annotated[int | None, typer.Option(
    "--input-size", show_default=False,
    help="Input height/width in pixels (default: the image size the checkpoint was trained "
         "at, else 32; compare: the baseline's).")]
BatchSizes = Annotated[str, typer.Option(
    "--batch-sizes", show_default=False,
    help="Batch sizes timed by --latency, comma-separated (default 1,256).")]
Repeats = Annotated[int, typer.Option(
    "--repeats", show_default=False,
    help="Timed rounds for --latency; each round times every model once per batch size, "
         "interleaved (default 20).")]
Warmup = Annotated[int, typer.Option(
    "--warmup", show_default=False,
    help="Untimed passes per model and batch size before the rounds (default 5).")]
Device = Annotated[str | None, typer.Option(
    "--device", show_default=False,
    help=f"Where --latency runs: {' or '.join(DEVICES)} (default: cuda when available and "
         "--runtime is torch, else cpu).")]
Runtime = Annotated[str, typer.Option(
    "--runtime", show_default=False,
    help=f"What --latency times: {' or '.join(RUNTIMES)} (the model exported to a temp ONNX "
         "file, ONNX Runtime's CPU provider; needs the export extra) (default torch).")]


@dataclass(frozen=True)
class LatencyOptions:
    """--latency's settings, checked (see :func:`latency_options`)."""

    device: str
    batches: list[int]
    warmup: int
    repeats: int
    runtime: str


def latency_options(device: str | None, cpu: bool, batch_sizes: str, warmup: int,
                    repeats: int, runtime: str) -> LatencyOptions:
    """Check --latency's options (UserError naming the bad one)."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: use {' or '.join(RUNTIMES)}; see --help")
    if runtime == "onnxruntime":
        require_onnx("--runtime onnxruntime")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1; got {repeats}")
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0; got {warmup}")
    from trainer.measure.profiling import resolve_device

    device = resolve_device(device, cpu, runtime)
    if runtime == "onnxruntime" and device != "cpu":
        raise UserError("--runtime onnxruntime times ONNX Runtime's CPU provider; use "
                        "--device cpu (or --runtime torch on the GPU)")
    return LatencyOptions(device, _parse_ints(batch_sizes, "--batch-sizes"), warmup, repeats,
                          runtime)


@names_user_model
def profile_command(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint files (.pth or .safetensors) to measure.", show_default=False)],
    input_size: InputSize = None,
    json_out: flag("--json", "Print one JSON object per checkpoint per line instead of a "
                   "table (default off).") = False,
    latency: flag("--latency", "Also measure latency: median and min–max ms per batch and "
                  "images/s (default off).") = False,
    device: Device = None,
    cpu: flag("--cpu", "Same as --device cpu (default off).") = False,
    batch_sizes: BatchSizes = "1,256",
    repeats: Repeats = 20,
    warmup: Warmup = 5,
    runtime: Runtime = "torch",
    threads: ThreadsOption = None,
    arch: ArchOption = None,
) -> None:
    """Count params, MACs and FLOPs (= 2×MACs) of checkpoints; optionally measure latency."""
    from trainer.measure.profiling import check_input_size, profile_checkpoint
    from trainer.measure.report import add_latency, render_latency_table

    use_threads(threads)
    size = None if input_size is None else check_input_size(input_size)
    opts = latency_options(device, cpu, batch_sizes, warmup, repeats, runtime) if latency \
        else None
    results = []
    for path in checkpoints:
        results.append(profile_checkpoint(path, size, arch))
        if json_out and opts is None:  # one line per checkpoint as soon as it is counted
            typer.echo(json.dumps(results[-1]))
    if opts is not None:  # timed together: the rounds interleave the models
        add_latency(results, device=opts.device, batches=opts.batches, warmup=opts.warmup,
                    repeats=opts.repeats, runtime=opts.runtime, speedups=False)
        if json_out:
            for info in results:
                typer.echo(json.dumps(info))
    if not json_out:
        console = _console()
        console.print(_profile_table(results))
        if opts is not None:
            console.print(render_latency_table(results, name_key="name"))


def _profile_table(results: Sequence[Mapping[str, Any]]) -> Table:
    from trainer.measure.report import _m, _pct

    sizes = {r["input_size"] for r in results}
    title = f"Model cost at input 1×3×{next(iter(sizes))}²" if len(sizes) == 1 else \
        "Model cost (each at its input size)"
    table = Table(title=title)
    table.add_column("checkpoint")
    table.add_column("arch")
    for header in ("input", "params", "params (M)", "MACs (M)", "FLOPs (M) = 2×MACs",
                   "best test acc (%)"):
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r["name"], r["arch"], f"{r['input_size']}²", f"{r['params']:,}",
                      _m(r["params"]), _m(r["macs"]), _m(r["flops"]), _pct(r.get("best_acc")))
    return table


def _compare_labels(checkpoints: list[Path], baseline: Path | None, output: Path,
                    labels: str | None) -> list[str] | None:
    """Refuse a figure path that would overwrite a source or is a folder; parse --labels."""
    check_path_length("--output", output)
    for src in [*checkpoints, *([baseline] if baseline else [])]:
        if output.resolve() == src.resolve():
            raise UserError(f"--output {output} is one of the checkpoints compared; choose "
                            "another path for the figure (slimtune never overwrites its source)")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the path of a .png file")
    refuse_special(output, "--output")
    refuse_replacing_checkpoint(output, "--output")
    names = None if labels is None else [s.strip() for s in labels.split(",")]
    if names is not None and not all(names):
        raise UserError(f"--labels has an empty name in {labels!r}; give one non-empty label "
                        "per checkpoint")
    return names


@names_user_model
def compare_command(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint files (.pth or .safetensors) to compare.", show_default=False)],
    labels: Annotated[str | None, typer.Option(
        "--labels", show_default=False,
        help="Comma-separated names, one per checkpoint (default: file names).")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", show_default=False,
        help="Checkpoint every other is compared with; added first if not "
             "among CHECKPOINTS (default: the first checkpoint).")] = None,
    output: Annotated[Path, typer.Option(
        "--output", show_default=False,
        help=f"Where the comparison figure (PNG) goes (default "
             f"{COMPARE_FIGURE}).")] = COMPARE_FIGURE,
    input_size: InputSize = None,
    json_out: flag("--json", "Print one JSON object {rows, figure} instead of a table "
                   "(default off).") = False,
    latency: flag("--latency", "Also measure latency and add the panel 'measured speed-up vs "
                  "MAC reduction' to the figure (default off: a fast, machine-independent "
                  "figure).") = False,
    device: Device = None,
    batch_sizes: BatchSizes = "1,256",
    repeats: Repeats = 20,
    warmup: Warmup = 5,
    runtime: Runtime = "torch",
    threads: ThreadsOption = None,
    arch: ArchOption = None,
) -> None:
    """Compare checkpoints with a baseline: params, MACs, accuracy and a figure.

    --latency adds measured speed-ups beside the MAC reductions."""
    from trainer.measure.plots import plot_comparison
    from trainer.measure.report import (
        add_latency,
        compare_rows,
        render_compare_table,
        render_latency_table,
    )

    use_threads(threads)
    names = _compare_labels(checkpoints, baseline, output, labels)
    opts = latency_options(device, False, batch_sizes, warmup, repeats, runtime) if latency \
        else None
    rows = compare_rows([str(p) for p in checkpoints], names,
                        None if baseline is None else str(baseline), input_size, arch)
    if opts is not None:
        add_latency(rows, device=opts.device, batches=opts.batches, warmup=opts.warmup,
                    repeats=opts.repeats, runtime=opts.runtime)
    size = rows[0]["input_size"]
    archs = ", ".join(dict.fromkeys(r["arch"] for r in rows))
    title = f"{archs} checkpoints vs baseline '{rows[0]['label']}' (input 3×{size}×{size})"
    try:
        figure = plot_comparison(rows, output, title=title)
    except OSError as exc:
        raise UserError(f"cannot write the figure to {output} ({exc.strerror or exc}); "
                        "choose another --output") from None
    if json_out:
        typer.echo(json.dumps({"rows": rows, "figure": str(figure)}))
        return
    console = _console()
    console.print(render_compare_table(rows))
    if opts is not None:
        console.print(render_latency_table(rows))
    console.print(f"figure: {figure}")


def register(app: typer.Typer) -> None:
    """Add the ``profile`` and ``compare`` commands to ``app``."""
    app.command("profile")(profile_command)
    app.command("compare")(compare_command)
