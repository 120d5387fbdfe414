"""What a command runs on: the Accelerator, the data and its loaders, the model on the device
(memory format, compile, DDP or DataParallel), and the end of a run."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from trainer import dist
from trainer.checks import check_batch_split
from trainer.config import RunConfig
from trainer.errors import ConfigError, DataError


def make_accelerator(cfg: RunConfig):
    """The Accelerator for this process; FP32 unless --mixed-precision says otherwise."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Collectives fail after dist_timeout seconds instead of hanging forever.
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))]
    kwargs = {}
    if cfg.log_with:
        kwargs = {"log_with": cfg.log_with, "project_dir": str(Path(cfg.workdir) / "runs")}
    try:
        acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                          kwargs_handlers=handlers, **kwargs)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot start Accelerate ({str(exc).splitlines()[0]}); "
                          "check --mixed-precision / --log-with / --cpu") from None
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if not cfg.tf32:  # strict IEEE FP32 for matmul and conv
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)
    return acc


def end_run(accelerator) -> None:
    """Finish the trackers; in one process, also Accelerate's end of training.

    A rank of a multi-process job keeps its process group and leaves through
    ``os._exit`` (``trainer.__main__.leave``), which frees it with the process. Destroying a
    gloo group deadlocked on torch 2.4 (seen here: the main thread, holding the GIL, joins a
    gloo thread that waits for the GIL to free a finished all-gather's tensors).
    """
    if dist.world_size() > 1:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


# ---------------------------------------------------------------- data


def per_process_batch(cfg: RunConfig) -> int:
    """--batch-size is the global batch; DDP splits it over processes, DP does not."""
    if cfg.mode != "ddp":
        return cfg.batch_size
    return check_batch_split(cfg.batch_size, cfg.num_processes)


def load_data(cfg: RunConfig):
    from trainer.data import build_datasets

    return build_datasets(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                          download=cfg.download, synthetic_train=cfg.synthetic_train,
                          synthetic_test=cfg.synthetic_test, seed=cfg.seed)


def check_classes(data, num_classes: int, what: str) -> None:
    if data.num_classes != num_classes:
        raise DataError(f"the {data.name} data has {data.num_classes} classes but {what} has "
                        f"{num_classes}; use a matching --dataset/--data-dir or checkpoint")


def loader_kind(cfg: RunConfig, device: torch.device) -> str:
    """--loader resolved: ``auto`` is the gpu loader on CUDA (in-memory datasets), else torch."""
    if cfg.loader != "auto":
        return cfg.loader
    return "gpu" if device.type == "cuda" and cfg.dataset != "imagefolder" else "torch"


def channels_last(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.channels_last and device.type == "cuda"


def _workers(cfg: RunConfig) -> int:
    return 0 if cfg.debug else cfg.num_workers


def training_loader(cfg: RunConfig, data, accelerator, kind: str | None = None):
    """This rank's training batches (``kind``: the resolved --loader unless given)."""
    from trainer.loaders import make_train_loader

    device = accelerator.device
    return make_train_loader(data, batch_size=per_process_batch(cfg), num_workers=_workers(cfg),
                             rank=accelerator.process_index,
                             world_size=accelerator.num_processes, seed=cfg.seed,
                             kind=kind or loader_kind(cfg, device), device=device,
                             limit_batches=cfg.limit_batches,
                             channels_last=channels_last(cfg, device))


def evaluation_loader(cfg: RunConfig, data, accelerator):
    """This rank's share of the test set, for ``trainer.engine.evaluate`` (exact counts)."""
    from trainer.loaders import make_test_loader

    device = accelerator.device
    test = make_test_loader(data, batch_size=max(per_process_batch(cfg), 1),
                            num_workers=_workers(cfg), kind=loader_kind(cfg, device),
                            rank=accelerator.process_index,
                            world_size=accelerator.num_processes, device=device)
    if not getattr(test, "exact_shard", False):
        test = accelerator.prepare(test)  # shards + pads; evaluate() uses gather_for_metrics
    return test


# ---------------------------------------------------------------- model


def to_device(model: nn.Module, cfg: RunConfig, accelerator) -> nn.Module:
    """The model on this process's device, in the memory format the loaders use."""
    model = model.to(accelerator.device)
    if channels_last(cfg, accelerator.device):
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_teacher(model: nn.Module, cfg: RunConfig, accelerator) -> nn.Module:
    """A distillation teacher: on the device, in eval mode, frozen, never wrapped in DDP (it
    only runs forward, on every rank, in the student's precision)."""
    model = to_device(model, cfg, accelerator).eval()
    model.requires_grad_(False)
    return model


def prepare_model(model: nn.Module, cfg: RunConfig, accelerator, optimizer=None):
    """Device, memory format, compile, DDP (via Accelerate) and DP (after prepare)."""
    if cfg.sync_bn and accelerator.num_processes > 1:
        # every process's batch in each BatchNorm's statistics (small per-GPU batches give
        # noisy ones, and slimming reads γ); the keys, and so the checkpoints, stay BatchNorm's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, cfg, accelerator)
    if cfg.compile:
        model = torch.compile(model)
    if optimizer is None:
        model = accelerator.prepare(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.mode == "dp" and accelerator.device.type == "cuda" and torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)  # after prepare, so saved keys carry no prefix
    return model, optimizer
