"""The numbers and tables of ``profile``/``compare`` and the pipeline's markdown report.

Numbers: params are exact counts; MACs are multiply-accumulates (what the lab calls
"FLOPs"); FLOPs = 2 x MACs; accuracies are best test accuracy in %.
Reductions are positive when the model is smaller than the baseline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from trainer.config.paths import REPORT
from trainer.errors import UserError
from trainer.files.atomic import atomic_write_text
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.measure.profiling import (
    check_input_size,
    measure_latencies,
    profile_checkpoint,
    resolve_device,
)
from trainer.train.progress import say

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
                 input_size: int | None = None, arch: str | None = None) -> list[dict[str, Any]]:
    """Profile checkpoints and compare each with the baseline (given, else the first), all at
    ``input_size`` (None: the size the baseline was trained at, else 32).

    ``arch``: that of files naming none, or the user model (module:factory) files hold.
    Returns one dict per checkpoint, baseline first with ``baseline=True``: label, path,
    params, macs, flops, input_size, best_acc (or None), param_reduction_pct,
    mac_reduction_pct (% smaller than the baseline) and acc_delta (points, or None).
    """
    size = None if input_size is None else check_input_size(input_size)
    rows = []
    for i, (path, label) in enumerate(_order(paths, labels, baseline)):
        info = profile_checkpoint(path, size, arch)
        size = info["input_size"]  # the baseline's, for every other row
        rows.append({"label": label, "path": path, "arch": info["arch"], "params": info["params"],
                     "macs": info["macs"], "flops": info["flops"], "input_size": size,
                     "best_acc": info.get("best_acc"), "baseline": i == 0})
    base = rows[0]
    for row in rows:
        row["param_reduction_pct"] = _reduction(row["params"], base["params"])
        row["mac_reduction_pct"] = _reduction(row["macs"], base["macs"])
        both = row["best_acc"] is not None and base["best_acc"] is not None
        row["acc_delta"] = row["best_acc"] - base["best_acc"] if both else None
    return rows


# The pipeline's quick measurement for report.md (a careful one: profile --latency).
QUICK_LATENCY: dict[str, Any] = {"batches": (1, 32), "warmup": 2, "repeats": 5}


def quick_latency(rows: list[dict[str, Any]], cpu: bool = False) -> list[dict[str, Any]]:
    """``QUICK_LATENCY`` of :func:`compare_rows` rows (on the CPU with ``cpu``, else cuda when
    available); a study's report must not fail at the end for a timing, so a failure only
    leaves the rows without latency and says why."""
    try:
        return add_latency(rows, device="cpu" if cpu else None, **QUICK_LATENCY)
    except Exception as exc:  # noqa: BLE001 -- e.g. CUDA out of memory next to a training job
        for row in rows:
            row.pop("latency", None)
        say(f"[yellow]note:[/] latency not measured ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
        return rows


def add_latency(rows: list[dict[str, Any]], *, device: str | None, batches: Sequence[int],
                warmup: int = 5, repeats: int = 20, runtime: str = "torch",
                speedups: bool = True) -> list[dict[str, Any]]:
    """Measure the latency of each row's checkpoint (``row["path"]``), all in one interleaved
    measurement (trainer.measure.profiling.measure_latencies), into ``row["latency"]``; ``device``
    None: cuda when available, else cpu.

    With ``speedups`` (rows of :func:`compare_rows`, baseline first) each batch entry also
    gets ``speedup`` = baseline median / this model's median (measured), and each row
    ``mac_speedup`` = baseline MACs / this model's MACs (what the MAC count promises).
    """
    size = rows[0].get("input_size", 32) if rows else 32
    device = resolve_device(device, runtime=runtime)
    models = {str(i): build_model(load_checkpoint(r["path"])) for i, r in enumerate(rows)}
    lat = measure_latencies(models, device, size, batches, warmup, repeats, runtime)
    del models
    for i, row in enumerate(rows):
        row["latency"] = lat[str(i)]
    if speedups and rows:
        base = rows[0]
        for row in rows:
            row["mac_speedup"] = base["macs"] / row["macs"] if row["macs"] else None
            for mine, theirs in zip(row["latency"]["batches"], base["latency"]["batches"]):
                mine["speedup"] = theirs["ms_per_batch"] / mine["ms_per_batch"]
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


def _ms(entry: Mapping[str, Any]) -> str:
    """A latency entry as 'median (min–max)' in ms."""
    return f"{entry['ms_per_batch']:.2f} ({entry['ms_min']:.2f}–{entry['ms_max']:.2f})"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def latency_caption(lat: Mapping[str, Any]) -> str:
    """How a latency was measured, in one line (a table's caption, report.md's note)."""
    return (f"latency: median (min–max) ms per batch of {lat['repeats']} interleaved rounds "
            f"after {lat['warmup']} warm-up passes, {lat['runtime']} on {lat['device']} "
            f"({lat['threads']} CPU thread{'s' if lat['threads'] != 1 else ''}), input "
            f"3×{lat['input_size']}×{lat['input_size']}")


def _latency_headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per batch size: ms median (min–max), images/s and, against a baseline, the speed-up
    (after the MACs speed-up the count promises)."""
    batches = (rows[0].get("latency") or {}).get("batches", []) if rows else []
    speedups = bool(rows) and "mac_speedup" in rows[0]
    out = ["MACs speed-up\n(theory)"] if speedups and batches else []
    for b in batches:
        out += [f"b={b['batch']} ms/batch\nmedian (min–max)", f"b={b['batch']}\nimages/s"]
        out += [f"b={b['batch']} speed-up\n(measured)"] if speedups else []
    return out


