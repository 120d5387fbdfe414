"""How a run starts: in this process when it needs one process, else as an ``accelerate launch``
job of ``python -m trainer`` processes with a generated (or the user's) Accelerate config.

``dispatch(run)`` is what ``python -m launch <command>`` calls. A job of several processes
(DDP, DataParallel over several GPUs, several machines, or ``--gpu-ids`` other than 0) is
started as ``python -m accelerate.commands.launch --config_file X -m trainer <command> ...``
and supervised by ``launch.supervise``. Planning and ``--dry-run`` import no torch.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.accelerate_config import (
    build_accelerate_config,
    build_launch_argv,
    dump_yaml,
    launch_env,
    parse_gpu_ids,
    process_count,
    threads_per_process,
    worker_argv,
    write_config,
)
from launch.machine import check_machine, count_gpus, free_port
from launch.user_config import (
    check_user_machine,
    load_user_config,
    settings_from_config,
    through_visible_devices,
)
from trainer.config.archs import with_recipe
from trainer.config.checks import check_batch_split, validate
from trainer.config.commands import accepted
from trainer.config.paths import CHECKPOINTS, lock_file, output_path
from trainer.config.settings import RunConfig
from trainer.config.threads import cores as machine_cores
from trainer.errors import ConfigError
from trainer.files.lock import BOTH, LAUNCHER_ENV, WRITER, OutputLock


@dataclass
class LaunchPlan:
    """What dispatch does: run ``run`` in this process (``config`` None) or launch ``argv``."""

    run: RunConfig
    config: dict | None = None
    config_path: Path | None = None
    write: bool = False  # True when dispatch generates ``config_path``
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def in_process(self) -> bool:
        return self.config is None


def dispatch(run: RunConfig) -> int:
    """Run ``run`` in this process or as an ``accelerate launch`` job; return the exit code."""
    if run.command == "sweep":  # a grid of studies, each checked as the pipeline it is
        from launch.sweep import run_sweep

        return run_sweep(run)
    run = with_recipe(run)  # the workers get the arch's recipe spelled out
    validate(run)  # refuse bad settings before any process starts or file is written
    if run.command == "pipeline" and (run.jobs or run.gpus_per_job or run.slurm):
        from launch.study import run_study  # a study as many jobs (launch.pool, launch.slurm)

        return run_study(run)
    plan = plan_launch(run)
    if plan.note:
        print(plan.note, file=sys.stderr)
    if run.dry_run:
        print(describe(plan))
        return 0
    if plan.in_process:
        from trainer.commands.worker import run_worker

        return run_worker(plan.run)
    from launch.supervise import local_ranks, run_job
    from trainer.commands.train import preflight
    from trainer.commands.worker import check_outputs
    from trainer.files.atomic import remove_empty_made
    from trainer.train.runtime import check_tracker

    if run.log_with:
        check_tracker(run.log_with)
    preflight(plan.run)  # bad input: one line here, not one per rank after torchrun's report
    lock = _lock_outputs(plan.run)
    try:
        check_outputs(plan.run)
        if plan.write:
            try:
                write_config(plan.config, plan.config_path)
            except OSError as exc:
                raise ConfigError(f"cannot write the Accelerate config {plan.config_path} "
                                  f"({exc.strerror or exc}); pick a writable --output/--workdir "
                                  "folder or pass --accelerate-config FILE") from None
        argv = plan.argv
        if needs_own_port(plan.config):
            argv = with_port(argv, own_port(plan.run))
        env = os.environ | plan.env
        if lock is not None:  # the job's rank 0 takes the writer's part of the lock
            lock.hand_over(WRITER)
            env = env | {LAUNCHER_ENV: str(lock.path)}
        return run_job(argv, env, ranks=local_ranks(plan.config))
    finally:
        if lock is not None:
            lock.release()
        remove_empty_made()


def _lock_outputs(run: RunConfig):
    """The lock on the job's outputs (trainer.files.lock), held by the launcher for the job's
    whole life: a second run on them is refused before any process starts."""
    found = lock_file(run)
    return None if found is None else OutputLock(found[1], found[0]).acquire(BOTH)


def needs_own_port(config: dict) -> bool:
    """True for a one-machine DDP job whose config names no rendezvous port.

    Accelerate's default port, 29500, is probed and only later bound by torchrun: two jobs
    started together on one machine both took it and one failed with EADDRINUSE (seen in CI),
    as does any job while a socket sits on 29500 without listening. A port the kernel has just
    handed out is free, and a launcher started beside this one gets another.
    """
    return (process_count(config) > 1 and int(config.get("num_machines", 1)) <= 1
            and not config.get("main_process_port"))


def own_port(run: RunConfig) -> int:
    """The rendezvous port of a one-machine job: --main-process-port when it is not the
    default (the pool gives each of its jobs one), else a free port."""
    default = RunConfig.__dataclass_fields__["main_process_port"].default
    return run.main_process_port if run.main_process_port != default else free_port()


def with_port(argv: list[str], port: int) -> list[str]:
    """``argv`` (an ``accelerate launch`` command) with ``--main_process_port port``."""
    at = argv.index("--config_file") + 2
    return [*argv[:at], "--main_process_port", str(port), *argv[at:]]


def plan_launch(run: RunConfig, visible_gpus: int | None = None,
                environ: dict[str, str] | None = None) -> LaunchPlan:
    """Decide how ``run`` runs; ``visible_gpus``/``environ`` default to this machine's."""
    environ = os.environ if environ is None else environ
    if run.debug:
        return LaunchPlan(run)
    if run.accelerate_config:
        return _user_config_plan(run, visible_gpus, environ)
    ids = parse_gpu_ids(run.gpu_ids)
    gpus = run.gpus if run.gpus is not None else (len(ids) if ids else None)
    visible = 0
    if not run.cpu:
        visible = count_gpus(run.dry_run, environ) if visible_gpus is None else visible_gpus
        if gpus is None and visible == 0 and run.num_machines == 1:
            return LaunchPlan(run.replace(cpu=True), note="note: no CUDA GPU is visible; running "
                              "on the CPU in this process (add --cpu to silence this note)")
        if gpus is None and visible == 0:
            raise ConfigError("no CUDA GPU is visible on this machine; add --cpu to run on "
                              "the CPU")
        gpus = visible if gpus is None else gpus
    config = build_accelerate_config(
        gpus=gpus if gpus is not None else 1, mode=run.mode, gpu_ids=ids,
        mixed_precision=run.mixed_precision, cpu=run.cpu, num_machines=run.num_machines,
        machine_rank=run.machine_rank, main_process_ip=run.main_process_ip,
        main_process_port=run.main_process_port)
    if not run.cpu and not run.dry_run:  # --dry-run previews a layout for any machine
        check_machine(gpus, ids, visible)
    if run.cpu and not run.dry_run:
        check_cpu_processes(config, f"--gpus {gpus} with --cpu", "use e.g. --gpus {cores} (one "
                            "per core)")
    if process_count(config) == 1 and config.get("gpu_ids", "all") in ("all", "0"):
        return LaunchPlan(run)
    _check_batches(run, config)
    if "gpu_ids" in config and config["gpu_ids"] != "all":
        config["gpu_ids"] = through_visible_devices(config["gpu_ids"],
                                                    environ.get("CUDA_VISIBLE_DEVICES"))
    return _subprocess_plan(run, config, default_config_path(run, config), True, environ)


