"""``python -m launch config``: write an Accelerate config file for any target machine.

Default file names (under ``configs/accelerate/``), built by :func:`default_config_name`:

- ``single_gpu.yaml`` / ``cpu_single.yaml``: one process;
- ``ddp_<N>gpu.yaml`` / ``cpu_ddp_<N>proc.yaml``: DDP over N GPUs / N CPU processes;
- ``dp_<N>gpu.yaml``: DataParallel over N GPUs (one process);
- ``ddp_<M>nodes_<N>gpu_rank<R>.yaml``: DDP over M machines x N GPUs, for machine R;
- ``_gpus0-2`` is added for explicit ``--gpu-ids 0,2``, ``_bf16``/``_fp16`` for mixed precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from launch.accelerate_config import build_accelerate_config, parse_gpu_ids, write_config
from trainer.config.checks import check_path_length
from trainer.errors import ConfigError
from trainer.files.atomic import refuse_replacing_checkpoint, refuse_special

CONFIG_DIR = Path("configs/accelerate")
# build_accelerate_config's defaults, left out of the regenerate line in each file's header.
_DEFAULTS = {"mode": "ddp", "mixed_precision": "no", "cpu": False, "num_machines": 1,
             "machine_rank": 0, "main_process_port": 29500}

# The committed examples in configs/accelerate/: (file name, build_accelerate_config kwargs).
EXAMPLE_CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("single_gpu.yaml", {"gpus": 1}),
    ("ddp_2gpu.yaml", {"gpus": 2}),
    ("ddp_4gpu.yaml", {"gpus": 4}),
    ("ddp_8gpu.yaml", {"gpus": 8}),
    ("dp_4gpu.yaml", {"gpus": 4, "mode": "dp"}),
    ("cpu_ddp_2proc.yaml", {"gpus": 2, "cpu": True}),
    ("ddp_2nodes_4gpu_rank0.yaml", {"gpus": 4, "num_machines": 2, "machine_rank": 0,
                                    "main_process_ip": "10.0.0.1", "main_process_port": 29500}),
)


def default_config_name(*, gpus: int, mode: str = "ddp", gpu_ids: list[int] | None = None,
                        mixed_precision: str = "no", cpu: bool = False, num_machines: int = 1,
                        machine_rank: int = 0, **_ignored: Any) -> str:
    """File name describing a layout (see the module docstring for the scheme)."""
    unit = "proc" if cpu else "gpu"
    prefix = "cpu_" if cpu else ""
    if num_machines > 1:
        name = f"{prefix}ddp_{num_machines}nodes_{gpus}{unit}_rank{machine_rank}"
    elif gpus == 1:
        name = "cpu_single" if cpu else "single_gpu"
    elif mode == "dp":
        name = f"dp_{gpus}gpu"
    else:
        name = f"{prefix}ddp_{gpus}{unit}"
    if gpu_ids is not None:
        name += "_gpus" + "-".join(str(i) for i in gpu_ids)
    if mixed_precision != "no":
        name += f"_{mixed_precision}"
    return name + ".yaml"


def command_line(settings: dict[str, Any]) -> str:
    """The ``python -m launch config`` line that regenerates a file with these settings."""
    parts = ["python -m launch config"]
    for key, value in settings.items():
        multi_node_key = key == "machine_rank" and settings.get("num_machines", 1) > 1
        if key in _DEFAULTS and _DEFAULTS[key] == value and not multi_node_key:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def write_named_config(settings: dict[str, Any], output: Path | None = None) -> Path:
    """Build the config for ``settings`` and write it (default: CONFIG_DIR/<derived name>)."""
    config = build_accelerate_config(**settings)
    path = output if output is not None else CONFIG_DIR / default_config_name(**settings)
    check_path_length("--output", path)
    refuse_special(path, "--output")
    refuse_replacing_checkpoint(path, "--output")  # a YAML file never takes a checkpoint's place
    header = f"Accelerate config written by: {command_line(settings)}"
    try:
        return write_config(config, path, header=header)
    except OSError as exc:
        raise ConfigError(f"cannot write the Accelerate config {path} "
                          f"({exc.strerror or exc}); pick a writable --output") from None


def write_example_configs(directory: Path = CONFIG_DIR) -> list[Path]:
    """(Re)write every EXAMPLE_CONFIGS file into ``directory``."""
    return [write_named_config(kwargs, Path(directory) / name) for name, kwargs in EXAMPLE_CONFIGS]


def config(
    gpus: Annotated[int | None, typer.Option(
        help="GPUs (with --cpu: processes) per machine [default: the number of --gpu-ids, "
             "else 1].", show_default=False)] = None,
    mode: Annotated[str, typer.Option(
        help="ddp (one process per GPU) or dp (one process, nn.DataParallel).")] = "ddp",
    gpu_ids: Annotated[str | None, typer.Option(
        help="Comma-separated GPU numbers to use, e.g. 0,2 [default: all GPUs for ddp, "
             "the first --gpus GPUs for dp].", show_default=False)] = None,
    mixed_precision: Annotated[str, typer.Option(help="no (FP32), bf16 or fp16.")] = "no",
    cpu: Annotated[bool, typer.Option(
        "--cpu", help="CPU processes (gloo) instead of GPUs.")] = False,
    num_machines: Annotated[int, typer.Option(help="Machines in the job.")] = 1,
    machine_rank: Annotated[int, typer.Option(help="This machine's rank (0 = main).")] = 0,
    main_process_ip: Annotated[str | None, typer.Option(
        help="Address of the rank-0 machine, needed with --num-machines > 1 [default: none].",
        show_default=False)] = None,
    main_process_port: Annotated[int, typer.Option(
        help="Port on the rank-0 machine, the same on every machine.")] = 29500,
    output: Annotated[Path | None, typer.Option(
        help="File to write [default: configs/accelerate/<name from the settings>.yaml].",
        show_default=False)] = None,
    examples: Annotated[bool, typer.Option(
        "--examples", help="Instead: rewrite every example file in configs/accelerate/.")]
    = False,
) -> int:
    """Write an Accelerate config file (for any machine; no GPU check) and print its path.

    Use it with: python -m launch <command> --accelerate-config FILE ..., or
    accelerate launch --config_file FILE -m trainer <command> ...
    """
    if examples:
        for path in write_example_configs():
            print(path)
        return 0
    ids = parse_gpu_ids(gpu_ids)
    if gpus is None:
        gpus = len(ids) if ids else 1
    settings: dict[str, Any] = {"gpus": gpus, "mode": mode}
    if ids is not None:
        settings["gpu_ids"] = ids
    settings.update(mixed_precision=mixed_precision, cpu=cpu, num_machines=num_machines,
                    machine_rank=machine_rank)
    if num_machines > 1:
        settings.update(main_process_ip=main_process_ip, main_process_port=main_process_port)
    print(write_named_config(settings, output))
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``config`` command to ``app``."""
    app.command("config")(config)
