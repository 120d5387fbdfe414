"""The whole study in one command: sparse training -> prune at each ratio -> fine-tune
each -> compare, with every output under ``<workdir>/checkpoints`` and ``<workdir>/plots``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from trainer.commands.prune import cmd_prune
from trainer.commands.train import cmd_finetune, cmd_train
from trainer.config.paths import (
    CHECKPOINTS,
    PLOTS,
    SPARSE,
    budget_tag,
    comparison_figure,
    fmt_count,
    gamma_plot_path,
    plot_path,
    ratio_tag,
    run_paths,
    stage_files,
)
from trainer.config.settings import FINETUNE_RECIPE, TRAIN_RECIPE, RunConfig
from trainer.errors import ConfigError
from trainer.files.atomic import ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.files.safeload import safe_torch_load
from trainer.measure.plots import plot_comparison
from trainer.measure.report import StudyRow, compare_rows, quick_latency, write_report
from trainer.prune.engine import copy_to_meta, model_size
from trainer.prune.record import PruneRecord
from trainer.train import dist
from trainer.train.fit import keep_interrupted_run, resume_mismatch
from trainer.train.progress import console, say
from trainer.train.runtime import loader_kind


@dataclass
class Round:
    """One prune -> fine-tune round: each stage's output and settings (what it runs, and what
    --resume compares)."""

    number: int
    pruned: Path
    prune: RunConfig
    tuned: Path
    finetune: RunConfig


@dataclass
class Target:
    """A ratio or a budget of the study, reached in one or more rounds."""

    tag: str  # in file names: '90' (ratio 0.9), '4M' (a params budget), '100Mmacs'
    label: str  # in tables: 'ratio 0.9', '4M params'
    rounds: list[Round]


@dataclass
class Stages:
    sparse: Path
    train: RunConfig
    targets: list[Target]


def plan_stages(run: RunConfig, unpruned: dict[str, int] | None = None) -> Stages:
    """The study's stages: the train recipe with the pipeline's epochs, lr, batch, warm-up and
    λ; then per ratio (or budget of ``run.targets``) ``run.passes`` rounds of a prune and the
    fine-tune recipe with the pipeline's epochs, lr, batch. ``unpruned``: the sparse model's
    params and MACs, which place the budgets of the rounds before the last."""
    sparse = Path(run.workdir) / CHECKPOINTS / SPARSE
    train = run.replace(command="train", optimizer=TRAIN_RECIPE["optimizer"],
                        weight_decay=TRAIN_RECIPE["weight_decay"], epochs=run.train_epochs,
                        lr=run.train_lr, output=str(sparse), plot=None, checkpoint=None,
                        init=None)
    targets = []
    for tag, label, amounts in _amounts(run, unpruned or {}):
        rounds, src = [], sparse
        for p, amount in enumerate(amounts, start=1):
            pruned, tuned = stage_files(run.workdir, tag, p, run.passes)
            prune = run.replace(command="prune", checkpoint=str(src), output=str(pruned),
                                plot=None, **{"ratio": None, "target_params": None,
                                              "target_macs": None, **amount})
            # a round before the last fine-tunes with λ, so that the next one's |γ| separate
            ft = run.replace(command="finetune", **FINETUNE_RECIPE).replace(
                checkpoint=str(pruned), output=str(tuned), epochs=run.finetune_epochs,
                lr=run.finetune_lr, batch_size=run.finetune_batch_size, plot=None,
                sparsity=run.sparsity if p < run.passes else 0.0,
                teacher=str(sparse) if run.kd else None)
            rounds.append(Round(p, pruned, prune, tuned, ft))
            src = tuned
        targets.append(Target(tag, label, rounds))
    return Stages(sparse, train, targets)


def _amounts(run: RunConfig, unpruned: dict[str, int]):
    """(tag, label, per round {ratio} or {target_*}) of every ratio or budget. K rounds reach
    ratio r by removing 1 - (1 - r)^(1/K) of what is left each time, and a budget b by the
    budgets B·(b/B)^(p/K) (B: the unpruned size), so each round removes a like share."""
    k = run.passes
    if not run.targets:
        for r in run.ratios:
            step = 1 - (1 - r) ** (1 / k)
            yield ratio_tag(r), f"ratio {r:g}", [{"ratio": r if k == 1 else step}] * k
        return
    kind = run.target_kind
    for b in run.targets:
        full = unpruned.get(kind, b)
        budgets = [b if p == k else int(full * (b / full) ** (p / k)) for p in range(1, k + 1)]
        yield (budget_tag(b, kind), f"{fmt_count(b)} {kind}",
               [{f"target_{kind}": v} for v in budgets])


def stage_action(run: RunConfig, stage_run: RunConfig, output: Path, upstream_ran: bool) -> str:
    """'skip', 'resume' or 'fresh' for a train/fine-tune stage under ``pipeline [--resume]``.

    A finished stage is skipped only if it ran with the settings asked now; forced on, it
    trains on for more epochs, else afresh. A stage whose input was just remade starts afresh;
    an unfinished one resumes (fit checks its settings).
    """
    last = run_paths(output)["last"]
    if not run.resume or upstream_ran or not last.exists():
        return "fresh"
    state = safe_torch_load(last, what="resume state")
    if not (state.get("finished") and output.exists()):
        return "resume"
    diffs = _changed(run, output, resume_mismatch(state.get("config", {}), stage_run))
    if not diffs:
        return "skip"
    return "resume" if all(d.startswith("epochs:") for d in diffs) else "fresh"


def reusable_prune(run: RunConfig, prune_run: RunConfig, pruned: Path,
                   upstream_ran: bool) -> PruneRecord | None:
    """The prune record of an earlier ``pipeline`` run's file, if it may be reused."""
    if not run.resume or upstream_ran or not pruned.exists():
        return None
    ckpt = load_checkpoint(pruned)
    changed = _changed(run, pruned, resume_mismatch(ckpt.get("config", {}), prune_run))
    # forced: pruned again with these settings
    return None if changed else PruneRecord.from_dict(ckpt.get("prune"))


