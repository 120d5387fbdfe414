"""Accelerate config files and ``accelerate launch`` command lines, as pure functions.

The config dicts use the same keys ``accelerate config`` writes and load with Accelerate's own
``ClusterConfig.from_yaml_file``. Layouts:

- one process (``--gpus 1``, or ``--mode dp`` with one GPU): ``distributed_type: 'NO'``;
- DataParallel (``--mode dp``): ``'NO'``, one process, ``gpu_ids`` lists the GPUs (Accelerate
  exports them as ``CUDA_VISIBLE_DEVICES``; the worker wraps the model in ``nn.DataParallel``);
- DDP (``--mode ddp``): ``MULTI_GPU`` with ``num_processes`` = processes on ALL machines;
- DDP on CPU: ``MULTI_GPU`` + ``use_cpu: true`` AND env ``ACCELERATE_USE_CPU=true`` (see
  :func:`launch_env`). Accelerate 1.15 starts only ONE process for ``MULTI_CPU`` configs and for
  ``--cpu --num_processes N``; ``MULTI_GPU`` goes through torchrun, which starts N, and the env
  var makes each worker's ``Accelerator`` pick the gloo backend instead of NCCL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from trainer.config.derived import worker_fields
from trainer.config.settings import MIXED_PRECISIONS, MODES, RunConfig
from trainer.config.threads import choose_threads
from trainer.errors import ConfigError, shown
from trainer.files.atomic import atomic_write_text

LAUNCH_MODULE = "accelerate.commands.launch"


def parse_gpu_ids(value: object, flag: str = "--gpu-ids",
                  example: str = "e.g. --gpu-ids 0,2") -> list[int] | None:
    """GPU numbers from ``"0,2"`` (``--gpu-ids`` or a config's ``gpu_ids``): ``[0, 2]``; None
    for none, blank or ``all``. ConfigError naming ``flag`` for anything else or a repeat."""
    if value is None or str(value).strip().lower() in ("", "all"):
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if isinstance(value, bool) or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{flag} {shown(value)} is not a list of GPU numbers; write them "
                          f"comma-separated, {example}")
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{flag} {shown(value)} names a GPU twice; list each GPU once")
    return ids


def _validate_gpu_ids(gpu_ids: list[int], gpus: int) -> None:
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in gpu_ids):
        raise ConfigError(f"--gpu-ids {gpu_ids} has an id that is not a GPU number; "
                          "use numbers >= 0, e.g. --gpu-ids 0,2")
    if len(set(gpu_ids)) != len(gpu_ids):  # ids given as a list, not parsed from text
        raise ConfigError(f"--gpu-ids {_join(gpu_ids)} names a GPU twice; list each GPU once")
    if len(gpu_ids) != gpus:
        raise ConfigError(f"--gpu-ids {_join(gpu_ids)} lists {len(gpu_ids)} GPUs but --gpus is "
                          f"{gpus}; give as many ids as --gpus (or leave --gpus out)")


def _validate(gpus: int, mode: str, gpu_ids: list[int] | None, mixed_precision: str, cpu: bool,
              num_machines: int, machine_rank: int, main_process_ip: str | None,
              main_process_port: int) -> None:
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus {gpus}: need at least 1 process per machine; "
                          "use --gpus 1 or more (with --cpu, --gpus N starts N CPU processes)")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r} is unknown; use --mode ddp or --mode dp")
    if mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"--mixed-precision {mixed_precision!r} is unknown; "
                          f"use one of {', '.join(MIXED_PRECISIONS)}")
    if num_machines < 1:
        raise ConfigError(f"--num-machines {num_machines}: need at least 1; use --num-machines 1")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--machine-rank {machine_rank} is out of range for --num-machines "
                          f"{num_machines}; use 0 .. {num_machines - 1}")
    if num_machines > 1 and not main_process_ip:
        raise ConfigError(f"--num-machines {num_machines} needs the main machine's address; "
                          "add --main-process-ip <address of the --machine-rank 0 machine>")
    if num_machines > 1 and not 1 <= main_process_port <= 65535:
        raise ConfigError(f"--main-process-port {main_process_port} is not a TCP port; "
                          "use a free port in 1..65535 (e.g. 29500), the same on every machine")
    if mode == "dp" and gpus > 1 and cpu:
        raise ConfigError("--mode dp splits batches over GPUs and cannot run with --cpu; "
                          "use --mode ddp --cpu for several CPU processes")
    if mode == "dp" and gpus > 1 and num_machines > 1:
        raise ConfigError("--mode dp runs on one machine; use --mode ddp for several machines")
    if gpu_ids is not None and cpu:
        raise ConfigError("--gpu-ids has no meaning with --cpu; drop one of them")
    if gpu_ids is not None:
        _validate_gpu_ids(gpu_ids, gpus)


def _join(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids)


def build_accelerate_config(*, gpus: int, mode: str = "ddp", gpu_ids: list[int] | None = None,
                            mixed_precision: str = "no", cpu: bool = False, num_machines: int = 1,
                            machine_rank: int = 0, main_process_ip: str | None = None,
                            main_process_port: int = 29500) -> dict:
    """Accelerate config dict for ``gpus`` processes/GPUs per machine on ``num_machines``.

    ``gpu_ids`` are GPU numbers on each machine; left out, DDP uses ``"all"`` (process i takes
    GPU i) and DataParallel lists the first ``gpus`` GPUs. ``main_process_ip``/``_port`` are
    written only for several machines. Raises ConfigError for contradictory settings.
    """
    _validate(gpus, mode, gpu_ids, mixed_precision, cpu, num_machines, machine_rank,
              main_process_ip, main_process_port)
    total = gpus * num_machines
    multi = total > 1 and mode == "ddp"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "MULTI_GPU" if multi else "NO",
        "downcast_bf16": False,
        "enable_cpu_affinity": False,
        "machine_rank": machine_rank,
        "main_training_function": "main",
        "mixed_precision": mixed_precision,
        "num_machines": num_machines,
        "num_processes": total if multi else 1,
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": cpu,
    }
    if not cpu:
        if gpu_ids is not None:
            config["gpu_ids"] = _join(gpu_ids)
        elif mode == "dp" and gpus > 1:
            config["gpu_ids"] = _join(list(range(gpus)))
        else:
            config["gpu_ids"] = "all"
    if num_machines > 1:
        config["main_process_ip"] = main_process_ip
        config["main_process_port"] = main_process_port
    return config


def dump_yaml(config: dict) -> str:
    """YAML text of ``config`` (safe_dump: strings like 'no' stay quoted strings)."""
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


def write_config(config: dict, path: str | os.PathLike, header: str | None = None) -> Path:
    """Write ``config`` as YAML to ``path`` atomically (temp file + rename); returns the path.

    ``header`` (optional) is written first as ``#`` comment lines.
    """
    path = Path(path)
    text = dump_yaml(config)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return atomic_write_text(path, text)


def build_launch_argv(config_path: str | os.PathLike, command: str, worker_args: list[str], *,
                      threads: int, python: str = sys.executable) -> list[str]:
    """``python -m accelerate.commands.launch --config_file X --num_cpu_threads_per_process T
    -m trainer <command> <args>``.

    Runs Accelerate through the interpreter (no ``accelerate`` executable on PATH needed).
    ``threads``: CPU threads per process (OMP_NUM_THREADS of each rank); passed always, so
    Accelerate picks no default of its own. Every value is its own argv item; nothing goes
    through a shell.
    """
    return [python, "-m", LAUNCH_MODULE, "--config_file", str(config_path),
            "--num_cpu_threads_per_process", str(threads), "-m", "trainer", command,
            *[str(a) for a in worker_args]]


def threads_per_process(config: dict, environ: Mapping[str, str],
                        given: int | None = None) -> int:
    """CPU threads for each process this machine starts (trainer.config.threads): ``--threads``,
    else the user's OMP_NUM_THREADS, else the free cores over the local processes (at least 1):
    Accelerate's own default put 2 threads on each of 2 processes on a 2-core machine."""
    machines = max(int(config.get("num_machines", 1)), 1)
    local = max(process_count(config) // machines, 1)
    return choose_threads(local, given=given, environ=environ).count


def launch_env(config: dict, cpu: bool) -> dict[str, str]:
    """Extra environment variables for the ``accelerate launch`` subprocess.

    ``ACCELERATE_USE_CPU=true`` on CPU runs: each worker's ``Accelerator`` then uses the CPU and
    gloo even under torchrun (without it a CPU-only worker falls back to one process per rank
    that each believes it is alone).
    """
    env: dict[str, str] = {}
    if cpu or config.get("use_cpu") is True:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _option_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def worker_argv(run: RunConfig, options: Collection[str] | None = None,
                positional: Sequence[str] = ()) -> list[str]:
    """``[command, *positional values, --opt, value, ...]`` for ``python -m trainer``.

    Options follow RunConfig's field order: ``--<name-with-dashes> value``; booleans as
    ``--flag`` / ``--no-flag``; tuples comma-joined; None values and empty tuples left out.
    ``options`` limits them to the fields a command accepts (None: every worker field);
    ``positional`` names
    fields the command takes as arguments (e.g. evaluate's checkpoint), in order. The
    launcher passes ``trainer.config.commands.accepted(command)``.
    """
    argv = [run.command]
    argv += [_option_value(getattr(run, n)) for n in positional if getattr(run, n) is not None]
    for f in worker_fields():
        if f.name == "command" or f.name in positional:
            continue
        if options is not None and f.name not in options:
            continue
        value = getattr(run, f.name)
        name = f.name.replace("_", "-")
        if value is None or value == ():  # the worker's default (an empty list: none)
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}", _option_value(value)]
    return argv


def process_count(config: dict) -> int:
    """Total processes a config starts (all machines): 1 unless distributed."""
    if str(config.get("distributed_type", "NO")).upper() == "NO":
        return 1
    return int(config.get("num_processes", -1))

