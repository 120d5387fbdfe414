"""Loaders that keep the whole uint8 image set on the device and augment it there.

On a GPU the torch ``DataLoader`` (PIL decode, per-sample transforms in worker processes) is the
bottleneck for a CIFAR-sized model; here the data set lives on the device (50000 x 3 x 32 x 32
uint8 = 150 MiB) and each batch is gathered, padded/cropped, flipped and normalised by a few
vectorised tensor ops. The same code runs on CPU tensors (the tests use it there).

Augmentation matches torchvision's ``RandomCrop(size, padding=size // 8, fill=0)`` followed by
``RandomHorizontalFlip(0.5)`` in distribution: crop offsets uniform over 0..2*pad on each axis,
each sample flipped with probability 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, epoch, rank).

    numpy's SeedSequence hashes the tuple, so (0, 1) and (1, 0) give unrelated streams.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _to_device_nchw(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W) contiguous on ``device``."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images.to(device).permute(0, 3, 1, 2).contiguous()


class _Normalizer:
    """uint8 NCHW batch -> float32 normalised batch, optionally channels_last."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 channels_last: bool) -> None:
        # Fold /255 into the affine map: (x / 255 - mean) / std = x * scale + shift.
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale + self.shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``pad`` px) and horizontal flip of a uint8 NCHW batch.

    One gather does both: output pixel (i, j) of sample b reads padded pixel
    (i + oy[b], j + ox[b]), or (i + oy[b], ox[b] + W - 1 - j) when b is flipped.
    """
    n, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # zeros, like fill=0
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    rows = oy[:, None] + torch.arange(h, device=dev)[None, :]  # (n, h)
    j = torch.arange(w, device=dev)[None, :]
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - j, j)  # (n, w)
    b = torch.arange(n, device=dev)[:, None, None, None]
    c = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def shard_permutation(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's indices for ``epoch``, like DistributedSampler(shuffle=True, drop_last=False).

    The permutation depends on (seed, epoch) only, so it is the same on every rank; it is padded
    by wrapping around to a multiple of ``world_size`` and rank r takes every world_size-th entry
    from r, so shards are disjoint up to the padding and equally long.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        reps = math.ceil(total / n)
        perm = perm.repeat(reps)[:total]
    return perm[rank::world_size]


def real_samples(n: int, rank: int, world_size: int, num_samples: int) -> int:
    """How many of a rank's first ``num_samples`` samples of an epoch are real (of ``n``). A
    shard is padded at its end (the order wraps around to even out the ranks): rank r's k-th
    sample is position r + k·world of the padded order, real while that is below ``n``."""
    return min(num_samples, max(0, -(-(n - rank) // world_size)))


class GPUTrainLoader:
    """Shuffled, augmented, normalised training batches from a device-resident uint8 set.

    Epoch e on rank r is a pure function of (seed, e, r): the order comes from
    :func:`shard_permutation` and the augmentation from a device generator seeded with
    ``derive_seed(seed, e, r)``, so a resumed run reproduces an uninterrupted one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: torch.device | str = "cpu",
                 limit_batches: int | None = None, channels_last: bool = False) -> None:
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad rank/world_size/batch_size {rank}/{world_size}/{batch_size}")
        self.device = torch.device(device)
        self.images = _to_device_nchw(images, self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.pad = self.images.shape[-1] // 8  # 4 px for 32x32, as torchvision's padding=4
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.normalize = _Normalizer(mean, std, self.device, channels_last)
        per_rank = math.ceil(len(self.labels) / world_size)
        batches = math.ceil(per_rank / batch_size)
        self._len = batches if limit_batches is None else min(batches, limit_batches)
        self.num_samples = min(per_rank, self._len * batch_size)  # per rank per epoch
        self.real_samples = real_samples(len(self.labels), rank, world_size, self.num_samples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = epoch

    def close(self) -> None:
        """Nothing to shut down (no worker processes)."""

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = shard_permutation(len(self.labels), self.seed, self.epoch, self.rank,
                                self.world_size)[:self.num_samples].to(self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        for start in range(0, self.num_samples, self.batch_size):
            b = idx[start:start + self.batch_size]
            x = crop_flip(self.images[b], self.pad, g)
            yield self.normalize(x), self.labels[b]


class GPUTestLoader:
    """Normalised test batches; rank r gets a contiguous, unpadded slice of the test set.

    The slices of all ranks partition the set exactly (``exact_shard = True``), so the engine
    sums loss / correct / count per rank and all-reduces them instead of gathering.
    """

    exact_shard = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad rank/world_size/batch_size {rank}/{world_size}/{batch_size}")
        n = len(labels)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        self.device = torch.device(device)
        self.images = _to_device_nchw(images[lo:hi], self.device)
        self.labels = labels[lo:hi].to(self.device, torch.int64)
        self.start, self.stop = lo, hi  # this rank's slice of the full test set
        self.batch_size = batch_size
        self.num_samples = hi - lo
        self.normalize = _Normalizer(mean, std, self.device, channels_last)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.batch_size):
            stop = start + self.batch_size
            yield self.normalize(self.images[start:stop]), self.labels[start:stop]
