"""``--slurm FILE``: a study's jobs as SLURM job arrays, written to a script instead of run.

The jobs are grouped in steps (the sparse stage; the chains; the report): each step is one
``sbatch --array`` whose task *i* runs job *i* of the study, with ``--resume`` so that a
requeued task continues from its last finished epoch, and each step waits for the one before
it (``afterok``; ``afterany`` before a report, which names what is missing). ``bash FILE`` on a
login node submits the steps; inside SLURM (``SLURM_ARRAY_TASK_ID`` set) the same file runs
its task. SLURM is the scheduler: nothing here places jobs on machines. A task of several
machines (``--num-machines M``) starts its nodes with ``srun``, the way docs/distributed.md
runs one job on several machines.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from launch.jobs import Job
from trainer.config.settings import RunConfig
from trainer.errors import ConfigError
from trainer.files.atomic import atomic_write_text, refuse_replacing_checkpoint, refuse_special


def steps(jobs: list[Job]) -> list[list[int]]:
    """Indexes of ``jobs`` by step: a job's step is one after the latest step it needs."""
    level: dict[str, int] = {}
    for job in jobs:
        level[job.name] = 1 + max((level[d] for d in job.deps), default=-1)
    out: list[list[int]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for i, job in enumerate(jobs):
        out[level[job.name]].append(i)
    return out


def _ranges(indexes: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sbatch --array)."""
    parts, start = [], None
    for i, n in enumerate(indexes):
        if start is None:
            start = n
        if i + 1 == len(indexes) or indexes[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n != start else str(n))
            start = None
    return ",".join(parts)


def script(jobs: list[Job], *, cpu: bool, threads: int | None, logs: Path, cwd: Path,
           machines: int = 1, what: str = "study") -> str:
    """The text of the sbatch script for ``jobs`` (see the module docstring)."""
    groups = steps(jobs)
    q = shlex.quote
    out = ["#!/bin/bash",
           f"# slimtune: a {what} as {len(jobs)} SLURM array tasks in {len(groups)} steps.",
           "# Submit from a login node with:   bash THIS_FILE",
           "# (each step is an sbatch --array whose task i runs job i below; a step starts after",
           "# the one before it; every task runs with --resume, so a requeued task continues.)",
           "# Add the #SBATCH lines your cluster needs (partition, account, time) here:",
           "#SBATCH --job-name=slimtune",
           f"#SBATCH --output={q(str(logs.absolute()))}/slurm-%A_%a.log",
           "#SBATCH --requeue"]
    for n, group in enumerate(groups, start=1):
        out.append(f"#   step {n}: " + ", ".join(f"{i}={jobs[i].name}" for i in group))
    out += ["set -euo pipefail", f"cd {q(str(cwd.absolute()))}", ""]
    out += ['if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then  # not a task: submit the steps',
            f"    mkdir -p {q(str(logs.absolute()))}", "    after="]
    for n, group in enumerate(groups, start=1):
        kind = "afterany" if any(jobs[i].after_any or jobs[i].name.endswith("report")
                                 for i in group) else "afterok"
        dep = f'${{after:+--dependency={kind}:$after --kill-on-invalid-dep=yes}}'
        res = _resources([jobs[i] for i in group], cpu=cpu, threads=threads, machines=machines)
        out.append(f'    step{n}=$(sbatch --parsable --array={_ranges(group)} {res} {dep} "$0")')
        out.append(f'    after=${{step{n}%%;*}}')
        out.append(f'    echo "step {n} ({len(group)} task(s)): SLURM job $after"')
    out += ["    exit 0", "fi", ""]
    out.append(f'export OMP_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-{threads or 1}}}"')
    out.append('case "$SLURM_ARRAY_TASK_ID" in')
    for i, job in enumerate(jobs):
        out.append(f"    {i})  # {job.name}")
        out.append(f"        {_command(job, machines)} ;;")
    out += ['    *) echo "no job $SLURM_ARRAY_TASK_ID in this script" >&2; exit 2 ;;', "esac", ""]
    return "\n".join(out)


def _resources(group: list[Job], *, cpu: bool, threads: int | None, machines: int) -> str:
    """sbatch options of a step: its tasks' GPUs (or CPU threads) and machines."""
    opts = []
    if cpu:
        opts.append(f"--cpus-per-task={threads or 1}")
    else:
        opts.append(f"--gres=gpu:{max(j.gpus for j in group)}")
    if machines > 1 and not any(j.name.endswith("report") for j in group):
        opts.append(f"--nodes={machines} --ntasks-per-node=1")
    return " ".join(opts)


def _command(job: Job, machines: int) -> str:
    argv = [*job.argv, *(["--resume"] if "--resume" not in job.argv else [])]
    if machines <= 1 or job.name.endswith("report"):
        return "exec " + shlex.join(argv)
    # every node runs the job's launcher with its own rank; node 0 is the rendezvous
    inner = shlex.join([*argv, "--num-machines", str(machines), "--main-process-port", "29500"])
    return ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); exec srun '
            "bash -c 'exec \"$@\" --machine-rank \"$SLURM_NODEID\" --main-process-ip "
            f"\"$0\"' \"$head\" {inner}")


def write_script(path: Path, jobs: list[Job], layout, run: RunConfig, what: str,
                 logs: Path | None = None) -> Path:
    """Write the script for ``jobs`` to ``path`` (executable) and say how to submit it."""
    refuse_special(path, "--slurm")
    refuse_replacing_checkpoint(path, "--slurm")
    logs = logs if logs is not None else Path(run.workdir) / "logs"
    text = script(jobs, cpu=layout.cpu, threads=layout.threads, logs=logs, cwd=Path.cwd(),
                  machines=run.num_machines, what=what)
    try:
        atomic_write_text(path, text)
        os.chmod(path, 0o755)
    except OSError as exc:
        raise ConfigError(f"--slurm {path} cannot be written ({exc.strerror or exc}); pick a "
                          "writable path") from None
    print(f"wrote {path}: {len(jobs)} SLURM array tasks in {len(steps(jobs))} steps; submit "
          f"them with: bash {shlex.quote(str(path))}")
    return path
