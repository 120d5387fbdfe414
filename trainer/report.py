"""The ``profile`` and ``compare`` commands and the pipeline's one-file markdown report.

Numbers: params are exact counts; MACs are multiply-accumulates (what the lab calls
"FLOPs"); FLOPs = 2 x MACs; accuracies are best test accuracy in %.
Reductions are positive when the model is smaller than the baseline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trainer.errors import UserError
from trainer.files import atomic_write_text
from trainer.paths import COMPARE_FIGURE, REPORT

# ---------------------------------------------------------------- numbers


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _order(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None,
           baseline: str | os.PathLike | None) -> list[tuple[str, str]]:
    """(path, label) pairs with the baseline first (added when not among ``paths``)."""
    paths = [str(p) for p in paths]
    if not paths and baseline is None:
        raise UserError("no checkpoints given; pass one or more .pth files")
    if labels is not None and len(labels) != len(paths):
        raise UserError(
            f"--labels has {len(labels)} names for {len(paths)} checkpoints; give one label per "
            "checkpoint, comma-separated, in the same order"
        )
    pairs = list(zip(paths, labels if labels is not None else [Path(p).stem for p in paths]))
    if baseline is not None:
        hit = next((i for i, (p, _) in enumerate(pairs) if _same_file(p, baseline)), None)
        first = pairs.pop(hit) if hit is not None else (str(baseline), Path(baseline).stem)
        pairs.insert(0, first)
    return pairs


def _reduction(value: float, base: float) -> float | None:
    return 100.0 * (1.0 - value / base) if base else None


def compare_rows(paths: list[str], labels: list[str] | None = None, baseline: str | None = None,
                 input_size: int = 32) -> list[dict[str, Any]]:
    """Profile checkpoints and compare each with the baseline (given, else the first).

    Returns one dict per checkpoint, baseline first with ``baseline=True``: label, path,
    params, macs, flops, input_size, best_acc (or None), param_reduction_pct,
    mac_reduction_pct (% smaller than the baseline) and acc_delta (points, or None).
    """
    from trainer.profiling import check_input_size, profile_checkpoint

    size = check_input_size(input_size)
    rows = []
    for i, (path, label) in enumerate(_order(paths, labels, baseline)):
        info = profile_checkpoint(path, size)
        rows.append({"label": label, "path": path, "params": info["params"],
                     "macs": info["macs"], "flops": info["flops"], "input_size": size,
                     "best_acc": info.get("best_acc"), "baseline": i == 0})
    base = rows[0]
    for row in rows:
        row["param_reduction_pct"] = _reduction(row["params"], base["params"])
        row["mac_reduction_pct"] = _reduction(row["macs"], base["macs"])
        both = row["best_acc"] is not None and base["best_acc"] is not None
        row["acc_delta"] = row["best_acc"] - base["best_acc"] if both else None
    return rows


# ---------------------------------------------------------------- formatting


def _m(value: float | None, digits: int = 2) -> str:
    """Count in millions, e.g. 23513162 -> '23.51'."""
    return "n/a" if value is None else f"{value / 1e6:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _red(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _delta(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _label(row: Mapping[str, Any]) -> str:
    label = str(row["label"])
    if row.get("baseline") and "baseline" not in label.lower():
        return f"{label} (baseline)"
    return label


def render_compare_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """A rich table of :func:`compare_rows` output (baseline row marked)."""
    size = rows[0].get("input_size", 32) if rows else 32
    table = Table(title=f"Checkpoints vs baseline (input 1×3×{size}×{size})")
    for header in ("label", "params (M)", "params reduction", "MACs (M)", "MACs reduction",
                   "FLOPs (M) = 2×MACs", "best test acc (%)", "Δ acc (points)"):
        table.add_column(header, justify="left" if header == "label" else "right",
                         no_wrap=header != "label")
    for r in rows:
        table.add_row(_label(r), _m(r["params"]), _red(r.get("param_reduction_pct")),
                      _m(r["macs"]), _red(r.get("mac_reduction_pct")), _m(r["flops"]),
                      _pct(r.get("best_acc")), _delta(r.get("acc_delta")))
    return table


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return lines


def _rows_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    headers = ("label", "params", "params (M)", "params reduction", "MACs (M)", "MACs reduction",
               "FLOPs (M) = 2×MACs", "best test acc (%)", "Δ acc (points)")
    body = [[_label(r), f"{r['params']:,}",
             _m(r["params"]), _red(r.get("param_reduction_pct")), _m(r["macs"]),
             _red(r.get("mac_reduction_pct")), _m(r["flops"]), _pct(r.get("best_acc")),
             _delta(r.get("acc_delta"))] for r in rows]
    return _md_table(headers, body)


def _pipeline_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys per row: ratio, params, and optionally macs, pruned_acc, best_acc."""
    headers = ("prune ratio", "params (M)", "MACs (M)", "test acc right after pruning (%)",
               "best test acc after fine-tuning (%)")
    body = [[r.get("ratio", "n/a"), _m(r.get("params")), _m(r.get("macs")),
             _pct(r.get("pruned_acc")), _pct(r.get("best_acc"))] for r in rows]
    return _md_table(headers, body)


