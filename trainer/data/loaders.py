"""Training and test loaders over a :class:`trainer.data.common.Datasets`, for one rank of a job.

Two kinds: ``torch`` (DataLoader + torchvision transforms in persistent worker processes) and
``gpu`` (the whole uint8 set on the device, augmented there: trainer.data.gpu_loader). Epoch e on
rank r is a pure function of (seed, e, r) for both, so a resumed run sees the same batches.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from trainer.config.settings import LOADER_KINDS
from trainer.data.common import Datasets
from trainer.data.gpu_loader import GPUTestLoader, GPUTrainLoader, derive_seed, real_samples
from trainer.errors import DataError


class TrainLoader(Protocol):
    """What the engine needs from a training loader (torch or gpu kind)."""

    num_samples: int  # samples this rank sees per epoch (after limit_batches)

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def close(self) -> None: ...


def ignore_ctrl_c(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT. Ctrl-C reaches the whole foreground process group;
    the main process stops at its next step boundary (every 25 steps on a GPU) and needs
    batches until then, but a worker's default is to exit quietly on KeyboardInterrupt.
    (SIGTERM keeps its default: multiprocessing ends its workers with it at exit.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _SeededBatches(Sampler):
    """This rank's shard in batches, each tagged with the seed of its augmentation:
    ``(derive_seed(seed, epoch, rank, batch_index), indices)``."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, seed: int, rank: int):
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        indices = list(self.sampler)
        for b, start in enumerate(range(0, len(indices), self.batch_size)):
            yield (derive_seed(self.seed, self.epoch, self.rank, b),
                   indices[start:start + self.batch_size])


class _SeededDataset(Dataset):
    """Fetches a tagged batch with torch's global RNG (which torchvision's random transforms
    draw from) seeded by the tag, and restored afterwards: the augmentation of a batch is the
    same in any worker, with any number of workers, and leaves the caller's RNG alone."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.base[index]

    def __getitems__(self, tagged: tuple[int, list[int]]) -> list[Any]:
        seed, indices = tagged
        outer = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)  # CPU generator only: torch.manual_seed
        try:                                       # would also seed CUDA (~0.2 ms)
            return [self.base[i] for i in indices]
        finally:
            torch.set_rng_state(outer)


class TorchTrainLoader:
    """DataLoader over a DistributedSampler whose epoch e on rank r depends only on (seed, e, r).

    * Order: DistributedSampler(seed) + set_epoch -> same permutation on every rank, padded and
      strided into disjoint, equal-length shards.
    * Augmentation: batch b of epoch e on rank r is drawn with torch's RNG seeded from
      derive_seed(seed, e, r, b) (see _SeededDataset), so it does not depend on the number of
      workers, on which worker fetched it, or on restarts (resume gives the same batches).
    * Workers are persistent: forking them anew every epoch costs about a second here, which
      is most of a short epoch.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, num_workers: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu",
                 limit_batches: int | None = None, channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.num_workers, self.channels_last = num_workers, channels_last
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=seed, drop_last=False)
        self.batches = _SeededBatches(sampler, batch_size, seed, rank)
        self.pin = self.device.type == "cuda"
        self.loader = DataLoader(_SeededDataset(dataset), batch_sampler=self.batches,
                                 num_workers=num_workers, pin_memory=self.pin,
                                 persistent_workers=num_workers > 0,
                                 worker_init_fn=ignore_ctrl_c)
        full = len(self.batches)
        self._len = full if limit_batches is None else min(full, limit_batches)
        self.num_samples = min(len(sampler), self._len * batch_size)
        self.real_samples = real_samples(len(dataset), rank, world_size, self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        for _ in range(self._len):
            x, y = _next_from_workers(batches) if self.num_workers else next(batches)
            yield self._to_device(x, y)

    def close(self) -> None:
        """Shut the worker processes down now. Left to the garbage collector, a stopped run's
        workers go whenever its traceback is freed, and a worker that the stop signal ends
        meanwhile made torch print 'DataLoader worker ... is killed by signal' after the
        clean stop message."""
        iterator = getattr(self.loader, "_iterator", None)  # where persistent workers live
        self.loader._iterator = None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=self.pin)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, torch.int64, non_blocking=self.pin)


def _next_from_workers(batches: Iterator) -> Any:
    """next() whose DataError from a worker process keeps its one-line message.

    DataLoader re-raises a worker's exception with the worker traceback in the message; the
    user only needs the last line (e.g. which image could not be read).
    """
    try:
        return next(batches)
    except DataError as e:
        raise DataError(str(e).strip().rsplit("DataError: ", 1)[-1]) from None


def _check_kind(ds: Datasets, kind: str) -> str:
    """Validate ``kind``; image folders have no in-memory arrays, so gpu falls back to torch."""
    if kind not in LOADER_KINDS:
        raise ValueError(f"loader kind must be one of {LOADER_KINDS}, got {kind!r}")
    if kind == "gpu" and ds.train_arrays is None:
        return "torch"
    return kind


def make_train_loader(ds: Datasets, *, batch_size: int, num_workers: int, rank: int = 0,
                      world_size: int = 1, seed: int = 0, kind: str = "torch",
                      device: torch.device | str = "cpu", limit_batches: int | None = None,
                      channels_last: bool = False) -> TrainLoader:
    """Training batches ``(x, y)`` on ``device`` for this rank; ``batch_size`` is per process.

    kind "torch": DataLoader + DistributedSampler (PIL transforms, ``num_workers`` workers);
    kind "gpu": the whole uint8 set on ``device``, augmented there (imagefolder: torch instead).
    Call ``set_epoch(e)`` before iterating epoch e; epoch e on rank r is a pure function of
    (seed, e, r). ``len()`` is the batch count per epoch, equal on every rank.
    """
    common: dict[str, Any] = {"batch_size": batch_size, "rank": rank, "world_size": world_size,
                              "seed": seed, "device": device, "limit_batches": limit_batches,
                              "channels_last": channels_last}
    if _check_kind(ds, kind) == "gpu":
        return GPUTrainLoader(*ds.train_arrays, mean=ds.mean, std=ds.std, **common)
    return TorchTrainLoader(ds.train, num_workers=num_workers, **common)


def make_test_loader(ds: Datasets, *, batch_size: int, num_workers: int, kind: str = "torch",
                     rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                     channels_last: bool = False) -> Iterable:
    """Test batches in order.

    kind "torch": a plain DataLoader over the whole test set (CPU tensors; the engine shards it
    with ``accelerator.prepare`` and de-duplicates with ``gather_for_metrics``).
    kind "gpu": a GPUTestLoader giving rank r an exact, unpadded slice on ``device``
    (``exact_shard = True``). imagefolder always uses the torch kind.
    """
    if _check_kind(ds, kind) == "gpu":
        return GPUTestLoader(*ds.test_arrays, batch_size=batch_size, mean=ds.mean, std=ds.std,
                             rank=rank, world_size=world_size, device=device,
                             channels_last=channels_last)
    pin = torch.device(device).type == "cuda"
    return DataLoader(ds.test, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      worker_init_fn=ignore_ctrl_c,
                      pin_memory=pin)
