"""``sweep``: a grid of studies (trainer.config.sweep) as one pool of jobs.

Every point is a ``pipeline`` study in ``<workdir>/<point>/`` whose jobs (launch.study) join one
pool (launch.pool: queue, isolation, live table, --resume) or one SLURM script, named
``<point>/<job>``. A point that shares another's sparse stage has no sparse job: its chains
wait for the other's, and its ``checkpoints/model_sparse.pth`` (and curves) link to that
file. A last job, ``sweep ... --job report``, writes ``<workdir>/sweep.md`` and
``plots/sweep.png`` from every point that finished. Planning and ``--dry-run`` import no torch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from launch.accelerate_config import worker_argv
from launch.pool import Job, Pool
from launch.study import Layout, describe, plan_layout, study_jobs
from trainer.config.archs import with_recipe
from trainer.config.checks import validate
from trainer.config.commands import accepted
from trainer.config.paths import CHECKPOINTS, PLOTS, SPARSE
from trainer.config.settings import RunConfig
from trainer.config.study import LOGS, SPARSE_JOB, log_path
from trainer.config.sweep import REPORT_JOB, SWEEP_REPORT, points, sparse_owner
from trainer.errors import ConfigError


def sweep_points(run: RunConfig) -> list[tuple[str, RunConfig]]:
    """The grid's points, each checked as the pipeline it is."""
    if not run.grid:
        raise ConfigError("sweep needs a setting with several values, e.g. --sparsity "
                          "1e-5,1e-4; for one study run pipeline")
    if run.job not in (None, REPORT_JOB):
        raise ConfigError(f"sweep --job takes only {REPORT_JOB} (the combined report); a "
                          "point's own jobs run as pipeline --workdir <point> --job NAME")
    out = []
    for name, point in points(run.replace(job=None)):
        point = with_recipe(point)
        validate(point)
        out.append((name, point))
    return out


def sweep_argv(run: RunConfig) -> list[str]:
    """``sweep <settings>`` with the grid's lists, as a job runs it again."""
    argv = worker_argv(run.replace(job=None, grid=()), *accepted("sweep"))
    for name, values in run.grid:
        flag = "--" + name.replace("_", "-")
        text = ",".join(f"{v:g}" for v in values)
        if flag in argv:
            argv[argv.index(flag) + 1] = text
        else:
            argv += [flag, text]
    return argv


def sweep_jobs(run: RunConfig, grid_points: list[tuple[str, RunConfig]], layout: Layout,
               resume: bool | None = None) -> list[Job]:
    """Every point's jobs (a shared sparse stage once), then the combined report."""
    owner = sparse_owner(grid_points)
    logs = Path(run.workdir) / LOGS
    jobs, reports = [], []
    for name, point in grid_points:
        for job in study_jobs(point, layout, resume=resume):
            if job.name == SPARSE_JOB and owner[name] != name:
                continue  # its chains read the owner's sparse model
            deps = tuple(f"{owner[name]}/{d}" if d == SPARSE_JOB else f"{name}/{d}"
                         for d in job.deps)
            full = f"{name}/{job.name}"
            jobs.append(dataclasses.replace(job, name=full, deps=deps, log=log_path(logs, full)))
        reports.append(jobs[-1].name)
    argv = [sys.executable, "-m", "launch", *sweep_argv(run.replace(
        resume=run.resume if resume is None else resume)), "--job", REPORT_JOB]
    jobs.append(Job(REPORT_JOB, argv, log_path(logs, REPORT_JOB), gpus=1, deps=tuple(reports),
                    after_any=True, outputs=(Path(run.workdir) / SWEEP_REPORT,),
                    threads=layout.alone))
    return jobs


def run_sweep(run: RunConfig) -> int:
    """Run (--dry-run: show; --slurm: write; --job report: report) the sweep; the exit code."""
    grid_points = sweep_points(run)
    if run.job == REPORT_JOB:
        from trainer.commands.sweep import write_sweep_report

        write_sweep_report(run, grid_points)
        return 0
    first = grid_points[0][1]
    layout = plan_layout(first)
    if layout.note:
        print(layout.note, file=sys.stderr)
    cpu = first.cpu or layout.cpu
    run = run.replace(cpu=cpu)
    grid_points = [(n, p.replace(cpu=cpu)) for n, p in grid_points]
    jobs = sweep_jobs(run, grid_points, layout, resume=True if run.slurm else None)
    logs = Path(run.workdir) / LOGS
    if run.slurm:
        from launch.slurm import write_script

        write_script(Path(run.slurm), jobs, layout, first, what="sweep", logs=logs)
        return 0
    if run.dry_run:
        print(describe(jobs, layout, logs))
        return 0
    return _run_sweep_pool(run, grid_points, jobs, layout, logs)


def _run_sweep_pool(run: RunConfig, grid_points: list[tuple[str, RunConfig]], jobs: list[Job],
                    layout: Layout, logs: Path) -> int:
    from trainer.commands.train import preflight
    from trainer.commands.worker import check_outputs
    from trainer.files.atomic import ensure_writable

    preflight(grid_points[0][1])  # bad data settings: one line now
    for _, point in grid_points:  # an earlier study is kept unless --resume / --overwrite
        check_outputs(point)
    ensure_writable(logs)
    link_shared_sparse(grid_points)
    pool = Pool(jobs, gpus=layout.gpus, slots=layout.slots, threads=layout.threads, logs=logs,
                resume=run.resume)
    code = pool.run()
    if code == 0:
        pool.console.print(f"sweep report: {Path(run.workdir) / SWEEP_REPORT}\nlogs:  "
                           f"       {logs}/", highlight=False, markup=False)
    return code


def link_shared_sparse(grid_points: list[tuple[str, RunConfig]]) -> None:
    """A point that shares another's sparse stage gets links to its model and curves."""
    owner = sparse_owner(grid_points)
    where = {name: Path(point.workdir) for name, point in grid_points}
    for name, home in where.items():
        if owner[name] == name:
            continue
        for sub, file in ((CHECKPOINTS, SPARSE), (PLOTS, Path(SPARSE).with_suffix(".png"))):
            link, target = home / sub / file, where[owner[name]] / sub / file
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                continue
            link.symlink_to(os.path.relpath(target, link.parent))
