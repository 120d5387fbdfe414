"""``pipeline --jobs J`` / ``--gpus-per-job K`` / ``--slurm FILE``: a study as many jobs.

The jobs (trainer.config.study): the sparse stage on every GPU of the study, then one job per
target's chain on K GPUs of its own (J at once on the CPU, the cores split between them), then
the report. Each is ``python -m launch pipeline <the same settings> --job NAME``, so a job is
what a user could run by hand, on a pool here (launch.pool) or as a SLURM array task
(launch.slurm). Planning and ``--dry-run`` import no torch.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.accelerate_config import parse_gpu_ids, worker_argv
from launch.machine import check_machine, count_gpus, free_port
from launch.pool import Job, Pool
from launch.user_config import through_visible_devices
from trainer.config.commands import accepted
from trainer.config.paths import REPORT, lock_file
from trainer.config.settings import RunConfig
from trainer.config.study import (
    LOGS,
    REPORT_JOB,
    SPARSE_JOB,
    job_epochs,
    job_names,
    job_outputs,
    log_path,
)
from trainer.config.threads import choose_threads
from trainer.errors import ConfigError


@dataclass
class Layout:
    """Where a study's jobs run: ``gpus`` (physical ids; None on the CPU), ``per_job`` GPUs
    (or CPU processes) of a chain, ``slots`` jobs at once, ``threads`` per job (None: the
    user's OMP_NUM_THREADS)."""

    gpus: list[str] | None
    per_job: int
    slots: int
    threads: int | None
    note: str | None = None
    alone: int | None = None  # threads of a job that runs alone (the sparse stage, the report)

    @property
    def cpu(self) -> bool:
        return self.gpus is None


def plan_layout(run: RunConfig, visible_gpus: int | None = None,
                environ: dict[str, str] | None = None, cores: int | None = None,
                busy: float | None = None) -> Layout:
    """The GPUs (or CPU slots) of ``run``'s jobs; ``visible_gpus``, ``environ``, ``cores`` and
    ``busy`` (cores busy now) default to this machine's (a test or --dry-run may fake them).
    Each process's threads: trainer.config.threads over all the processes running at once."""
    environ = os.environ if environ is None else environ

    def threads(processes: int) -> int:
        return choose_threads(processes, given=run.threads, environ=environ, total=cores,
                              busy=busy).count

    ids = parse_gpu_ids(run.gpu_ids)
    note = None
    if not run.cpu and not run.slurm:
        visible = count_gpus(run.dry_run, environ) if visible_gpus is None else visible_gpus
        if run.gpus is None and not ids and visible == 0:
            note = ("note: no CUDA GPU is visible; running the jobs on the CPU (add --cpu to "
                    "silence this note)")
        else:
            total = run.gpus if run.gpus is not None else (len(ids) if ids else visible)
            if not run.dry_run:
                check_machine(total, ids, visible)
            per = run.gpus_per_job or (max(total // run.jobs, 1) if run.jobs else 1)
            if per > total:
                raise ConfigError(f"--gpus-per-job {per} but only {total} GPUs are visible; use "
                                  f"--gpus-per-job {total} or fewer")
            slots = min(total // per, run.jobs or total)
            pool = ",".join(str(i) for i in (ids or range(total)))
            gpus = through_visible_devices(pool, environ.get("CUDA_VISIBLE_DEVICES")).split(",")
            return Layout(gpus, per, slots, threads(slots * per), alone=threads(len(gpus)))
    if run.slurm and not run.cpu:  # the cluster's GPUs: nothing to count here
        per = run.gpus_per_job or 1
        return Layout([str(i) for i in range(run.gpus or per)], per, run.jobs or 1, None)
    procs = run.gpus or 1  # --cpu --gpus N: N gloo processes per job
    slots = run.jobs or 1
    return Layout(None, procs, slots, threads(slots * procs), note, alone=threads(procs))


def study_jobs(run: RunConfig, layout: Layout, resume: bool | None = None) -> list[Job]:
    """The study's jobs: ``python -m launch pipeline <settings> --job NAME``, each with its
    GPUs or processes, log, the jobs it needs, its epochs and files."""
    run = run.replace(cpu=run.cpu or layout.cpu)
    resume = run.resume if resume is None else resume
    base = worker_argv(run.replace(job=None, resume=resume), *accepted("pipeline"))
    logs = Path(run.workdir) / LOGS
    chains = [n for n in job_names(run) if n not in (SPARSE_JOB, REPORT_JOB)]
    jobs = []
    for name in job_names(run):
        if name == SPARSE_JOB:  # alone: every GPU of the study
            width, deps = (len(layout.gpus) if layout.gpus else layout.per_job), ()
        elif name == REPORT_JOB:  # profiles the models on one device
            width, deps = 1, tuple(chains)
        else:
            width, deps = layout.per_job, (SPARSE_JOB,)
        argv = [sys.executable, "-m", "launch", *base, "--job", name]
        if width > 1 or not layout.cpu:
            argv += ["--gpus", str(width)]
        several = width > 1 and (layout.cpu or run.mode == "ddp")
        alone = name in (SPARSE_JOB, REPORT_JOB)  # nothing runs beside it: every core
        jobs.append(Job(name, argv, log_path(logs, name), gpus=width, deps=deps,
                        epochs=job_epochs(run, name), outputs=tuple(job_outputs(run, name)),
                        port=several, threads=layout.alone if alone else None))
    return jobs


def run_study(run: RunConfig) -> int:
    """Run (or --dry-run, or --slurm: write) ``run`` as a pool of jobs; the exit code."""
    layout = plan_layout(run)
    if layout.note:
        print(layout.note, file=sys.stderr)
    jobs = study_jobs(run, layout, resume=True if run.slurm else None)
    if run.slurm:
        from launch.slurm import write_script

        write_script(Path(run.slurm), jobs, layout, run, what="pipeline")
        return 0
    if run.dry_run:
        print(describe(jobs, layout, Path(run.workdir) / LOGS))
        return 0
    return run_pool(run.replace(cpu=run.cpu or layout.cpu), jobs, layout,
                    Path(run.workdir) / LOGS)


def run_pool(run: RunConfig, jobs: list[Job], layout: Layout, logs: Path) -> int:
    """Check the study's inputs and outputs once, hold its lock, and run the pool."""
    from trainer.commands.train import preflight
    from trainer.commands.worker import check_outputs
    from trainer.files.atomic import ensure_writable, remove_empty_made
    from trainer.files.lock import BOTH, OutputLock
    from trainer.train.runtime import check_tracker

    if run.log_with:
        check_tracker(run.log_with)
    preflight(run)  # bad input: one line now, not one failed job after another
    found = lock_file(run.replace(job=None))
    lock = OutputLock(found[1], found[0]).acquire(BOTH) if found else None
    try:
        check_outputs(run.replace(job=None))
        ensure_writable(logs)
        pool = Pool(jobs, gpus=layout.gpus, slots=layout.slots, threads=layout.threads,
                    logs=logs, resume=run.resume)
        code = pool.run()
        if code == 0:  # the closing lines of a study run in one process, in short
            pool.console.print(f"report: {Path(run.workdir) / REPORT}\nlogs:   {logs}/",
                               highlight=False, markup=False)
        return code
    finally:
        if lock is not None:
            lock.release()
        remove_empty_made()


def describe(jobs: list[Job], layout: Layout, logs: Path) -> str:
    """The dry-run text: each job's GPUs, port and command, as the pool would start it when
    every job before it runs (ports: free now, each job its own)."""
    where = (f"on the CPU, {layout.slots} at once, {layout.threads} thread(s) each"
             if layout.cpu else
             f"on GPUs {','.join(layout.gpus)}, {layout.per_job} per job, at most "
             f"{layout.slots} at once")
    lines = [f"# {len(jobs)} jobs {where}; logs and jobs.json in {logs}/"]
    sets = _gpu_sets(jobs, layout)
    used: set[int] = set()
    for job in jobs:
        env = {}
        gpus = sets.get(job.name)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        if job.threads or layout.threads:
            env["OMP_NUM_THREADS"] = str(job.threads or layout.threads)
        argv, port = list(job.argv), None
        if job.port:
            port = free_port()
            while port in used:
                port = free_port()
            used.add(port)
            argv += ["--main-process-port", str(port)]
        after = f" (after {', '.join(job.deps)})" if job.deps else ""
        where = f"GPUs {','.join(gpus)}" if gpus is not None else "CPU"
        lines.append(f"# job {job.name}{after}: {where}, port {port or '-'}, log {job.log}")
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"{prefix} {shlex.join(argv)}".strip())
    return "\n".join(lines)


def _gpu_sets(jobs: list[Job], layout: Layout) -> dict[str, list[str]]:
    """The GPUs each job gets when the jobs that may run together start in order: a job as
    wide as the pool takes all of them, the others the pool's sets in turn."""
    if layout.cpu:
        return {}
    out, turn = {}, 0
    for job in jobs:
        if job.gpus >= len(layout.gpus):
            out[job.name] = list(layout.gpus)
            continue
        if job.name == REPORT_JOB or job.name.endswith("/" + REPORT_JOB):
            out[job.name] = layout.gpus[:job.gpus]
            continue
        first = (turn % layout.slots) * layout.per_job
        out[job.name] = layout.gpus[first:first + job.gpus]
        turn += 1
    return out