def _latency_cells(row: Mapping[str, Any]) -> list[str]:
    if not row.get("latency"):
        return []
    speedups = "mac_speedup" in row
    cells = [_times(row.get("mac_speedup"))] if speedups else []
    for b in row["latency"]["batches"]:
        cells += [_ms(b), f"{b['images_per_s']:,.1f}"]
        cells += [_times(b.get("speedup"))] if speedups else []
    return cells


def _label(row: Mapping[str, Any]) -> str:
    label = str(row["label"])
    if row.get("baseline") and "baseline" not in label.lower():
        return f"{label} (baseline)"
    return label


def render_compare_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """A rich table of :func:`compare_rows` output (baseline row marked)."""
    size = rows[0].get("input_size", 32) if rows else 32
    table = Table(title=f"Checkpoints vs baseline (input 1×3×{size}×{size})")
    for header in ("label", "arch", "params (M)", "params reduction", "MACs (M)",
                   "MACs reduction", "FLOPs (M) = 2×MACs", "best test acc (%)", "Δ acc (points)"):
        table.add_column(header, justify="left" if header in ("label", "arch") else "right",
                         no_wrap=header != "label")
    for r in rows:
        table.add_row(_label(r), r.get("arch", ""), _m(r["params"]),
                      _red(r.get("param_reduction_pct")),
                      _m(r["macs"]), _red(r.get("mac_reduction_pct")), _m(r["flops"]),
                      _pct(r.get("best_acc")), _delta(r.get("acc_delta")))
    return table


def render_latency_table(rows: Sequence[Mapping[str, Any]], name_key: str = "label") -> Table:
    """A rich table of measured latency (rows with ``latency``; see :func:`add_latency`):
    per batch size the median (min–max) ms, images/s and, when measured against a
    baseline, the speed-up beside the MACs speed-up."""
    table = Table(title="Measured latency")
    names = [_label(r) if name_key == "label" else str(r[name_key]) for r in rows]
    table.add_column("label" if name_key == "label" else "checkpoint",
                     min_width=min(40, max(map(len, names), default=5)))
    for header in _latency_headers(rows):
        table.add_column(header, justify="right", no_wrap=True)
    for name, r in zip(names, rows):
        table.add_row(name, *_latency_cells(r))
    if rows and rows[0].get("latency"):
        table.caption = latency_caption(rows[0]["latency"])
    return table


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return lines


