"""The end of a study (trainer.commands.pipeline): its summary table, the comparison figure
(and the criteria study's accuracy-vs-MACs figure), report.md, the closing lines that say what
it showed, and where its files are. Main process only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from trainer.config.paths import (
    comparison_figure,
    fmt_count,
    gamma_plot_path,
    plot_path,
    scratch_name,
)
from trainer.config.settings import RunConfig
from trainer.measure.plots import plot_accuracy_vs_macs, plot_comparison
from trainer.measure.report import (
    StudyRow,
    compare_rows,
    quick_latency,
    study_story,
    write_report,
)
from trainer.train.progress import console, heading, say


def print_rows(rows: list[StudyRow]) -> None:
    """The pipeline summary table: a row per round (criteria, rounds and scratch as run)."""
    table = Table(title="pipeline summary")
    rounds = any(r.round > 1 for r in rows)
    variants = len({(r.criterion, r.allocation) for r in rows}) > 1
    scratch = next((r.scratch for r in rows if r.scratch), None)
    for col in (*(["criterion", "allocation"] if variants else []), "target",
                *(["round"] if rounds else []), "ratio", "params", "best test acc",
                "acc right after prune", *([f"Scratch-{scratch}"] if scratch else [])):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}%"

    for r in rows:
        table.add_row(*([r.criterion, r.allocation] if variants else []), r.target,
                      *([str(r.round)] if rounds else []), f"{r.ratio:.4g}",
                      f"{r.params:,}", fmt(r.best_acc), fmt(r.acc_after),
                      *([fmt(r.scratch_acc) if r.final else ""] if scratch else []))
    console.print(table)


def finish_study(run: RunConfig, baseline: Path, rows: list[StudyRow], plots: Path,
                 rounds: list[StudyRow] | None = None) -> None:
    """The comparison figure and report.md (the profiling seam of the pipeline). ``rows``: the
    last round of each target (compared); ``rounds``: every round (a row each in report.md)."""
    rounds = rounds or rows
    many = run.passes > 1
    labels = ["original (sparse-trained)"] + [f"pruned {_what(r, many, run)} + fine-tuned"
                                              for r in rounds]
    table = compare_rows([str(baseline)] + [r.checkpoint for r in rounds], labels,
                         input_size=run.image_size)  # MACs at the size the study ran at
    final = [table[0]] + [t for t, r in zip(table[1:], rounds) if r.final]
    quick_latency(final, run.cpu)  # report.md's latency columns, the figure's speed-up panel
    figure = comparison_figure(plots, list(dict.fromkeys(_target_tag(r) for r in rows)))
    plot_comparison(final, figure, title=f"{run.dataset}: original vs pruned + fine-tuned")
    figures = [("comparison", figure), ("sparse training",
                                         plot_path(run.replace(command="train", plot=None),
                                                   baseline, plots))]
    checkpoints, gammas = [baseline], []
    for r in rounds:
        pruned, tuned = Path(r.pruned), Path(r.checkpoint)
        checkpoints += [pruned, tuned] + ([scratch_name(pruned, r.scratch)] if r.scratch else [])
        gammas.append(gamma_plot_path(pruned, plots))
        what = _what(r, many, run)
        figures.append((f"γ distribution, {what}", gammas[-1]))
        figures.append((f"fine-tuning, {what}",
                        plot_path(run.replace(command="finetune", plot=None), tuned, plots)))
    study = [dataclasses.replace(r, macs=t["macs"])
             for r, t in zip(rounds, table[1:])]  # table[0] is the baseline
    compared = None
    if _baselines(run):  # the criteria study: its table and accuracy-vs-MACs figure
        compared = [dataclasses.asdict(r) for r in study if r.final]
        figures.insert(1, ("accuracy vs MACs per criterion", plot_accuracy_vs_macs(
            compared, plots / ACC_VS_MACS, title=f"{run.dataset}: criteria and baselines",
            baseline=table[0])))
    report = write_report(Path(run.workdir), title="slimtune study", rows=final, figures=figures,
                          pipeline_rows=study, settings=_settings(run),
                          comparison_rows=compared)
    for line in study_story(final, [r for r in rounds if r.final]):
        say(line)
    say_outputs(checkpoints, plots, gammas, figure, report)


ACC_VS_MACS = "accuracy_vs_macs.png"  # the criteria study's figure, under plots/


def _baselines(run: RunConfig) -> bool:
    """Whether the study compares slimming with baselines (other criteria or allocations, or
    scratch runs): then report.md has their table and the accuracy-vs-MACs figure."""
    return (tuple(run.criteria), tuple(run.allocations)) != (("bn",), ("global",)) or \
        bool(run.scratch)


def _target_tag(row: StudyRow) -> str:
    """The target's part of a chain's tag: 'l1_uniform_90' -> '90'."""
    return row.tag.rsplit("_", 1)[-1]


def _what(row: StudyRow, many_rounds: bool, run: RunConfig | None = None) -> str:
    """'ratio 0.9', '4M params', 'ratio 0.9, round 2'; in a study of several criteria or
    allocations 'ratio 0.9, l1' or 'ratio 0.9, bn uniform'."""
    variant = ""
    if run is not None and (len(run.criteria) > 1 or len(run.allocations) > 1):
        variant = f", {row.criterion}" + ("" if len(run.allocations) == 1 else
                                          f" {row.allocation}")
    return row.target + variant + (f", round {row.round}" if many_rounds else "")


def _settings(run: RunConfig) -> dict:
    """The study's settings, as report.md lists them."""
    amounts = (", ".join(fmt_count(t) for t in run.targets) + f" {run.target_kind}"
               if run.targets else ", ".join(f"{r:g}" for r in run.ratios))
    return {"arch": run.arch, "dataset": run.dataset, "image size": run.image_size,
            "train epochs": run.train_epochs, "fine-tune epochs": run.finetune_epochs,
            "sparsity": run.sparsity, "γ init": run.gamma_init,
            ("budgets" if run.targets else "ratios"): amounts,
            "rounds per target": run.passes, "round-to": run.round_to,
            "teacher (distillation)": "the sparse model" if run.kd else "none",
            **_baseline_settings(run),
            "batch size (train / fine-tune)": f"{run.batch_size} / {run.finetune_batch_size}",
            "seed": run.seed}


def _baseline_settings(run: RunConfig) -> dict:
    """The criteria, allocations, scratch runs and adaptive BN of a study, as report.md lists
    them (the criteria and allocations only when they are not slimming's alone)."""
    out = {}
    if _baselines(run):
        out = {"criteria": ", ".join(run.criteria), "allocations": ", ".join(run.allocations),
               "trained from scratch": f"Scratch-{run.scratch}" if run.scratch else "no"}
    bn = (f"{run.bn_recalibrate} training batches" if run.bn_recalibrate and run.eval
          else "off (the unpruned network's statistics)")
    return out | {"adaptive BN before the accuracy right after pruning": bn}


def say_outputs(checkpoints: list[Path], plots: Path, gammas: list[Path], figure: Path,
                report: Path) -> None:
    """The study's closing lines: where its checkpoints, figures and report are."""
    heading("outputs")
    for label, where, note in (
            ("checkpoints", f"{checkpoints[0].parent}/",
             f" ({', '.join(c.name for c in checkpoints)})"),
            ("plots", f"{plots}/", f" (γ histograms: {', '.join(g.name for g in gammas)}; "
                                   "training curves of each stage)"),
            ("comparison figure", figure, ""), ("report", report, "")):
        say(f"{label + ':':<19}{escape(str(where))}{escape(note)}")
