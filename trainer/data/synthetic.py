"""A built-in, offline, learnable 10-class image dataset drawn procedurally.

Each image is one foreground pattern in a random colour on a random background colour, with
random size, position, stripe period / phase and mild Gaussian noise. The class is the pattern:

    0 disc, 1 square, 2 triangle, 3 cross, 4 ring,
    5 horizontal stripes, 6 vertical stripes, 7 diagonal stripes, 8 checkerboard, 9 dots

Each class also has its own foreground hue, jittered so neighbouring classes overlap: colour
is a cue (as on CIFAR, where sky and grass are) that gets a model off the ground within an
epoch, and shape and texture are needed for the rest. Everything is vectorised numpy: the only
Python loop is over the 10 classes.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disc", "square", "triangle", "cross", "ring",
           "hstripes", "vstripes", "dstripes", "checkerboard", "dots")
NUM_CLASSES = len(CLASSES)
# Offset between the train and test seeds, so the two splits never share images.
TEST_SEED_OFFSET = 1_000_003
# Per-channel mean / std of the pixels in [0, 1], measured on make_synthetic(20000, 0):
# foreground and background colours spread over the whole range, hence close to 0.5 / 0.29.
MEAN = (0.4919, 0.5241, 0.4835)
STD = (0.2917, 0.2927, 0.2883)
NOISE_STD = 0.05  # Gaussian pixel noise, in [0, 1] intensity units
COLOUR_JITTER = 0.2  # per-channel jitter of the class hue, in [0, 1] intensity units


def _palette() -> np.ndarray:
    """(10, 3) foreground colours in [0, 1]: evenly spaced hues."""
    hue = np.arange(NUM_CLASSES)[:, None] / NUM_CLASSES
    return 0.5 + 0.35 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))


PALETTE = _palette()


def _shape_masks(cls: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Masks of a compact shape of class ``cls``; dx, dy: (m, H, W) offsets from the centre."""
    dist = np.sqrt(dx ** 2 + dy ** 2)
    if cls == 0:  # disc
        return dist <= r
    if cls == 1:  # square, axis-aligned; 0.85 keeps its area close to the disc's
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if cls == 2:  # triangle pointing up or down (apex at the top or at the bottom)
        sign = rng.choice([-1.0, 1.0], size=r.shape)
        t = (sign * dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if cls == 3:  # cross (plus sign); arm half-width a third of the radius
        w = np.maximum(r / 3, 1.0)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    # ring: outer radius r, thickness ~ 40 % of r (at least 1.5 px so it stays visible)
    return (dist <= r) & (dist >= r - np.maximum(0.4 * r, 1.5))


def _texture_masks(cls: int, x: np.ndarray, y: np.ndarray, period: np.ndarray,
                   phase: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Masks of a periodic texture of class ``cls``; x, y: (m, H, W) pixel coordinates."""
    u, v = x / period, y / period
    if cls == 5:  # horizontal stripes
        return np.mod(v + phase, 1.0) < 0.5
    if cls == 6:  # vertical stripes
        return np.mod(u + phase, 1.0) < 0.5
    if cls == 7:  # diagonal stripes, either direction (/ or \)
        sign = rng.choice([-1.0, 1.0], size=period.shape)
        return np.mod((u + sign * v) / np.sqrt(2) + phase, 1.0) < 0.5
    if cls == 8:  # checkerboard
        return (np.floor(u + phase) + np.floor(v + phase)).astype(np.int64) % 2 == 0
    # dots: a square lattice of discs, radius a quarter of the period
    fu, fv = np.mod(u + phase, 1.0) - 0.5, np.mod(v + phase, 1.0) - 0.5
    return fu ** 2 + fv ** 2 <= 0.28 ** 2


def _col(a: np.ndarray) -> np.ndarray:
    """(m,) -> float32 (m, 1, 1), to broadcast per-sample parameters over the pixel grid."""
    return a.astype(np.float32)[:, None, None]


def _masks(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean foreground masks (n, size, size) for the given labels."""
    n = labels.shape[0]
    s = size / 32.0  # every length below is in pixels of a 32x32 image, scaled by s
    grid = np.arange(size, dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for cls in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == cls)
        m = idx.size
        if m == 0:
            continue
        x, y = grid[None, None, :], grid[None, :, None]
        if cls < 5:  # compact shape: radius 5..11 px, centre jittered so it stays mostly inside
            r = _col(rng.uniform(5, 11, m) * s)
            cx = _col(size / 2 + rng.uniform(-6, 6, m) * s)
            cy = _col(size / 2 + rng.uniform(-6, 6, m) * s)
            masks[idx] = _shape_masks(cls, x - cx, y - cy, r, rng)
        else:  # texture inside a square patch of half-size 9..16 px, period 4..9 px
            half = _col(rng.uniform(9, 16, m) * s)
            cx = _col(size / 2 + rng.uniform(-5, 5, m) * s)
            cy = _col(size / 2 + rng.uniform(-5, 5, m) * s)
            period = _col(rng.uniform(4, 9, m) * s)
            phase = _col(rng.uniform(0, 1, m))
            patch = np.maximum(np.abs(x - cx), np.abs(y - cy)) <= half
            masks[idx] = patch & _texture_masks(cls, x, y, period, phase, rng)
    return masks


def make_synthetic(n: int, seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` images deterministically from ``seed``.

    Returns (images uint8 (n, H, W, 3), labels int64 (n,)), H = W = image_size. Classes are
    balanced (counts differ by at most one) and shuffled. Same (n, seed, image_size), same
    arrays, on every machine.
    """
    if n < 0 or image_size < 8:
        raise ValueError(f"make_synthetic needs n >= 0 and image_size >= 8, got {n}, {image_size}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, image_size]))
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    masks = _masks(labels, image_size, rng)
    fg = np.clip(PALETTE[labels] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (n, 3)), 0, 1)
    # Background shifted from the foreground by 0.3..0.7 in every channel (circularly), so the
    # pattern always has contrast.
    bg = np.mod(fg + rng.uniform(0.3, 0.7, (n, 3)), 1.0).astype(np.float32)
    fg = fg.astype(np.float32)
    img = np.where(masks[..., None], fg[:, None, None, :], bg[:, None, None, :])
    img += NOISE_STD * rng.standard_normal(img.shape, dtype=np.float32)
    img *= 255
    return np.clip(np.rint(img, out=img), 0, 255, out=img).astype(np.uint8), labels
