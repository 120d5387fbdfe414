"""Every file name slimtune chooses by itself: a command's default input and output, the files
a run writes beside its output, the pipeline's stage files, figures and report.

Pure Python (no torch): the launcher reads it to place a job's Accelerate config.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config.settings import RunConfig

CHECKPOINTS = Path("checkpoints")
PLOTS = Path("plots")
SPARSE = "model_sparse.pth"  # train with --sparsity > 0; prune's default input
DENSE = "model.pth"  # train without sparsity
PRUNED = "model_prune.pth"  # prune's default output; finetune's default input
FINETUNED_SUFFIX = "_finetune"  # finetune: <input stem>_finetune.pth beside the input
LAB_CURVES = "finetuning_results.png"  # the lab's figure name for model_prune.pth's curves
REPORT = "report.md"
COMPARE_FIGURE = PLOTS / "comparison.png"  # compare's default --output


def ratio_tag(ratio: float) -> str:
    """0.5 -> '50', 0.9 -> '90', 0.125 -> '12.5' (file-name friendly percent)."""
    return f"{ratio * 100:g}"


def input_checkpoint(run: RunConfig) -> str | None:
    """The checkpoint a command starts from (train: --init or --scratch-from), defaults
    applied; None if none."""
    if run.command == "train":
        return run.init or run.scratch_from
    defaults = {"finetune": str(CHECKPOINTS / PRUNED), "prune": str(CHECKPOINTS / SPARSE)}
    return run.checkpoint or defaults.get(run.command)


def finetuned_name(src: Path) -> Path:
    """model_prune.pth -> model_prune_finetune.pth, in the same folder."""
    return src.with_name(src.stem + FINETUNED_SUFFIX + ".pth")


def scratch_name(src: Path, kind: str | None) -> Path:
    """model_prune_50.pth -> model_prune_50_scratchB.pth (Scratch-B; E by default), beside it."""
    return src.with_name(f"{src.stem}_scratch{kind or 'E'}.pth")


def output_path(run: RunConfig) -> Path | None:
    """Where a command writes its main checkpoint (None for evaluate)."""
    if run.output:
        return Path(run.output)
    if run.command == "train" and run.scratch_from:
        return scratch_name(Path(run.scratch_from), run.scratch)
    if run.command == "train":
        return CHECKPOINTS / (SPARSE if run.sparsity > 0 else DENSE)
    if run.command == "prune":
        return CHECKPOINTS / PRUNED
    if run.command == "finetune":
        return finetuned_name(Path(input_checkpoint(run)))
    if run.command == "pipeline":
        return Path(run.workdir) / CHECKPOINTS / SPARSE
    return None


def plot_path(run: RunConfig, output: Path, plots_dir: Path = PLOTS) -> Path:
    """Curves figure: ``plots/finetuning_results.png`` for the lab's model_prune.pth."""
    if run.plot:
        return Path(run.plot)
    if run.command == "finetune" and Path(run.checkpoint or "").name == PRUNED:
        return plots_dir / LAB_CURVES
    return plots_dir / f"{output.stem}.png"


def gamma_plot_path(output: Path, plots_dir: Path = PLOTS) -> Path:
    """prune's |γ| histogram of the pruned file ``output``."""
    return plots_dir / f"{output.stem}_gamma.png"


def run_paths(output: Path) -> dict[str, Path]:
    """Files a run writes next to its best checkpoint ``output``."""
    return {"best": output, "last": output.with_name(output.stem + ".last.pth"),
            "csv": output.with_name(output.stem + "_metrics.csv")}


LOCK_SUFFIX = ".lock"  # <output stem>.lock: held while a run writes its outputs
STUDY_LOCK = "slimtune.lock"  # a pipeline's, in its --workdir


def lock_file(run: RunConfig) -> tuple[str, Path] | None:
    """(what it guards, lock file) of a run that writes files: ``<output stem>.lock`` beside its
    output, a pipeline's in its --workdir; None for a command that writes no file."""
    if run.command == "pipeline" and run.job:  # one job of a study: its files only
        return (f"--workdir {run.workdir} --job {run.job}",
                Path(run.workdir) / f"{Path(STUDY_LOCK).stem}.{run.job}{LOCK_SUFFIX}")
    if run.command == "pipeline":
        return f"--workdir {run.workdir}", Path(run.workdir) / STUDY_LOCK
    out = output_path(run) if run.command in ("train", "finetune", "prune") else None
    if out is None:
        return None
    return f"--output {out}", out.with_name(out.stem + LOCK_SUFFIX)


def written_files(run: RunConfig) -> list[tuple[str, Path]]:
    """(what, path) for each file a train/finetune/prune run writes (pipeline: its output)."""
    out = output_path(run)
    if out is None:
        return []
    if run.command == "prune":
        return [("--output", out), ("the γ figure", gamma_plot_path(out))]
    if run.command not in ("train", "finetune"):
        return [("--output", out)]
    paths = run_paths(out)
    return [("--output", out), ("--plot" if run.plot else "the curves figure", plot_path(run, out)),
            (f"the resume file of --output {out}:", paths["last"]),
            (f"the metrics CSV of --output {out}:", paths["csv"])]


# ---------------------------------------------------------------- pipeline


def fmt_count(n: float) -> str:
    """4000000 -> '4M', 2500000 -> '2.5M', 1200000000 -> '1.2G' (for file names and messages;
    trainer.config.checks.parse_count reads them back)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def budget_tag(budget: int, kind: str) -> str:
    """4000000 params -> '4M'; 100000000 MACs -> '100Mmacs' (file-name friendly)."""
    return fmt_count(budget) + ("" if kind == "params" else kind)


def stage_files(workdir: str | Path, tag: str, round_: int = 1,
                rounds: int = 1) -> tuple[Path, Path]:
    """(pruned, fine-tuned) checkpoints of one round of a pipeline target: model_prune_90.pth,
    model_prune_4M.pth; with several rounds model_prune_90_p1.pth, model_prune_90_p2.pth."""
    suffix = f"_p{round_}" if rounds > 1 else ""
    pruned = Path(workdir) / CHECKPOINTS / f"model_prune_{tag}{suffix}.pth"
    return pruned, finetuned_name(pruned)


def comparison_figure(plots_dir: Path, tags: list[str]) -> Path:
    """``comparison_50_vs_90_finetuned.png``: the lab's figure name, for any targets."""
    return plots_dir / f"comparison_{'_vs_'.join(tags)}_finetuned.png"
