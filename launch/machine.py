"""What this machine has: its CPU cores, its CUDA GPUs (counted without torch for --dry-run),
a free TCP port. Shared by one launch (launch.plan) and a pool of jobs (launch.study)."""

from __future__ import annotations

import os
import socket

from trainer.errors import ConfigError


def free_port() -> int:
    """A TCP port no socket on this machine is bound to right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


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


def check_machine(gpus: int, ids: list[int] | None, visible: int) -> None:
    if visible == 0:
        raise ConfigError(f"--gpus {gpus} but no CUDA GPU is visible on this machine; "
                          "add --cpu to run on the CPU")
    if ids and max(ids) >= visible:
        raise ConfigError(f"--gpu-ids {','.join(map(str, ids))} but only {visible} GPUs are "
                          f"visible (ids 0..{visible - 1}); pick ids below {visible}")
    if gpus > visible:
        raise ConfigError(f"--gpus {gpus} but only {visible} GPUs are visible; "
                          f"use --gpus {visible} or fewer")