def _changed(run: RunConfig, output: Path, diffs: list[str]) -> list[str]:
    """``diffs``, refused unless --force-resume: --resume must not pass off files made with
    other settings as this study's."""
    if diffs and not run.force_resume:
        raise ConfigError(f"pipeline --resume refused: {output.name} was made with other "
                          f"settings ({'; '.join(diffs)}); rerun with the same settings, add "
                          "--force-resume or use a new --workdir")
    return diffs


def _drop_stale_state(output: Path) -> None:
    """The resume state of a stage whose input was just remade continues nothing."""
    if dist.is_main():
        run_paths(output)["last"].unlink(missing_ok=True)
    dist.barrier()  # no rank looks for it before it is gone


def run_pipeline(run: RunConfig, accelerator) -> list[StudyRow]:
    """Train with sparsity, prune to each ratio or budget (in ``run.passes`` rounds), fine-tune
    each, compare; returns one row per round."""
    # resolved now, as every stage saves it: --resume compares stages with these settings
    run = run.replace(loader=loader_kind(run, accelerator.device))
    work = Path(run.workdir)
    plots = work / PLOTS
    ensure_writable(work / CHECKPOINTS)
    ensure_writable(plots)
    stages = plan_stages(run)
    if not run.resume:  # before any stage redoes the work of an interrupted study
        for output, stage_run in [(stages.sparse, stages.train),
                                  *[(r.tuned, r.finetune) for t in stages.targets
                                    for r in t.rounds]]:
            keep_interrupted_run(run_paths(output)["last"], stage_run)
    _stage(f"1. sparse training ({run.train_epochs} epochs, λ={run.sparsity:g})")
    action = stage_action(run, stages.train, stages.sparse, upstream_ran=False)
    if action != "skip":
        cmd_train(stages.train.replace(resume=action == "resume"), accelerator, plots)
    if run.targets:  # the budgets of the rounds before the last scale from the unpruned size
        stages = plan_stages(run, unpruned_sizes(stages.sparse, run.image_size))
    rows = []
    for target in stages.targets:
        remade = action != "skip"
        for rnd in target.rounds:
            row, remade = _run_round(run, target, rnd, accelerator, plots, remade)
            rows.append(row)
    dist.barrier()
    if dist.is_main():
        _print_rows(rows)
        finish_study(run, stages.sparse, [r for r in rows if r.final], plots, rows)
    return rows


def _run_round(run: RunConfig, target: Target, rnd: Round, accelerator, plots: Path,
               upstream_ran: bool) -> tuple[StudyRow, bool]:
    """Prune and fine-tune one round (skipping what --resume may reuse); (row, remade)."""
    of = f" (round {rnd.number} of {run.passes})" if run.passes > 1 else ""
    _stage(f"2. prune to {target.label}{of} -> {rnd.pruned.name}")
    record = reusable_prune(run, rnd.prune, rnd.pruned, upstream_ran=upstream_ran)
    remade = record is None
    if remade:
        record = cmd_prune(rnd.prune, accelerator, plots)
    _stage(f"3. fine-tune {rnd.pruned.name} ({run.finetune_epochs} epochs)")
    action = stage_action(run, rnd.finetune, rnd.tuned, upstream_ran=remade)
    if action == "fresh" and run.resume:
        _drop_stale_state(rnd.tuned)
    if action != "skip":
        cmd_finetune(rnd.finetune.replace(resume=action == "resume"), accelerator, plots)
    best = load_checkpoint(rnd.tuned)
    row = StudyRow(target.label, target.tag, rnd.number, rnd.number == run.passes,
                   record.ratio, str(rnd.tuned), str(rnd.pruned), record.params_after,
                   best.get("best_acc"), record.acc_after)
    return row, remade or action != "skip"


