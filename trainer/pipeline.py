"""The whole study in one command: sparse training -> prune at each ratio -> fine-tune
each -> compare, with every output under ``<workdir>/checkpoints`` and ``<workdir>/plots``."""

from __future__ import annotations

from pathlib import Path

from trainer import dist
from trainer.checkpoint import load_checkpoint, safe_torch_load
from trainer.config import RunConfig
from trainer.engine import run_paths
from trainer.progress import console, say
from trainer.runner import cmd_finetune, cmd_prune, cmd_train, ensure_writable


def ratio_tag(ratio: float) -> str:
    """0.5 -> '50', 0.9 -> '90', 0.125 -> '12.5' (file-name friendly percent)."""
    return f"{ratio * 100:g}"


def stage_done(output: Path) -> bool:
    """A stage finished if its resume state says so (used by ``pipeline --resume``)."""
    last = run_paths(output)["last"]
    return output.exists() and last.exists() and bool(safe_torch_load(last).get("finished"))


def run_pipeline(cfg: RunConfig, accelerator) -> list[dict]:
    """Train with sparsity, prune at ``cfg.ratios``, fine-tune each, compare; returns rows."""
    work = Path(cfg.workdir)
    ckpts, plots = work / "checkpoints", work / "plots"
    ensure_writable(ckpts)
    ensure_writable(plots)
    sparse = ckpts / "model_sparse.pth"
    train_cfg = cfg.replace(command="train", epochs=cfg.train_epochs, lr=cfg.train_lr,
                            optimizer="sgd", weight_decay=1e-4, warmup_epochs=cfg.warmup_epochs,
                            output=str(sparse), plot=None, checkpoint=None, init=None)
    _stage(f"1. sparse training ({cfg.train_epochs} epochs, λ={cfg.sparsity:g})")
    if not (cfg.resume and stage_done(sparse)):
        cmd_train(train_cfg.replace(resume=cfg.resume and run_paths(sparse)["last"].exists()),
                  accelerator, plots)
    rows = []
    for ratio in cfg.ratios:
        tag = ratio_tag(ratio)
        pruned = ckpts / f"model_prune_{tag}.pth"
        _stage(f"2. prune {ratio:g} -> {pruned.name}")
        prune_cfg = cfg.replace(command="prune", ratio=ratio, checkpoint=str(sparse),
                                output=str(pruned), plot=None)
        if cfg.resume and pruned.exists():
            meta = load_checkpoint(pruned)["prune"]
        else:
            meta = cmd_prune(prune_cfg, accelerator, plots)
        _stage(f"3. fine-tune {pruned.name} ({cfg.finetune_epochs} epochs)")
        tuned = ckpts / f"model_prune_{tag}_finetune.pth"
        ft_cfg = cfg.replace(command="finetune", checkpoint=str(pruned), output=str(tuned),
                             epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, optimizer="adam",
                             batch_size=cfg.finetune_batch_size,
                             weight_decay=0.0, warmup_epochs=0.0, sparsity=0.0, plot=None)
        if not (cfg.resume and stage_done(tuned)):
            cmd_finetune(ft_cfg.replace(resume=cfg.resume and run_paths(tuned)["last"].exists()),
                         accelerator, plots)
        best = load_checkpoint(tuned)
        rows.append({"ratio": ratio, "checkpoint": str(tuned), "params": meta["params_after"],
                     "best_acc": best.get("best_acc"), "acc_after_prune": meta.get("acc_after")})
    dist.barrier()
    if dist.is_main():
        _print_rows(rows)
        finish_study(cfg, sparse, rows, plots)
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
    names = "_vs_".join(ratio_tag(r["ratio"]) for r in rows)
    figure = plots / f"comparison_{names}_finetuned.png"
    table = compare_rows([str(baseline)] + [r["checkpoint"] for r in rows], labels)
    plot_comparison(table, figure, title=f"{cfg.dataset}: original vs pruned + fine-tuned")
    say(f"comparison figure: {figure}")
    figures = [("comparison", figure)]
    for r in rows:
        tag = ratio_tag(r["ratio"])
        figures.append((f"γ distribution, ratio {r['ratio']:g}",
                        plots / f"model_prune_{tag}_gamma.png"))
        figures.append((f"fine-tuning, ratio {r['ratio']:g}",
                        plots / f"model_prune_{tag}_finetune.png"))
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
