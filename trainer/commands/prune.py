"""``prune`` on the worker side: a checkpoint in, the pruned checkpoint, its |γ| histogram and a
summary out (the rule itself: ``trainer.prune.engine``)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from trainer.commands.evaluate import evaluate_model
from trainer.config.paths import PLOTS, fmt_count, gamma_plot_path, input_checkpoint, output_path
from trainer.config.settings import RunConfig, saved_config
from trainer.data.datasets import check_classes
from trainer.errors import DataError
from trainer.files.atomic import ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.measure.plots import plot_gamma_hist
from trainer.prune.engine import PruneResult, all_gammas, prune, prune_to_budget
from trainer.prune.record import PruneRecord
from trainer.train import dist
from trainer.train.progress import console, say
from trainer.train.runtime import load_data


def _accuracy_before_after(run: RunConfig, accelerator, ckpt: dict, src: str, before, after):
    """Test accuracy of the model before and right after pruning; (None, None) without data."""
    if not run.eval:
        return None, None
    try:
        data = load_data(run)
        check_classes(data.name, data.num_classes, ckpt["num_classes"], f"checkpoint {src}")
        return (evaluate_model(before, run, accelerator, data)["accuracy"],
                evaluate_model(after, run, accelerator, data)["accuracy"])
    except DataError as exc:
        say(f"[yellow]note:[/] accuracy not measured ({exc})")
        return None, None


def prune_as_asked(model, run: RunConfig) -> PruneResult:
    """At --ratio, or to the --target-params / --target-macs budget."""
    floors = {"scope": run.scope, "min_channels": run.min_channels, "round_to": run.round_to}
    if run.ratio is not None:
        return prune(model, run.ratio, **floors)
    kind = "params" if run.target_params is not None else "macs"
    target = run.target_params if kind == "params" else run.target_macs
    return prune_to_budget(model, target, kind, input_size=run.image_size, **floors)


def cmd_prune(run: RunConfig, accelerator, plots_dir: Path = PLOTS) -> PruneRecord:
    src = input_checkpoint(run)
    ckpt = load_checkpoint(src, run.arch)
    model = build_model(ckpt)
    output = output_path(run)
    ensure_writable(output.parent)
    result = prune_as_asked(model, run)
    ensure_writable(plots_dir)  # after prune's own checks: a refused prune creates no folder
    record = result.record
    record.source = str(src)
    record.acc_before, record.acc_after = _accuracy_before_after(run, accelerator, ckpt, src,
                                                                 model, result.model)
    if dist.is_main():
        save_checkpoint(output, make_checkpoint(result.model, prune=record.to_dict(),
                                                config=saved_config(run)))
        gamma_png = plot_gamma_hist(all_gammas(model, run.scope),
                                    gamma_plot_path(output, plots_dir),
                                    threshold=record.threshold,
                                    title=f"BatchNorm |γ| of {Path(src).name}",
                                    label=f"threshold {record.threshold:.4g} "
                                          f"(ratio {record.ratio:.4g})")
        print_prune_summary(record, result.model.arch, output, gamma_png)
    dist.barrier()  # the pruned file exists before any rank reads it
    return record


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
    table.add_row("threshold |γ|", f"{record.threshold:.6g}", f"scope {record.scope}")
    if record.acc_before is not None:
        table.add_row("test acc", f"{record.acc_before:.2f}% -> {record.acc_after:.2f}%",
                      "right after")
    if record.budget:
        b = record.budget
        table.add_row(f"{b['kind']} budget", f"{b['before']:,} -> {b['reached']:,}",
                      f"≤ {fmt_count(b['target'])}")
    console.print(table)
    ratio, budget = record.ratio, record.budget
    asked = (f"budget {fmt_count(budget['target'])} {budget['kind']}: ratio {ratio:.4g} chosen"
             if budget else f"asked: ratio {ratio:g}")
    rounding = f", round-to {record.round_to}" if record.round_to > 1 else ""
    say(f"removed {100 * record.removed_fraction:.1f}% of the prunable channels ({asked}, "
        f"scope {record.scope}{rounding})")
    for note in record.notes(cli=True):
        say(f"[yellow]note:[/] {escape(note)}")
    say(f"wrote {output} and {gamma_png}")
