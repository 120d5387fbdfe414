"""``prune`` on the worker side: a checkpoint in, the pruned checkpoint, its histogram of channel
scores (|γ|) and a summary out (the rule itself: ``trainer.prune.engine``; the criteria:
``trainer.prune.criteria``).

The accuracy right after pruning is measured after adaptive BatchNorm (--bn-recalibrate N, Li et
al. 2020): the running statistics of the unpruned network describe inputs that the removed
channels no longer produce (and after a short sparse run they have hardly left their initial
values), so the pruned network is measured, and saved, with statistics re-estimated on N
training batches; the accuracy with the stale ones is kept beside it (``acc_after_stale``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from trainer.commands.evaluate import evaluate_model
from trainer.config.derived import saved_config
from trainer.config.paths import PLOTS, fmt_count, gamma_plot_path, input_checkpoint, output_path
from trainer.config.settings import RunConfig
from trainer.data.datasets import check_classes
from trainer.errors import DataError, ParamError
from trainer.files.atomic import ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.measure.plots import plot_gamma_hist
from trainer.prune.criteria import LABELS
from trainer.prune.engine import PruneResult, prune, prune_to_budget, scores_of, units_of
from trainer.prune.record import PruneRecord
from trainer.train import dist
from trainer.train.loop import recalibrate_bn
from trainer.train.progress import console, say
from trainer.train.runtime import load_data, training_loader


def _load_data(run: RunConfig, ckpt: dict, src: str):
    """The dataset, when this prune reads it (--eval: accuracy; --criterion taylor: scores);
    else None. Missing data only skips the accuracy (a note); taylor cannot do without."""
    taylor = run.criterion == "taylor"
    if not (run.eval or taylor):
        return None
    try:
        data = load_data(run)
        check_classes(data.name, data.num_classes, ckpt["num_classes"], f"checkpoint {src}")
        return data
    except DataError as exc:
        if taylor:
            raise DataError(f"--criterion taylor scores channels on training batches, and {exc}"
                            ) from None
        say(f"[yellow]note:[/] accuracy not measured ({exc})")
        return None


@contextmanager
def training_batches(run: RunConfig, accelerator, data) -> Iterator:
    """This rank's training batches (augmented, as training sees them); the loader's workers end
    with the block."""
    loader = training_loader(run, data, accelerator)
    try:
        yield iter(loader)
    finally:
        loader.close()


def _accuracies(run: RunConfig, accelerator, data, before, after, record: PruneRecord) -> None:
    """Test accuracy before and right after pruning; with --bn-recalibrate N, the latter after
    re-estimating ``after``'s BatchNorm statistics on N training batches (kept in the model),
    and the stale one beside it."""
    try:
        record.acc_before = evaluate_model(before, run, accelerator, data)["accuracy"]
        record.acc_after = evaluate_model(after, run, accelerator, data)["accuracy"]
        if run.bn_recalibrate > 0:
            with training_batches(run, accelerator, data) as batches:
                record.bn_recalibrate = recalibrate_bn(after, batches, run.bn_recalibrate)
            if record.bn_recalibrate:
                record.acc_after_stale = record.acc_after
                record.acc_after = evaluate_model(after, run, accelerator, data)["accuracy"]
    except DataError as exc:  # e.g. a truncated file, found only when read
        say(f"[yellow]note:[/] accuracy not measured ({exc})")


def prune_as_asked(model, run: RunConfig, batches=None) -> PruneResult:
    """At --ratio, or to the --target-params / --target-macs budget, by --criterion and
    --allocation (``batches``: the training batches of --criterion taylor)."""
    how = {"scope": run.scope, "min_channels": run.min_channels, "round_to": run.round_to,
           "criterion": run.criterion, "allocation": run.allocation, "seed": run.seed,
           "batches": batches}
    if run.ratio is not None:
        return prune(model, run.ratio, **how)
    kind = "params" if run.target_params is not None else "macs"
    target = run.target_params if kind == "params" else run.target_macs
    return prune_to_budget(model, target, kind, input_size=run.image_size, **how)


def check_floors(model, run: RunConfig) -> None:
    """--min-channels or --round-to that keep every channel of every pruned layer leave
    nothing to prune: refused, instead of a run that removes 0% and blames other layers."""
    widths = [u.score.numel() for u in units_of(model) if u.prunable]
    widest = max(widths, default=0)
    for param in ("min_channels", "round_to"):
        value = getattr(run, param)
        if widest and value > 1 and value >= widest:
            raise ParamError.value(param, value, f" keeps every channel: the widest pruned "
                                   f"layer of this {model.arch} has {widest}; nothing would be "
                                   f"pruned: give at most {widest - 1}")


def cmd_prune(run: RunConfig, accelerator, plots_dir: Path = PLOTS) -> PruneRecord:
    src = input_checkpoint(run)
    ckpt = load_checkpoint(src, run.arch)
    model = build_model(ckpt)
    check_floors(model, run)
    output = output_path(run)
    taylor = run.criterion == "taylor"
    data = _load_data(run, ckpt, src) if taylor else None  # missing: refused, nothing made
    ensure_writable(output.parent)
    if taylor:
        with training_batches(run, accelerator, data) as batches:
            result = prune_as_asked(model, run, itertools.islice(batches, run.taylor_batches))
    else:  # the data only after prune's own checks: a refused prune downloads nothing
        result = prune_as_asked(model, run)
        data = _load_data(run, ckpt, src)
    ensure_writable(plots_dir)  # after prune's own checks: a refused prune creates no folder
    record = result.record
    record.source = str(src)
    if data is not None and run.eval:
        _accuracies(run, accelerator, data, model, result.model, record)
    if dist.is_main():
        save_checkpoint(output, make_checkpoint(result.model, prune=record.to_dict(),
                                                config=saved_config(run)))
        gamma_png = _plot_scores(result, run.scope, Path(src).name,
                                 gamma_plot_path(output, plots_dir))
        print_prune_summary(record, result.model.arch, output, gamma_png)
    dist.barrier()  # the pruned file exists before any rank reads it
    return record


def _plot_scores(result: PruneResult, scope: str, name: str, path: Path) -> Path:
    """The histogram of the scores in ``scope`` (|γ| for bn) with the threshold (global)."""
    record = result.record
    line = None if record.threshold is None else \
        f"threshold {record.threshold:.4g} (ratio {record.ratio:.4g})"
    return plot_gamma_hist(scores_of(result.units, scope), path, threshold=record.threshold,
                           title=f"{LABELS[record.criterion]} of {name}", label=line,
                           xlabel=None if record.criterion == "bn" else LABELS[record.criterion])


def print_prune_summary(record: PruneRecord, arch: str, output: Path, gamma_png: Path) -> None:
    """The table of kept channels per stage, params and accuracy, and notes on surprises."""
    table = Table(title=f"pruned {Path(record.source).name} ({arch}) at ratio "
                        f"{record.ratio:.4g}")
    for col in ("stage", "kept / total (prunable)", "kept %"):
        table.add_column(col, justify="right")
    for stage, kept, total in record.stages:
        table.add_row(stage, f"{kept} / {total}", f"{100 * kept / total:.1f}%")
    before, after = record.params_before, record.params_after
    table.add_section()
    table.add_row("params", f"{before:,} -> {after:,}", f"{100 * after / before:.1f}%")
    table.add_row("criterion", record.criterion, LABELS[record.criterion])
    if record.threshold is not None:
        what = "|γ|" if record.criterion == "bn" else "score"
        table.add_row(f"threshold {what}", f"{record.threshold:.6g}", f"scope {record.scope}")
    else:
        table.add_row("allocation", record.allocation, "⌊ratio·C⌋ of every layer")
    if record.acc_after_stale is not None:
        table.add_row("test acc (stale BN)",
                      f"{record.acc_before:.2f}% -> {record.acc_after_stale:.2f}%",
                      "the unpruned network's BN statistics")
    if record.acc_before is not None:
        how = (f"BN re-estimated on {record.bn_recalibrate} batches" if record.bn_recalibrate
               else "right after")
        table.add_row("test acc", f"{record.acc_before:.2f}% -> {record.acc_after:.2f}%", how)
    if record.budget:
        b = record.budget
        table.add_row(f"{b['kind']} budget", f"{b['before']:,} -> {b['reached']:,}",
                      f"≤ {fmt_count(b['target'])}")
    console.print(table)
    ratio, budget = record.ratio, record.budget
    asked = (f"budget {fmt_count(budget['target'])} {budget['kind']}: ratio {ratio:.4g} chosen"
             if budget else f"asked: ratio {ratio:g}")
    rounding = f", round-to {record.round_to}" if record.round_to > 1 else ""
    how = "" if record.criterion == "bn" else f"criterion {record.criterion}, "
    how += "" if record.allocation == "global" else f"allocation {record.allocation}, "
    say(f"removed {100 * record.removed_fraction:.1f}% of the prunable channels ({asked}, "
        f"{how}scope {record.scope}{rounding})")
    for note in record.notes(cli=True):
        say(f"[yellow]note:[/] {escape(note)}")
    say(f"wrote {output} and {gamma_png}")