def unpruned_sizes(sparse: Path, input_size: int) -> dict[str, int]:
    """Params and MACs of the sparse-trained (unpruned) model."""
    shape = copy_to_meta(build_model(load_checkpoint(sparse)))
    return {kind: model_size(shape, kind, input_size) for kind in ("params", "macs")}


def _stage(text: str) -> None:
    say(f"\n[bold cyan]== {text}[/]")


def _print_rows(rows: list[StudyRow]) -> None:
    table = Table(title="pipeline summary")
    rounds = any(r.round > 1 for r in rows)
    for col in ("target", *(["round"] if rounds else []), "ratio", "params", "best test acc",
                "acc right after prune"):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}%"

    for r in rows:
        table.add_row(r.target, *([str(r.round)] if rounds else []), f"{r.ratio:.4g}",
                      f"{r.params:,}", fmt(r.best_acc), fmt(r.acc_after))
    console.print(table)


def finish_study(run: RunConfig, baseline: Path, rows: list[StudyRow], plots: Path,
                 rounds: list[StudyRow] | None = None) -> None:
    """The comparison figure and report.md (the profiling seam of the pipeline). ``rows``: the
    last round of each target (compared); ``rounds``: every round (a row each in report.md)."""
    rounds = rounds or rows
    many = run.passes > 1
    labels = ["original (sparse-trained)"] + [f"pruned {_what(r, many)} + fine-tuned"
                                              for r in rounds]
    table = compare_rows([str(baseline)] + [r.checkpoint for r in rounds], labels,
                         input_size=run.image_size)  # MACs at the size the study ran at
    final = [table[0]] + [t for t, r in zip(table[1:], rounds) if r.final]
    quick_latency(final, run.cpu)  # report.md's latency columns, the figure's speed-up panel
    figure = comparison_figure(plots, [r.tag for r in rows])
    plot_comparison(final, figure, title=f"{run.dataset}: original vs pruned + fine-tuned")
    figures = [("comparison", figure), ("sparse training",
                                         plot_path(run.replace(command="train", plot=None),
                                                   baseline, plots))]
    checkpoints, gammas = [baseline], []
    for r in rounds:
        pruned, tuned = Path(r.pruned), Path(r.checkpoint)
        checkpoints += [pruned, tuned]
        gammas.append(gamma_plot_path(pruned, plots))
        what = _what(r, many)
        figures.append((f"γ distribution, {what}", gammas[-1]))
        figures.append((f"fine-tuning, {what}",
                        plot_path(run.replace(command="finetune", plot=None), tuned, plots)))
    study = [dataclasses.replace(r, macs=t["macs"])
             for r, t in zip(rounds, table[1:])]  # table[0] is the baseline
    report = write_report(Path(run.workdir), title="slimtune study", rows=final, figures=figures,
                          pipeline_rows=study, settings=_settings(run))
    say_outputs(checkpoints, plots, gammas, figure, report)


def _what(row: StudyRow, many_rounds: bool) -> str:
    """'ratio 0.9', '4M params', 'ratio 0.9, round 2'."""
    return row.target + (f", round {row.round}" if many_rounds else "")


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
            "batch size (train / fine-tune)": f"{run.batch_size} / {run.finetune_batch_size}",
            "seed": run.seed}


def say_outputs(checkpoints: list[Path], plots: Path, gammas: list[Path], figure: Path,
                report: Path) -> None:
    """The study's closing lines: where its checkpoints, figures and report are."""
    _stage("outputs")
    for label, where, note in (
            ("checkpoints", f"{checkpoints[0].parent}/",
             f" ({', '.join(c.name for c in checkpoints)})"),
            ("plots", f"{plots}/", f" (γ histograms: {', '.join(g.name for g in gammas)}; "
                                   "training curves of each stage)"),
            ("comparison figure", figure, ""), ("report", report, "")):
        say(f"{label + ':':<19}{escape(str(where))}{escape(note)}")
