"""What a command runs on: the Accelerator, the data and its loaders, the model on the device
(memory format, compile, DDP or DataParallel), and the end of a run."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import accelerate.utils
import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import InitProcessGroupKwargs
from rich.markup import escape
from torch import nn

from trainer.config.checks import check_batch_split
from trainer.config.settings import RunConfig
from trainer.config.threads import Threads, choose_threads
from trainer.data.datasets import build_datasets
from trainer.data.loaders import make_test_loader, make_train_loader
from trainer.errors import ConfigError
from trainer.train import dist
from trainer.train.progress import say


def threads_for(given: int | None) -> Threads:
    """Set this process's torch threads before any tensor work: ``given`` (--threads), else
    trainer.config.threads' choice (OMP_NUM_THREADS, or the cores free at start); return the
    choice, for the run's header."""
    choice = choose_threads(given=given)
    if torch.get_num_threads() != choice.count:
        torch.set_num_threads(choice.count)
    return choice


def make_accelerator(run: RunConfig):
    """The Accelerator for this process; FP32 unless --mixed-precision says otherwise."""
    # Collectives fail after dist_timeout seconds instead of hanging forever.
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=run.dist_timeout))]
    kwargs = {}
    if run.log_with:
        kwargs = {"log_with": run.log_with, "project_dir": str(Path(run.workdir) / "runs")}
    try:
        acc = Accelerator(cpu=run.cpu, mixed_precision=run.mixed_precision,
                          kwargs_handlers=handlers, **kwargs)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot start Accelerate ({str(exc).splitlines()[0]}); "
                          "check --mixed-precision / --log-with / --cpu") from None
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = run.cudnn_benchmark
        if not run.tf32:  # strict IEEE FP32 for matmul and conv
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
    if run.debug:
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


def check_tracker(name: str) -> None:
    """Accelerate only warns and runs on untracked when a tracker is missing; refuse instead
    (reads Accelerate's own tracker table: called where a run starts)."""
    if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(f"--log-with {name!r} is not an Accelerate tracker; use one of "
                          f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
    available = getattr(accelerate.utils, f"is_{name}_available", None)
    if available is not None and not available():
        raise ConfigError(f"--log-with {name}: {name} is not installed; pip install {name} "
                          "or leave out --log-with")


# ---------------------------------------------------------------- data


def per_process_batch(run: RunConfig) -> int:
    """--batch-size is the global batch; DDP splits it over processes, DP does not."""
    if run.mode != "ddp":
        return run.batch_size
    return check_batch_split(run.batch_size, run.num_processes)


def load_data(run: RunConfig):
    data = build_datasets(run.dataset, run.data_dir, image_size=run.image_size,
                          download=run.download, synthetic_train=run.synthetic_train,
                          synthetic_test=run.synthetic_test, seed=run.seed,
                          augment=run.augment)
    for note in data.notes:
        say(f"[yellow]note:[/] {escape(note)}")
    return data


def loader_kind(run: RunConfig, device: torch.device) -> str:
    """--loader resolved: ``auto`` is the gpu loader on CUDA (in-memory datasets), else torch."""
    if run.loader != "auto":
        return run.loader
    return "gpu" if device.type == "cuda" and run.dataset != "imagefolder" else "torch"


def channels_last(run: RunConfig, device: torch.device) -> bool:
    return run.channels_last and device.type == "cuda"


def _workers(run: RunConfig) -> int:
    return 0 if run.debug else run.num_workers


def training_loader(run: RunConfig, data, accelerator, kind: str | None = None):
    """This rank's training batches (``kind``: the resolved --loader unless given)."""
    device = accelerator.device
    return make_train_loader(data, batch_size=per_process_batch(run), num_workers=_workers(run),
                             rank=accelerator.process_index,
                             world_size=accelerator.num_processes, seed=run.seed,
                             kind=kind or loader_kind(run, device), device=device,
                             limit_batches=run.limit_batches,
                             channels_last=channels_last(run, device))


def evaluation_loader(run: RunConfig, data, accelerator):
    """This rank's share of the test set, for ``trainer.train.loop.evaluate`` (exact counts)."""
    device = accelerator.device
    test = make_test_loader(data, batch_size=max(per_process_batch(run), 1),
                            num_workers=_workers(run), kind=loader_kind(run, device),
                            rank=accelerator.process_index,
                            world_size=accelerator.num_processes, device=device)
    if not getattr(test, "exact_shard", False):
        test = accelerator.prepare(test)  # shards + pads; evaluate() uses gather_for_metrics
    return test


# ---------------------------------------------------------------- model


def to_device(model: nn.Module, run: RunConfig, accelerator) -> nn.Module:
    """The model on this process's device, in the memory format the loaders use."""
    model = model.to(accelerator.device)
    if channels_last(run, accelerator.device):
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_teacher(model: nn.Module, run: RunConfig, accelerator) -> nn.Module:
    """A distillation teacher: on the device, in eval mode, frozen, never wrapped in DDP (it
    only runs forward, on every rank, in the student's precision)."""
    model = to_device(model, run, accelerator).eval()
    model.requires_grad_(False)
    return model


def prepare_model(model: nn.Module, run: RunConfig, accelerator, optimizer=None):
    """Device, memory format, compile, DDP (via Accelerate) and DP (after prepare)."""
    if run.sync_bn and accelerator.num_processes > 1:
        # every process's batch in each BatchNorm's statistics (small per-GPU batches give
        # noisy ones, and slimming reads γ); the keys, and so the checkpoints, stay BatchNorm's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, run, accelerator)
    if run.compile:
        model = torch.compile(model)
    if optimizer is None:
        model = accelerator.prepare(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if run.mode == "dp" and accelerator.device.type == "cuda" and torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)  # after prepare, so saved keys carry no prefix
    return model, optimizer