def _user_config_plan(run: RunConfig, visible_gpus: int | None,
                      environ: dict[str, str]) -> LaunchPlan:
    if run.gpus is not None or run.gpu_ids is not None:
        raise ConfigError("--accelerate-config already fixes the processes and GPUs; drop "
                          "--gpus/--gpu-ids, or drop --accelerate-config to generate one")
    path = Path(run.accelerate_config)
    config = load_user_config(path)
    if not run.cpu and config.get("use_cpu") is not True and not run.dry_run:
        visible = count_gpus(False, environ) if visible_gpus is None else visible_gpus
        check_user_machine(config, path, visible, environ.get("CUDA_VISIBLE_DEVICES"))
    if (run.cpu or config.get("use_cpu") is True) and not run.dry_run:
        check_cpu_processes(config, f"--accelerate-config {path}",
                            "write e.g. num_processes: {cores} (one per core)")
    run = run.replace(**settings_from_config(config))
    _check_batches(run, config)
    return _subprocess_plan(run, config, path, False, environ)


PER_CORE = 4  # CPU processes a core may carry: beyond that each rank only crawls


def check_cpu_processes(config: dict, what: str, fix: str) -> None:
    """A CPU job starts at most PER_CORE processes per core of this machine: each is a whole
    interpreter with torch, and a hundred thousand would exhaust the machine."""
    local = process_count(config) // max(int(config.get("num_machines", 1)), 1)
    cores = machine_cores()
    if local > PER_CORE * cores:
        raise ConfigError(f"{what} starts {local:,} CPU processes, more than this machine's "
                          f"{cores} CPU cores can run (at most {PER_CORE * cores}, {PER_CORE} per "
                          f"core); {fix.format(cores=cores)}")


