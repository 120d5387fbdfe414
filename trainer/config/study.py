"""A study's jobs, by name, with their files (pure Python: the launcher plans with it).

``pipeline`` is three kinds of job: the sparse stage; one *chain* per target (a ratio or a
budget: its prune -> fine-tune rounds), which no other chain reads or writes; the report,
made from every chain's files. ``pipeline --job NAME`` runs one of them; the launcher's pool
(``--jobs``, ``--gpus-per-job``) and ``--slurm`` scripts start them as separate processes.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config.paths import (
    CHECKPOINTS,
    REPORT,
    SPARSE,
    budget_tag,
    fmt_count,
    ratio_tag,
    stage_files,
)
from trainer.config.settings import RunConfig
from trainer.errors import ParamError

SPARSE_JOB = "sparse"
REPORT_JOB = "report"
LOGS = Path("logs")  # <workdir>/logs: a log per job and the record of the jobs (jobs.json)


def chains(run: RunConfig) -> list[tuple[str, str]]:
    """(tag, label) of each chain of a study, in order: ('90', 'ratio 0.9'), ('4M', '4M
    params'). The tag names the chain's job and its files (model_prune_<tag>.pth)."""
    if not run.targets:
        return [(ratio_tag(r), f"ratio {r:g}") for r in run.ratios]
    kind = run.target_kind
    return [(budget_tag(b, kind), f"{fmt_count(b)} {kind}") for b in run.targets]


def job_names(run: RunConfig) -> list[str]:
    """Every job of the study, in an order that runs each after the ones it needs."""
    return [SPARSE_JOB, *[tag for tag, _ in chains(run)], REPORT_JOB]


def job_outputs(run: RunConfig, name: str) -> list[Path]:
    """The files job ``name`` makes (a chain: each round's pruned and fine-tuned checkpoint)."""
    work = Path(run.workdir)
    if name == SPARSE_JOB:
        return [work / CHECKPOINTS / SPARSE]
    if name == REPORT_JOB:
        return [work / REPORT]
    return [f for p in range(1, run.passes + 1)
            for f in stage_files(work, name, p, run.passes)]


def job_epochs(run: RunConfig, name: str) -> int:
    """Epochs job ``name`` trains (what its ETA counts down)."""
    if name == SPARSE_JOB:
        return run.train_epochs
    if name == REPORT_JOB:
        return 0
    return run.passes * run.finetune_epochs


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