def _rows_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    headers = ("label", "arch", "params", "params (M)", "params reduction", "MACs (M)",
               "MACs reduction", "FLOPs (M) = 2×MACs", "best test acc (%)", "Δ acc (points)")
    body = [[_label(r), r.get("arch", ""), f"{r['params']:,}",
             _m(r["params"]), _red(r.get("param_reduction_pct")), _m(r["macs"]),
             _red(r.get("mac_reduction_pct")), _m(r["flops"]), _pct(r.get("best_acc")),
             _delta(r.get("acc_delta"))] for r in rows]
    return _md_table(headers, body)


COMPARISON_NOTE = (
    "Test accuracy (%) per channel criterion (bn: |γ|, Liu et al. 2017; l1/l2: filter norms, "
    "Li et al. 2017; random; taylor: Molchanov et al.) and allocation (global: one threshold; "
    "uniform: the same ratio in every layer). Right after pruning it is measured twice: with "
    "the unpruned network's BatchNorm statistics (stale) and after re-estimating them on "
    "training batches (adaptive BN, Li et al. 2020). Scratch: the pruned architecture trained "
    "from a fresh initialisation (Liu et al. 2019; B: the epochs times the MACs saved).")


@dataclass
class StudyRow:
    """One prune -> fine-tune round of a study, as its tables show it."""

    target: str  # 'ratio 0.9', '4M params'
    tag: str  # in file names: '90', '4M'
    round: int
    final: bool  # the last round of its target
    ratio: float | None
    checkpoint: str  # the fine-tuned checkpoint
    pruned: str  # the pruned checkpoint
    params: int | None
    best_acc: float | None  # best test accuracy after fine-tuning (%)
    acc_after: float | None  # test accuracy right after pruning (%)
    macs: int | None = None
    criterion: str = "bn"  # how channels were scored (prune --criterion)
    allocation: str = "global"  # prune --allocation
    acc_after_stale: float | None = None  # right after pruning, the unpruned network's BN stats
    bn_recalibrate: int = 0  # training batches acc_after's BN statistics were re-estimated on
    scratch: str | None = None  # E or B: this architecture trained from scratch (train --scratch)
    scratch_acc: float | None = None  # that run's best test accuracy (%)


def _pipeline_markdown(rows: Sequence[StudyRow]) -> list[str]:
    """One row per prune -> fine-tune round (and its criterion and allocation, in a study of
    several)."""
    variants = len({(r.criterion, r.allocation) for r in rows}) > 1
    headers = (*(("criterion", "allocation") if variants else ()), "target", "round",
               "prune ratio", "params (M)", "MACs (M)", "test acc right after pruning (%)",
               "best test acc after fine-tuning (%)")
    body = [[*((r.criterion, r.allocation) if variants else ()), r.target, r.round,
             _ratio(r.ratio), _m(r.params), _m(r.macs), _pct(r.acc_after), _pct(r.best_acc)]
            for r in rows]
    return _md_table(headers, body)


