"""The device-resident loaders (trainer.data.gpu_loader), run on CPU tensors: shapes, label
alignment, exact crop/flip semantics, augmentation statistics against torchvision, sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from trainer.data.gpu_loader import (
    GPUTestLoader,
    GPUTrainLoader,
    derive_seed,
    shard_permutation,
)

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # output = pixel / 255
# chi-square critical values at p = 0.001 (the seeds are fixed, so the tests are deterministic)
CHI2_8DOF, CHI2_80DOF = 26.12, 124.84


def _coordinate_image(size: int = 32) -> np.ndarray:
    """R = row + 1, G = column + 1, B = 255: every output pixel says where it came from."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = np.arange(1, size + 1)[:, None]
    img[..., 1] = np.arange(1, size + 1)[None, :]
    img[..., 2] = 255
    return img


def _decode(x: torch.Tensor, pad: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets (oy, ox in 0..2*pad) and flips of a batch of crops of _coordinate_image."""
    px = torch.round(x * 255).to(torch.int64)  # (n, 3, H, W), values 0..255
    h = x.shape[-1]
    c = h // 2
    oy = px[:, 0, c, c] - 1 - c + pad
    flip = px[:, 1, c, c + 1] < px[:, 1, c, c]
    src_col = px[:, 1, c, c] - 1  # = ox - pad + c, or ox - pad + (W - 1 - c) when flipped
    ox = torch.where(flip, src_col - (h - 1 - c) + pad, src_col - c + pad)
    return oy.numpy(), ox.numpy(), flip.numpy()


def _chi2_uniform(values: np.ndarray, k: int) -> float:
    counts = np.bincount(values, minlength=k)
    assert len(counts) == k  # nothing outside 0..k-1
    expected = len(values) / k
    return float(((counts - expected) ** 2 / expected).sum())


def test_shapes_dtypes_channels_last() -> None:
    images = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    loader = GPUTrainLoader(images, labels, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                            channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and loader.num_samples == 20
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert [len(y) for _, y in batches] == [8, 8, 4]
    limited = GPUTrainLoader(images, labels, batch_size=8, limit_batches=2, **IDENTITY)
    assert len(limited) == len(list(limited)) == 2 and limited.num_samples == 16


def test_labels_follow_their_images() -> None:
    n = 200
    labels = torch.arange(n) % 10
    values = (labels * 20 + 10).to(torch.uint8)  # the label, written into every pixel
    images = values.view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    loader = GPUTrainLoader(images, labels, batch_size=32, seed=3, mean=(0.5,) * 3,
                            std=(0.25,) * 3)
    seen = []
    for x, y in loader:
        centre = torch.round((x[:, :, 16, 16] * 0.25 + 0.5) * 255)  # survives any crop
        assert torch.equal(centre, (y * 20 + 10).float()[:, None].expand(-1, 3))
        seen += y.tolist()
    assert sorted(seen) == sorted(labels.tolist())


def test_crop_flip_equals_torchvision_ops() -> None:
    """Each output is exactly pad(4, fill 0) -> crop(oy, ox) -> maybe hflip of its input."""
    n = 64
    images = torch.randint(1, 256, (n, 32, 32, 3), dtype=torch.uint8)
    coords = np.broadcast_to(_coordinate_image(), (n, 32, 32, 3)).copy()
    ours = GPUTrainLoader(images, torch.zeros(n, dtype=torch.int64), batch_size=n, seed=1,
                          **IDENTITY)
    probe = GPUTrainLoader(torch.from_numpy(coords), torch.zeros(n, dtype=torch.int64),
                           batch_size=n, seed=1, **IDENTITY)  # same seed: same crops/flips
    (x, _), (xc, _) = next(iter(ours)), next(iter(probe))
    # same permutation, so map each output back to its input via the shard order
    order = shard_permutation(n, 1, 0, 0, 1)
    oy, ox, flip = _decode(xc)
    for k in range(n):
        img = images[order[k]].permute(2, 0, 1)
        ref = TF.crop(TF.pad(img, [4]), int(oy[k]), int(ox[k]), 32, 32)
        ref = TF.hflip(ref) if flip[k] else ref
        assert torch.equal(torch.round(x[k] * 255).to(torch.uint8), ref)


def _torchvision_stats(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    pil = Image.fromarray(_coordinate_image())
    torch.manual_seed(0)
    return _decode(torch.stack([tf(pil) for _ in range(n)]))


def test_augmentation_statistics_match_torchvision() -> None:
    n = 3600  # 400 per offset bin
    coords = torch.from_numpy(np.broadcast_to(_coordinate_image(), (n, 32, 32, 3)).copy())
    loader = GPUTrainLoader(coords, torch.zeros(n, dtype=torch.int64), batch_size=512, seed=0,
                            **IDENTITY)
    oy, ox, flip = (np.concatenate(a) for a in zip(*(_decode(x) for x, _ in loader)))
    ty, tx, tflip = _torchvision_stats(n)
    for ours, theirs in ((oy, ty), (ox, tx)):
        assert _chi2_uniform(ours, 9) < CHI2_8DOF and _chi2_uniform(theirs, 9) < CHI2_8DOF
        # two-sample comparison of the offset histograms
        a, b = np.bincount(ours, minlength=9), np.bincount(theirs, minlength=9)
        assert float(((a - b) ** 2 / (a + b)).sum()) < CHI2_8DOF
    assert _chi2_uniform(oy * 9 + ox, 81) < CHI2_80DOF  # offsets independent, joint uniform
    assert abs(flip.mean() - 0.5) < 0.03 and abs(tflip.mean() - 0.5) < 0.03


def test_epochs_and_ranks_get_their_own_augmentation() -> None:
    n = 256
    coords = torch.from_numpy(np.broadcast_to(_coordinate_image(), (n, 32, 32, 3)).copy())

    def make(rank: int = 0) -> GPUTrainLoader:
        return GPUTrainLoader(coords, torch.zeros(n, dtype=torch.int64), batch_size=n,
                              rank=rank, world_size=2, **IDENTITY)

    loader = make()
    e0 = next(iter(loader))[0]
    loader.set_epoch(1)
    e1 = next(iter(loader))[0]
    assert not torch.equal(e0, e1) and not torch.equal(e0, next(iter(make(rank=1)))[0])
    assert torch.equal(e0, next(iter(make()))[0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_test_loader_slices_partition(world: int) -> None:
    n = 50  # not divisible by 3
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(n)
    seen, sizes = [], []
    for rank in range(world):
        loader = GPUTestLoader(images, labels, batch_size=7, rank=rank, world_size=world,
                               **IDENTITY)
        assert loader.exact_shard
        batches = list(loader)
        assert len(loader) == len(batches)
        for x, y in batches:  # no augmentation: pixels unchanged, in order
            assert torch.equal(torch.round(x * 255).to(torch.uint8),
                               images[y].permute(0, 3, 1, 2))
        got = torch.cat([y for _, y in batches]).tolist()
        seen += got
        sizes.append(len(got))
        assert got == list(range(loader.start, loader.stop))
    assert seen == list(range(n))  # contiguous slices, exact partition, no padding
    assert max(sizes) - min(sizes) <= 1


def test_test_loader_normalises() -> None:
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x, _ = next(iter(GPUTestLoader(images, torch.zeros(5, dtype=torch.int64), batch_size=5,
                                   mean=mean, std=std)))
    ref = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    expected = torch.stack([ref(Image.fromarray(a)) for a in images.numpy()])
    assert torch.allclose(x, expected, atol=1e-5)


def test_shard_permutation_and_seeds() -> None:
    shards = [shard_permutation(10, 0, 0, r, 4) for r in range(4)]
    assert all(len(s) == 3 for s in shards)
    flat = torch.cat(shards).tolist()
    assert set(flat) == set(range(10)) and len(flat) == 12
    assert torch.equal(shard_permutation(10, 0, 0, 1, 4), shards[1])
    assert not torch.equal(shard_permutation(10, 0, 1, 0, 1), shard_permutation(10, 0, 0, 0, 1))
    assert len(shard_permutation(2, 0, 0, 4, 5)) == 1  # fewer samples than ranks: wraps
    assert derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
    assert 0 <= derive_seed(2**40, 7, 3) < 2**63
    with pytest.raises(ValueError):
        GPUTrainLoader(torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.zeros(4),
                       batch_size=2, rank=2, world_size=2, **IDENTITY)
