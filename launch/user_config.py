"""A user's Accelerate config (``--accelerate-config FILE``): read, checked, and what it decides.

Every value the launcher or Accelerate acts on is checked here, one line each naming the key,
the value and what is allowed: Accelerate itself turns many of them into a traceback, and
some into a job other than the one asked for (``MULTI_CPU`` runs ONE process).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from launch.accelerate_config import parse_gpu_ids, process_count
from trainer.config.settings import MIXED_PRECISIONS
from trainer.errors import ConfigError, cut, shown


def settings_from_config(config: dict) -> dict[str, str]:
    """What a user's Accelerate config decides for the worker, over the CLI defaults:
    DataParallel (one process, ``distributed_type: 'NO'``, several ``gpu_ids``) and the mixed
    precision (an unquoted ``no`` in YAML reads as False)."""
    ids = str(config.get("gpu_ids") or "all")
    dp = str(config.get("distributed_type")) == "NO" and "," in ids
    precision = config.get("mixed_precision", "no")
    return {"mode": "dp" if dp else "ddp",
            "mixed_precision": "no" if precision in (False, None) else str(precision).lower()}


MAX_CONFIG_BYTES = 1 << 20  # an Accelerate config is a few hundred bytes


class _AliasFound(Exception):
    def __init__(self, anchor: str, line: int) -> None:
        super().__init__(anchor)
        self.anchor, self.line = anchor, line


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases: ``*name`` repeats a node, and nested repeats grow
    exponentially (a 363-byte file made a 2 GB value, and a 2 GB error line)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def load_user_config(path: Path) -> dict:
    """Read a user's Accelerate config (YAML or JSON); ConfigError on anything unusable."""
    fix = "fix it or write one with: python -m launch config --gpus N"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read --accelerate-config {path}: {reason}; {fix}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--accelerate-config {path} is over {MAX_CONFIG_BYTES:,} bytes; an "
                          f"Accelerate config is a few hundred: {fix}")
    loader = _NoAliasLoader(text)  # what yaml.safe_load does, with this loader
    try:
        config = loader.get_single_data()
    except _AliasFound as alias:
        raise ConfigError(f"--accelerate-config {path} uses a YAML alias "
                          f"(*{cut(alias.anchor, 60)} on line {alias.line}), which slimtune "
                          "does not expand; write the value out") from None
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--accelerate-config {path} is not valid YAML{where}; {fix}") from None
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        raise ConfigError(f"--accelerate-config {path} is not a mapping of settings; {fix}")
    if "distributed_type" not in config:
        raise ConfigError(f"--accelerate-config {path} has no distributed_type; {fix}")
    where = f"--accelerate-config {path}:"
    _check_user_kind(config["distributed_type"], where)
    multi = config["distributed_type"] == "MULTI_GPU"
    if multi and _user_int(config, "num_processes", -1, 1) is None:
        raise ConfigError(f"--accelerate-config {path} needs num_processes >= 1 for "
                          f"distributed_type {config['distributed_type']}; {fix}")
    _check_user_machines(config, where)
    _check_user_values(config, where)
    return config


# distributed_type values the worker supports. Accelerate turns others into a traceback
# (unknown names), a job the worker cannot save from (DEEPSPEED, FSDP, ...) or, for
# MULTI_CPU, ONE process whatever num_processes says.
USER_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU")


def _check_user_kind(kind, where: str) -> None:
    if kind is False:  # YAML 1.1 reads an unquoted NO as false; Accelerate then crashes
        raise ConfigError(f"{where} distributed_type: NO reads as false in YAML; quote it: "
                          "distributed_type: 'NO'")
    if kind not in USER_DISTRIBUTED_TYPES:
        raise ConfigError(f"{where} distributed_type {shown(kind)} is not supported; use 'NO' (one "
                          "process, or DataParallel over several gpu_ids) or MULTI_GPU (DDP; "
                          "add use_cpu: true for CPU processes)")


def _user_int(config: dict, key: str, default: int, low: int,
              high: int | None = None) -> int | None:
    """``config[key]`` as an int in [low, high]; None if it is not one (bools are not)."""
    value = config.get(key, default)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= low
          and (high is None or value <= high))
    return value if ok else None


