"""A study's jobs, by name, with their files (pure Python: the launcher plans with it).

``pipeline`` is three kinds of job: the sparse stage; one *chain* per (criterion, allocation,
target) (a target: a ratio or a budget; a chain: its prune -> fine-tune rounds, and the
scratch run of --scratch), which no other chain reads or writes; the report,
made from every chain's files. ``pipeline --job NAME`` runs one of them; the launcher's pool
(``--jobs``, ``--gpus-per-job``) and ``--slurm`` scripts start them as separate processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from trainer.config.paths import (
    CHECKPOINTS,
    REPORT,
    SPARSE,
    budget_tag,
    fmt_count,
    ratio_tag,
    scratch_name,
    stage_files,
)
from trainer.config.settings import RunConfig
from trainer.errors import ParamError

SPARSE_JOB = "sparse"
REPORT_JOB = "report"
LOGS = Path("logs")  # <workdir>/logs: a log per job and the record of the jobs (jobs.json)


class ChainSpec(NamedTuple):
    """One chain of a study: its tag (job and file names), its target's label and index in
    --ratios / --targets, and how it prunes (criterion, allocation)."""

    tag: str  # '90'; another criterion or allocation first: 'l1_90', 'bn_uniform_90'
    label: str  # 'ratio 0.9', '4M params'
    criterion: str
    allocation: str
    target: int  # the index of its ratio or budget


def variant_prefix(criterion: str, allocation: str) -> str:
    """'' for slimming (bn, global: today's file names), else 'l1_' or 'random_uniform_'."""
    if (criterion, allocation) == ("bn", "global"):
        return ""
    return criterion + ("" if allocation == "global" else f"_{allocation}") + "_"


def chains(run: RunConfig) -> list[ChainSpec]:
    """Each chain of a study, in order: per criterion of --criteria and allocation of
    --allocations, one per ratio ('90', 'ratio 0.9') or budget ('4M', '4M params'). The tag
    names the chain's job and its files (model_prune_<tag>.pth)."""
    if not run.targets:
        targets = [(ratio_tag(r), f"ratio {r:g}") for r in run.ratios]
    else:
        kind = run.target_kind
        targets = [(budget_tag(b, kind), f"{fmt_count(b)} {kind}") for b in run.targets]
    return [ChainSpec(variant_prefix(c, a) + tag, label, c, a, i)
            for c in run.criteria for a in run.allocations
            for i, (tag, label) in enumerate(targets)]


def job_names(run: RunConfig) -> list[str]:
    """Every job of the study, in an order that runs each after the ones it needs."""
    return [SPARSE_JOB, *[c.tag for c in chains(run)], REPORT_JOB]


def job_outputs(run: RunConfig, name: str) -> list[Path]:
    """The files job ``name`` makes (a chain: each round's pruned and fine-tuned checkpoint,
    and with --scratch the last pruned architecture trained from scratch)."""
    work = Path(run.workdir)
    if name == SPARSE_JOB:
        return [work / CHECKPOINTS / SPARSE]
    if name == REPORT_JOB:
        return [work / REPORT]
    files = [f for p in range(1, run.passes + 1)
             for f in stage_files(work, name, p, run.passes)]
    return files + ([scratch_name(files[-2], run.scratch)] if run.scratch else [])


def job_epochs(run: RunConfig, name: str) -> int:
    """Epochs job ``name`` trains (what its ETA counts down)."""
    if name == SPARSE_JOB:
        return run.train_epochs
    if name == REPORT_JOB:
        return 0
    # Scratch-B's epochs depend on the pruned MACs, known once pruned: counted as Scratch-E's
    return run.passes * run.finetune_epochs + (run.train_epochs if run.scratch else 0)


def check_job(run: RunConfig) -> None:
    """``--job`` names a job of this study."""
    if run.job is None:
        return
    names = job_names(run)
    if run.job not in names:
        raise ParamError.value("job", run.job, f" is not a job of this study; its jobs are "
                               f"{', '.join(names)}", quote=True)


def log_path(logs: Path, name: str) -> Path:
    """The log file of job ``name`` (a sweep's 'point/50' -> point--50.log)."""
    return logs / (name.replace("/", "--") + ".log")
