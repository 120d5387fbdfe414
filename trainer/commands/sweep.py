"""``sweep --job report``: one report of every point of a sweep (launch.sweep runs the points).

``<workdir>/sweep.md``: a row per point and target (the point's grid values, params, MACs,
accuracy right after pruning and after fine-tuning) and ``plots/sweep.png``, accuracy against
params (and MACs) per point, so the best λ for a budget can be read off. A point whose files
are missing (its job failed or has not run) is named, not reported.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from trainer.commands.pipeline import plan_stages, study_rows, unpruned_sizes
from trainer.config.paths import PLOTS
from trainer.config.settings import RunConfig
from trainer.config.sweep import SWEEP_FIGURE, SWEEP_REPORT
from trainer.errors import ConfigError
from trainer.files.atomic import atomic_write_text, ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.measure.plots import plot_sweep
from trainer.prune.engine import copy_to_meta, model_size
from trainer.train.progress import console


def sweep_rows(grid_points: list[tuple[str, RunConfig]]) -> tuple[list[dict], list[str]]:
    """(a row per point and target, the points without their files)."""
    rows, missing = [], []
    for name, point in grid_points:
        stages = plan_stages(point)
        try:
            if point.targets:
                stages = plan_stages(point, unpruned_sizes(stages.sparse, point.image_size))
            found = study_rows(point, stages)
        except (ConfigError, OSError):
            missing.append(name)
            continue
        for r in found:
            if r.final:
                macs = r.macs or _macs(Path(r.checkpoint), point.image_size)
                rows.append({"point": name, "target": r.target, "params": r.params,
                             "macs": macs, "acc_after": r.acc_after, "best_acc": r.best_acc})
    return rows, missing


def write_sweep_report(run: RunConfig, grid_points: list[tuple[str, RunConfig]]) -> Path:
    """Write sweep.md and the figure; print the table. Refused when no point finished."""
    rows, missing = sweep_rows(grid_points)
    if not rows:
        raise ConfigError("no point of the sweep has finished its files; run the sweep (with "
                          "--resume to continue it) before its report")
    work = Path(run.workdir)
    ensure_writable(work / PLOTS)
    figure = plot_sweep(rows, work / PLOTS / SWEEP_FIGURE,
                        title=f"{run.dataset}: accuracy per sweep point")
    names = [n for n, _ in run.grid]
    values = {name: point for name, point in grid_points}
    headers = ["point", *names, "target", "params (M)", "MACs (M)",
               "test acc right after pruning (%)", "best test acc after fine-tuning (%)"]
    body = [[r["point"], *[f"{getattr(values[r['point']], n):g}" for n in names], r["target"],
             _m(r["params"]), _m(r["macs"]), _pct(r["acc_after"]), _pct(r["best_acc"])]
            for r in rows]
    lines = ["# slimtune sweep", "", "Over " + ", ".join(
        f"**{n}** {', '.join(f'{v:g}' for v in vs)}" for n, vs in run.grid) + "; each point's "
        "own study (report.md) is in its folder.", "",
        "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if missing:
        lines += ["", f"Not finished (no files): {', '.join(missing)}."]
    lines += ["", f"![accuracy per point]({PLOTS.as_posix()}/{SWEEP_FIGURE})", ""]
    report = work / SWEEP_REPORT
    atomic_write_text(report, "\n".join(lines))
    table = Table(title="sweep")
    for h in headers:
        table.add_column(h, justify="right")
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    console.print(f"sweep report: {report}\nfigure:       {figure}", highlight=False,
                  markup=False)
    if missing:
        console.print(f"note: not finished: {', '.join(missing)}", markup=False)
    return report


def _macs(checkpoint: Path, image_size: int) -> int:
    """MACs of a checkpoint's model at the size its study ran at (counted on the meta
    device: no weights are loaded into a model)."""
    shape = copy_to_meta(build_model(load_checkpoint(checkpoint)))
    return model_size(shape, "macs", image_size)


def _m(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