def _check_user_machines(config: dict, where: str) -> None:
    """num_machines, machine_rank, their split of num_processes, the main machine's address."""
    machines = _user_int(config, "num_machines", 1, 1)
    if machines is None:
        raise ConfigError(f"{where} num_machines {shown(config['num_machines'])} is not allowed; "
                          "use a whole number >= 1 (1 for one machine)")
    if _user_int(config, "machine_rank", 0, 0, machines - 1) is None:
        raise ConfigError(f"{where} machine_rank {shown(config['machine_rank'])} is not allowed "
                          f"for num_machines {machines}; use 0 .. {machines - 1} (0 = main)")
    total = process_count(config)
    if config["distributed_type"] == "MULTI_GPU" and total % machines:
        raise ConfigError(f"{where} num_processes {total} does not split evenly over "
                          f"num_machines {machines}; use a multiple of {machines} (the total "
                          "over all machines)")
    if machines > 1 and not config.get("main_process_ip"):
        raise ConfigError(f"{where} num_machines {machines} needs main_process_ip; add the "
                          "address of the machine_rank 0 machine")
    port = config.get("main_process_port")
    if port is not None and _user_int(config, "main_process_port", 0, 1, 65535) is None:
        raise ConfigError(f"{where} main_process_port {shown(port)} is not a TCP port; use a free "
                          "port in 1..65535 (e.g. 29500) or leave it out")


def _check_user_values(config: dict, where: str) -> None:
    """mixed_precision, use_cpu and gpu_ids: what settings_from_config, launch_env and
    Accelerate read."""
    precision = config.get("mixed_precision")
    if precision not in (None, False) and precision not in MIXED_PRECISIONS:
        raise ConfigError(f"{where} mixed_precision {shown(precision)} is not supported; use "
                          f"{', '.join(repr(p) for p in MIXED_PRECISIONS)} (quote 'no')")
    if not isinstance(config.get("use_cpu", False), bool):
        raise ConfigError(f"{where} use_cpu {shown(config['use_cpu'])} is not allowed; use true "
                          "(CPU processes) or false (GPUs)")
    ids = user_gpu_ids(config, where)
    local = process_count(config) // _user_int(config, "num_machines", 1, 1)
    if ids and config["distributed_type"] == "MULTI_GPU" and len(ids) != local:
        raise ConfigError(f"{where} gpu_ids {_ids_text(ids)} lists {len(ids)} GPUs for "
                          f"{local} processes per machine; list one GPU per process or write "
                          "gpu_ids: all")


def user_gpu_ids(config: dict, where: str) -> list[int] | None:
    """The GPU numbers a user's config names; None for ``all`` or none."""
    return parse_gpu_ids(config.get("gpu_ids"), f"{where} gpu_ids",
                         "(gpu_ids: 0,1) or write gpu_ids: all")


def _ids_text(ids: list[int]) -> str:
    return cut(",".join(map(str, ids)), 60)


def check_user_machine(config: dict, path: Path, visible: int,
                        visible_env: str | None = None) -> None:
    """What _check_machine refuses for --gpus/--gpu-ids, for the GPUs a user's config asks of
    this machine: without it a GPU config on a GPU-less machine quietly ran ONE CPU process.

    A config's gpu_ids become CUDA_VISIBLE_DEVICES as they are (physical numbers), so under
    a narrowed CUDA_VISIBLE_DEVICES they must be among its entries, else below ``visible``."""
    where = f"--accelerate-config {path}"
    ids = user_gpu_ids(config, where + ":")
    machines = _user_int(config, "num_machines", 1, 1)
    local = (process_count(config) // machines if config["distributed_type"] == "MULTI_GPU"
             else len(ids or [0]))
    if visible == 0:
        raise ConfigError(f"{where} asks for {local} GPU{'s' if local > 1 else ''} but no CUDA "
                          "GPU is visible on this machine; add --cpu to run on the CPU")
    allowed = [v.strip() for v in (visible_env or "").split(",") if v.strip()]
    if ids and allowed and not {str(i) for i in ids} <= set(allowed):
        raise ConfigError(f"{where} uses gpu_ids {_ids_text(ids)} but CUDA_VISIBLE_DEVICES="
                          f"{','.join(allowed)}; list GPUs from it, or gpu_ids: all")
    if ids and not allowed and max(ids) >= visible:
        raise ConfigError(f"{where} uses gpu_ids {_ids_text(ids)} but only {visible} GPUs are "
                          f"visible (ids 0..{visible - 1}); pick ids below {visible}")
    if local > visible:
        raise ConfigError(f"{where} starts {local} GPU processes on this machine but only "
                          f"{visible} GPUs are visible; use a config for {visible} or fewer "
                          f"(python -m launch config --gpus {visible})")


def through_visible_devices(gpu_ids: str, visible_env: str | None) -> str:
    """Map GPU numbers as this process sees them to CUDA_VISIBLE_DEVICES entries.

    Accelerate overwrites CUDA_VISIBLE_DEVICES with ``gpu_ids``; when the user had already
    narrowed it (e.g. ``CUDA_VISIBLE_DEVICES=2,3``), ``--gpu-ids 0`` must stay physical GPU 2.
    """
    if not visible_env or not visible_env.strip():
        return gpu_ids
    visible = [v.strip() for v in visible_env.split(",") if v.strip()]
    ids = [int(i) for i in gpu_ids.split(",")]
    if max(ids) >= len(visible):
        return gpu_ids
    return ",".join(visible[i] for i in ids)


