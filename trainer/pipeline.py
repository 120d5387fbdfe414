"""The whole study in one command: sparse training -> prune at each ratio -> fine-tune
each -> compare, with every output under ``<workdir>/checkpoints`` and ``<workdir>/plots``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer import dist
from trainer.checkpoint import load_checkpoint, safe_torch_load
from trainer.commands import cmd_finetune, cmd_prune, cmd_train
from trainer.config import FINETUNE_RECIPE, TRAIN_RECIPE, RunConfig
from trainer.errors import ConfigError
from trainer.files import ensure_writable
from trainer.fit import keep_interrupted_run, resume_mismatch
from trainer.paths import (
    CHECKPOINTS,
    PLOTS,
    SPARSE,
    comparison_figure,
    gamma_plot_path,
    plot_path,
    ratio_tag,
    run_paths,
    stage_files,
)
from trainer.progress import console, say
from trainer.runtime import loader_kind


@dataclass
class Stages:
    """Each stage's output and settings: what it runs, and what --resume compares."""

    sparse: Path
    train: RunConfig
    ratios: list[tuple[float, Path, RunConfig, Path, RunConfig]]  # ratio, pruned, prune, tuned, ft


def plan_stages(cfg: RunConfig) -> Stages:
    """The study's stages: the train recipe with the pipeline's epochs, lr, batch, warm-up and
    λ; then per ratio a prune and the fine-tune recipe with the pipeline's epochs, lr, batch."""
    sparse = Path(cfg.workdir) / CHECKPOINTS / SPARSE
    train = cfg.replace(command="train", optimizer=TRAIN_RECIPE["optimizer"],
                        weight_decay=TRAIN_RECIPE["weight_decay"], epochs=cfg.train_epochs,
                        lr=cfg.train_lr, output=str(sparse), plot=None, checkpoint=None,
                        init=None)
    ratios = []
    for ratio in cfg.ratios:
        pruned, tuned = stage_files(cfg.workdir, ratio)
        prune = cfg.replace(command="prune", ratio=ratio, checkpoint=str(sparse),
                            output=str(pruned), plot=None)
        ft = cfg.replace(command="finetune", **FINETUNE_RECIPE).replace(
            checkpoint=str(pruned), output=str(tuned), epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size, plot=None)
        ratios.append((ratio, pruned, prune, tuned, ft))
    return Stages(sparse, train, ratios)


def stage_action(cfg: RunConfig, stage_cfg: RunConfig, output: Path, upstream_ran: bool) -> str:
    """'skip', 'resume' or 'fresh' for a train/fine-tune stage under ``pipeline [--resume]``.

    A finished stage is skipped only if it ran with the settings asked now; forced on, it
    trains on for more epochs, else afresh. A stage whose input was just remade starts afresh;
    an unfinished one resumes (fit checks its settings).
    """
    last = run_paths(output)["last"]
    if not cfg.resume or upstream_ran or not last.exists():
        return "fresh"
    state = safe_torch_load(last, what="resume state")
    if not (state.get("finished") and output.exists()):
        return "resume"
    diffs = _changed(cfg, output, resume_mismatch(state.get("config", {}), stage_cfg))
    if not diffs:
        return "skip"
    return "resume" if all(d.startswith("epochs:") for d in diffs) else "fresh"


def reusable_prune(cfg: RunConfig, prune_cfg: RunConfig, pruned: Path,
                   upstream_ran: bool) -> dict | None:
    """The prune metadata of an earlier ``pipeline`` run's file, if it may be reused."""
    if not cfg.resume or upstream_ran or not pruned.exists():
        return None
    ckpt = load_checkpoint(pruned)
    meta = ckpt.get("prune") or {}
    diffs = resume_mismatch(ckpt.get("config", {}), prune_cfg) + [
        f"{k}: {meta.get(k)!r} -> {getattr(prune_cfg, k)!r}" for k in ("scope", "min_channels")
        if k in meta and meta[k] != getattr(prune_cfg, k)]
    changed = _changed(cfg, pruned, diffs)
    return None if changed else ckpt["prune"]  # forced: pruned again with these settings


def _changed(cfg: RunConfig, output: Path, diffs: list[str]) -> list[str]:
    """``diffs``, refused unless --force-resume: --resume must not pass off files made with
    other settings as this study's."""
    if diffs and not cfg.force_resume:
        raise ConfigError(f"pipeline --resume refused: {output.name} was made with other "
                          f"settings ({'; '.join(diffs)}); rerun with the same settings, add "
                          "--force-resume or use a new --workdir")
    return diffs


def _drop_stale_state(output: Path) -> None:
    """The resume state of a stage whose input was just remade continues nothing."""
    if dist.is_main():
        run_paths(output)["last"].unlink(missing_ok=True)
    dist.barrier()  # no rank looks for it before it is gone


