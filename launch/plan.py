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
import socket
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
from launch.user_config import (
    check_user_machine,
    load_user_config,
    settings_from_config,
    through_visible_devices,
)
from trainer.config.archs import with_recipe
from trainer.config.checks import check_batch_split, validate
from trainer.config.commands import accepted
from trainer.config.paths import CHECKPOINTS, output_path
from trainer.config.settings import RunConfig
from trainer.errors import ConfigError


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
    run = with_recipe(run)  # the workers get the arch's recipe spelled out
    validate(run)  # refuse bad settings before any process starts or file is written
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
    from trainer.train.runtime import check_tracker

    if run.log_with:
        check_tracker(run.log_with)
    preflight(plan.run)  # bad input: one line here, not one per rank after torchrun's report
    if plan.write:
        try:
            write_config(plan.config, plan.config_path)
        except OSError as exc:
            raise ConfigError(f"cannot write the Accelerate config {plan.config_path} "
                              f"({exc.strerror or exc}); pick a writable --output/--workdir "
                              "folder or pass --accelerate-config FILE") from None
    argv = plan.argv
    if needs_own_port(plan.config):
        argv = with_port(argv, free_port())
    return run_job(argv, os.environ | plan.env, ranks=local_ranks(plan.config))


def needs_own_port(config: dict) -> bool:
    """True for a one-machine DDP job whose config names no rendezvous port.

    Accelerate's default port, 29500, is probed and only later bound by torchrun: two jobs
    started together on one machine both took it and one failed with EADDRINUSE (seen in CI),
    as does any job while a socket sits on 29500 without listening. A port the kernel has just
    handed out is free, and a launcher started beside this one gets another.
    """
    return (process_count(config) > 1 and int(config.get("num_machines", 1)) <= 1
            and not config.get("main_process_port"))


def with_port(argv: list[str], port: int) -> list[str]:
    """``argv`` (an ``accelerate launch`` command) with ``--main_process_port port``."""
    at = argv.index("--config_file") + 2
    return [*argv[:at], "--main_process_port", str(port), *argv[at:]]


def free_port() -> int:
    """A TCP port no socket on this machine is bound to right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


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
        _check_machine(gpus, ids, visible)
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
    run = run.replace(**settings_from_config(config))
    _check_batches(run, config)
    return _subprocess_plan(run, config, path, False, environ)


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
                             threads=threads_per_process(config, environ))
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


def count_gpus(dry_run: bool, environ: dict[str, str]) -> int:
    """CUDA GPUs this process can use. ``--dry-run`` counts them without importing torch: the
    NVIDIA driver's /proc entries, narrowed by CUDA_VISIBLE_DEVICES."""
    if not dry_run:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        present = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return present
    return min(present, len([v for v in listed.split(",") if v.strip()]))


def _check_machine(gpus: int, ids: list[int] | None, visible: int) -> None:
    if visible == 0:
        raise ConfigError(f"--gpus {gpus} but no CUDA GPU is visible on this machine; "
                          "add --cpu to run on the CPU")
    if ids and max(ids) >= visible:
        raise ConfigError(f"--gpu-ids {','.join(map(str, ids))} but only {visible} GPUs are "
                          f"visible (ids 0..{visible - 1}); pick ids below {visible}")
    if gpus > visible:
        raise ConfigError(f"--gpus {gpus} but only {visible} GPUs are visible; "
                          f"use --gpus {visible} or fewer")


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