# The columns of the criteria comparison: (key, header); {n}: the adaptive-BN batches,
# {kind}: E or B.
COMPARISON_COLUMNS = (
    ("acc_after_stale", "right after pruning, stale BN (%)"),
    ("acc_after", "right after pruning, adaptive BN on {n} batches (%)"),
    ("best_acc", "fine-tuned (%)"),
    ("scratch_acc", "Scratch-{kind} (%)"),
)


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The criteria study's table: one row per (criterion, allocation, target) with params,
    MACs and the test accuracy right after pruning (with the unpruned network's BatchNorm
    statistics, and after adaptive BN), after fine-tuning and trained from scratch. Rows are
    mappings with :class:`StudyRow`'s keys (``dataclasses.asdict``); a value with a
    ``<key>_std`` beside it (several seeds) shows as mean ± std. Columns no row has are left
    out."""
    n = max((int(r.get("bn_recalibrate") or 0) for r in rows), default=0)
    kind = next((r["scratch"] for r in rows if r.get("scratch")), "E")
    columns = [(key, head.format(n=n, kind=kind)) for key, head in COMPARISON_COLUMNS
               if any(r.get(key) is not None for r in rows)]
    headers = ["criterion", "allocation", "target", "params (M)", "MACs (M)",
               *[head for _, head in columns]]
    body = [[r.get("criterion", "bn"), r.get("allocation", "global"), r["target"],
             _m(r.get("params")), _m(r.get("macs")), *[_mean_std(r, key) for key, _ in columns]]
            for r in rows]
    return _md_table(headers, body)


def _mean_std(row: Mapping[str, Any], key: str) -> str:
    std = row.get(f"{key}_std")
    return _pct(row.get(key)) if std is None or row.get(key) is None else \
        f"{row[key]:.2f} ± {std:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def write_report(workdir: Path, *, title: str, rows: list[dict],
                 figures: list[tuple[str, Path]], pipeline_rows: list[StudyRow] | None = None,
                 settings: dict | None = None,
                 comparison_rows: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write ``<workdir>/report.md``: settings, results table, pipeline table, the criteria
    comparison, figures.

    ``rows`` are :func:`compare_rows` dicts; ``pipeline_rows`` a study's rounds;
    ``comparison_rows`` the rows of :func:`comparison_markdown`; figures are (caption, path)
    pairs embedded by paths relative to ``workdir``.
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
    if rows and rows[0].get("latency"):
        lines += ["## Measured latency", "",
                  (f"{latency_caption(rows[0]['latency'])[:1].upper()}"
                   f"{latency_caption(rows[0]['latency'])[1:]}. Measured speed-up = the "
                   "baseline's median / the model's; MACs speed-up = the baseline's MACs / the "
                   "model's (what the count promises)."), ""]
        lines += _md_table(["label", *[h.replace("\n", " ") for h in _latency_headers(rows)]],
                           [[_label(r), *_latency_cells(r)] for r in rows]) + [""]
    if pipeline_rows:
        lines += ["## Pipeline", ""] + _pipeline_markdown(pipeline_rows) + [""]
    if comparison_rows:
        lines += ["## Criteria and baselines", "", COMPARISON_NOTE, ""]
        lines += comparison_markdown(comparison_rows) + [""]
    if figures:
        lines += ["## Figures", ""]
        for caption, fig in figures:
            rel = Path(os.path.relpath(Path(fig).resolve(), workdir.resolve())).as_posix()
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    path = workdir / REPORT
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def study_story(compared: Sequence[dict[str, Any]], rows: Sequence[StudyRow]) -> list[str]:
    """What a study showed, in numbers (its closing lines): the unpruned model, then each
    target's fine-tuned accuracy beside it with its share of the params and MACs.
    ``compared``: :func:`compare_rows` of the baseline and ``rows``' checkpoints, in order."""
    def acc(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}%"

    base = compared[0]
    lines = [f"what this study showed: the unpruned model reached {acc(base['best_acc'])} with "
             f"{base['params'] / 1e6:.2f}M params and {base['macs'] / 1e6:.1f}M MACs"]
    for c, r in zip(compared[1:], rows):
        delta = "" if c["acc_delta"] is None else f", {c['acc_delta']:+.1f} points"
        what = r.target if r.criterion == "bn" and r.allocation == "global" else \
            f"{r.target} ({r.criterion}, {r.allocation})"
        lines.append(f"  {what}: {acc(r.acc_after)} right after pruning, {acc(c['best_acc'])} "
                     f"fine-tuned{delta}, with {100 - c['param_reduction_pct']:.0f}% of the "
                     f"params and {100 - c['mac_reduction_pct']:.0f}% of the MACs")
    return lines