def run_pipeline(cfg: RunConfig, accelerator) -> list[dict]:
    """Train with sparsity, prune at ``cfg.ratios``, fine-tune each, compare; returns rows."""
    # resolved now, as every stage saves it: --resume compares stages with these settings
    cfg = cfg.replace(loader=loader_kind(cfg, accelerator.device))
    work = Path(cfg.workdir)
    plots = work / PLOTS
    ensure_writable(work / CHECKPOINTS)
    ensure_writable(plots)
    stages = plan_stages(cfg)
    if not cfg.resume:  # before any stage redoes the work of an interrupted study
        for output, stage_cfg in [(stages.sparse, stages.train),
                                  *[(t, f) for _, _, _, t, f in stages.ratios]]:
            keep_interrupted_run(run_paths(output)["last"], stage_cfg)
    _stage(f"1. sparse training ({cfg.train_epochs} epochs, λ={cfg.sparsity:g})")
    action = stage_action(cfg, stages.train, stages.sparse, upstream_ran=False)
    if action != "skip":
        cmd_train(stages.train.replace(resume=action == "resume"), accelerator, plots)
    trained = action != "skip"
    rows = []
    for ratio, pruned, prune_cfg, tuned, ft_cfg in stages.ratios:
        _stage(f"2. prune {ratio:g} -> {pruned.name}")
        meta = reusable_prune(cfg, prune_cfg, pruned, upstream_ran=trained)
        remade = meta is None
        if remade:
            meta = cmd_prune(prune_cfg, accelerator, plots)
        _stage(f"3. fine-tune {pruned.name} ({cfg.finetune_epochs} epochs)")
        action = stage_action(cfg, ft_cfg, tuned, upstream_ran=remade)
        if action == "fresh" and cfg.resume:
            _drop_stale_state(tuned)
        if action != "skip":
            cmd_finetune(ft_cfg.replace(resume=action == "resume"), accelerator, plots)
        best = load_checkpoint(tuned)
        rows.append({"ratio": ratio, "checkpoint": str(tuned), "params": meta["params_after"],
                     "best_acc": best.get("best_acc"), "acc_after_prune": meta.get("acc_after")})
    dist.barrier()
    if dist.is_main():
        _print_rows(rows)
        finish_study(cfg, stages.sparse, rows, plots)
    return rows


def _stage(text: str) -> None:
    say(f"\n[bold cyan]== {text}[/]")


def _print_rows(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="pipeline summary")
    for col in ("ratio", "params", "best test acc", "acc right after prune"):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}%"

    for r in rows:
        table.add_row(f"{r['ratio']:g}", f"{r['params']:,}", fmt(r["best_acc"]),
                      fmt(r["acc_after_prune"]))
    console.print(table)


def finish_study(cfg: RunConfig, baseline: Path, rows: list[dict], plots: Path) -> None:
    """The comparison figure and report.md (the profiling seam of the pipeline)."""
    from trainer.plots import plot_comparison
    from trainer.report import compare_rows, write_report

    labels = ["original (sparse-trained)"] + [f"pruned {ratio_tag(r['ratio'])}% + fine-tuned"
                                              for r in rows]
    figure = comparison_figure(plots, [r["ratio"] for r in rows])
    table = compare_rows([str(baseline)] + [r["checkpoint"] for r in rows], labels)
    plot_comparison(table, figure, title=f"{cfg.dataset}: original vs pruned + fine-tuned")
    say(f"comparison figure: {figure}")
    figures = [("comparison", figure)]
    for r in rows:
        pruned, tuned = stage_files(cfg.workdir, r["ratio"])
        figures.append((f"γ distribution, ratio {r['ratio']:g}", gamma_plot_path(pruned, plots)))
        figures.append((f"fine-tuning, ratio {r['ratio']:g}",
                        plot_path(cfg.replace(command="finetune", plot=None), tuned, plots)))
    study = [{**r, "pruned_acc": r["acc_after_prune"], "macs": t["macs"]}
             for r, t in zip(rows, table[1:])]  # table[0] is the baseline
    report = write_report(Path(cfg.workdir), title="slimtune study", rows=table, figures=figures,
                          pipeline_rows=study,
                          settings={
                              "dataset": cfg.dataset, "train epochs": cfg.train_epochs,
                              "fine-tune epochs": cfg.finetune_epochs, "sparsity": cfg.sparsity,
                              "ratios": ", ".join(f"{r:g}" for r in cfg.ratios),
                              "batch size (train / fine-tune)":
                                  f"{cfg.batch_size} / {cfg.finetune_batch_size}",
                              "seed": cfg.seed})
    say(f"report: {report}")