def _check_batches(run: RunConfig, config: dict) -> None:
    """The global batches of the run split evenly over the job's processes."""
    n = process_count(config)
    check_batch_split(run.batch_size, n)
    if run.command == "pipeline":
        check_batch_split(run.finetune_batch_size, n, "--finetune-batch-size")


def _subprocess_plan(run: RunConfig, config: dict, path: Path, write: bool,
                     environ: dict[str, str]) -> LaunchPlan:
    _require_accelerate()
    args = worker_argv(run, *accepted(run.command))
    argv = build_launch_argv(path, args[0], args[1:],
                             threads=threads_per_process(config, environ, run.threads))
    return LaunchPlan(run, config=config, config_path=path, write=write, argv=argv,
                      env=launch_env(config, run.cpu))


def default_config_path(run: RunConfig, config: dict) -> Path:
    """Where a generated config goes: next to the run's outputs.

    Folder: that of the run's best checkpoint (``--output`` or the command's default, e.g.
    beside ``--checkpoint`` for finetune), or ``<workdir>/checkpoints`` for pipeline and
    evaluate. Name: ``accelerate_<kind>_<N><unit>[_node<R>].yaml`` with kind ddp, cpu_ddp,
    dp or single; N = processes (``proc``) or, for dp, GPUs (``gpu``); ``_node<R>`` on several
    machines (their files may share a network folder).
    """
    out = output_path(run)
    if run.command == "pipeline" or out is None:
        folder = Path(run.workdir) / CHECKPOINTS
    else:
        folder = out.parent
    n = process_count(config)
    if n > 1:
        kind = "cpu_ddp" if config.get("use_cpu") else "ddp"
        name = f"accelerate_{kind}_{n}proc"
    elif "," in str(config.get("gpu_ids", "")):
        name = f"accelerate_dp_{len(str(config['gpu_ids']).split(','))}gpu"
    else:
        name = "accelerate_single_1proc"
    if int(config.get("num_machines", 1)) > 1:
        name += f"_node{config.get('machine_rank', 0)}"
    return folder / f"{name}.yaml"



def _require_accelerate() -> None:
    try:
        spec = importlib.util.find_spec("accelerate")
    except (ImportError, ValueError):
        spec = None
    roots = spec.submodule_search_locations if spec is not None else None
    if not roots or not any((Path(r) / "commands" / "launch.py").is_file() for r in roots):
        raise ConfigError("accelerate is not installed in this environment; "
                          "pip install accelerate")


def describe(plan: LaunchPlan) -> str:
    """The dry-run text: the exact command (and env), and the Accelerate config YAML."""
    if plan.in_process:
        argv = [sys.executable, "-m", "trainer",
                *worker_argv(plan.run, *accepted(plan.run.command))]
        return f"# runs in this process (one process, no accelerate launch):\n{shlex.join(argv)}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    command = f"{env} {shlex.join(plan.argv)}" if env else shlex.join(plan.argv)
    if needs_own_port(plan.config):
        command += ("\n# the launch adds --main_process_port <a free port> after --config_file "
                    "(Accelerate's default, 29500, would be shared by every job on this machine)")
    state = "would be written to" if plan.write else "read from"
    return (f"{command}\n# accelerate config ({state} {plan.config_path}):\n"
            f"{dump_yaml(plan.config)}")