def write_report(workdir: Path, *, title: str, rows: list[dict],
                 figures: list[tuple[str, Path]], pipeline_rows: list[dict] | None = None,
                 settings: dict | None = None) -> Path:
    """Write ``<workdir>/report.md``: settings, results table, pipeline table, figures.

    ``rows`` are :func:`compare_rows` dicts; ``pipeline_rows`` have ratio, params and
    optionally macs, pruned_acc (accuracy right after pruning) and best_acc; figures are
    (caption, path) pairs embedded by paths relative to ``workdir``.
    """
    workdir = Path(workdir)
    lines = [f"# {title}", ""]
    if settings:
        lines += ["## Settings", ""] + [f"- **{k}**: {_md_cell(v)}" for k, v in settings.items()]
        lines.append("")
    if rows:
        lines += ["## Results", "",
                  ("MACs are multiply-accumulates (what the lab and most papers call FLOPs); "
                   "FLOPs = 2 × MACs. Reductions are relative to the baseline row."), ""]
        lines += _rows_markdown(rows) + [""]
    if pipeline_rows:
        lines += ["## Pipeline", ""] + _pipeline_markdown(pipeline_rows) + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, fig in figures:
            rel = Path(os.path.relpath(Path(fig).resolve(), workdir.resolve())).as_posix()
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    path = workdir / REPORT
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


# ---------------------------------------------------------------- commands


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


def _latency_for(path: str, size: int, device: str, batches: list[int],
                 repeats: int) -> dict[str, Any]:
    from trainer.checkpoint import build_model, load_checkpoint
    from trainer.profiling import measure_latency

    model = build_model(load_checkpoint(path))
    return measure_latency(model, device, size, batches=batches, repeats=repeats)


def profile_command(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint files (.pth) to measure.", show_default=False)],
    input_size: Annotated[int, typer.Option(
        "--input-size", show_default=False,
        help="Input height/width in pixels (default 32, CIFAR).")] = 32,
    json_out: Annotated[bool, typer.Option(
        "--json", show_default=False,
        help="Print one JSON object per checkpoint per line instead of a table "
             "(default off).")] = False,
    latency: Annotated[bool, typer.Option(
        "--latency", show_default=False,
        help="Also time forward passes, median ms (default off).")] = False,
    cpu: Annotated[bool, typer.Option(
        "--cpu", show_default=False,
        help="Time on CPU even when CUDA is available (default off).")] = False,
    batch_sizes: Annotated[str, typer.Option(
        "--batch-sizes", show_default=False,
        help="Batch sizes timed by --latency (default 1,256).")] = "1,256",
    repeats: Annotated[int, typer.Option(
        "--repeats", show_default=False,
        help="Timed runs per batch size for --latency (default 20).")] = 20,
) -> None:
    """Count params, MACs and FLOPs (= 2×MACs) of checkpoints; optionally time them."""
    import torch

    from trainer.profiling import check_input_size, profile_checkpoint

    size = check_input_size(input_size)
    batches = _parse_ints(batch_sizes, "--batch-sizes") if latency else []
    if latency and repeats < 1:
        raise UserError(f"--repeats must be >= 1; got {repeats}")
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    results = []
    for path in checkpoints:
        info = profile_checkpoint(path, size)
        if latency:
            info["latency"] = _latency_for(str(path), size, device, batches, repeats)
        results.append(info)
        if json_out:  # one line per checkpoint as soon as it is measured
            typer.echo(json.dumps(info))
    if not json_out:
        _console().print(_profile_table(results, size))


def _profile_table(results: Sequence[Mapping[str, Any]], size: int) -> Table:
    table = Table(title=f"Model cost at input 1×3×{size}×{size}")
    table.add_column("checkpoint")
    for header in ("params", "params (M)", "MACs (M)", "FLOPs (M) = 2×MACs", "best test acc (%)"):
        table.add_column(header, justify="right", no_wrap=True)
    lat = results[0].get("latency") if results else None
    for b in (lat or {}).get("batches", []):
        table.add_column(f"latency b={b['batch']}\nms/batch (ms/img)", justify="right",
                         no_wrap=True)
    for r in results:
        cells = [r["name"], f"{r['params']:,}", _m(r["params"]), _m(r["macs"]), _m(r["flops"]),
                 _pct(r.get("best_acc"))]
        for b in (r.get("latency") or {}).get("batches", []):
            cells.append(f"{b['ms_per_batch']:.2f} ({b['ms_per_image']:.3f})")
        table.add_row(*cells)
    if lat:
        table.caption = f"latency: median of {lat['repeats']} runs on {lat['device']}"
    return table


def compare_command(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Checkpoint files (.pth) to compare.", show_default=False)],
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
    input_size: Annotated[int, typer.Option(
        "--input-size", show_default=False,
        help="Input height/width in pixels (default 32, CIFAR).")] = 32,
    json_out: Annotated[bool, typer.Option(
        "--json", show_default=False,
        help="Print one JSON object {rows, figure} instead of a table "
             "(default off).")] = False,
) -> None:
    """Compare checkpoints with a baseline: params, MACs, accuracy, and a bar chart."""
    from trainer.plots import plot_comparison

    for src in [*checkpoints, *([baseline] if baseline else [])]:
        if output.resolve() == src.resolve():
            raise UserError(f"--output {output} is one of the checkpoints compared; choose "
                            "another path for the figure (slimtune never overwrites its source)")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the path of a .png file")
    names = None if labels is None else [s.strip() for s in labels.split(",")]
    if names is not None and not all(names):
        raise UserError(f"--labels has an empty name in {labels!r}; give one non-empty label "
                        "per checkpoint")
    rows = compare_rows([str(p) for p in checkpoints], names,
                        None if baseline is None else str(baseline), input_size)
    size = rows[0]["input_size"]
    title = f"ResNet-50 checkpoints vs baseline '{rows[0]['label']}' (input 3×{size}×{size})"
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
    console.print(f"figure: {figure}")


def register(app: typer.Typer) -> None:
    """Add the ``profile`` and ``compare`` commands to ``app``."""
    app.command("profile")(profile_command)
    app.command("compare")(compare_command)
