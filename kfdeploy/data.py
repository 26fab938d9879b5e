"""Data: the embedded procedural sprites (the dSprites factor grid) and user datasets.

Every batch is a pure function of (seed, rank, step). That is what makes `--resume`
exact and data-parallel ranks disjoint without any sampler state to checkpoint.

A batch is `(images, labels)`: images float32 (N, C, H, W) in [0, 1], labels a dict
task name -> int64 tensor (N,).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Protocol, Sequence, Tuple

import numpy as np

IMAGE_SIZE = 64
TASK_CLASSES: Dict[str, int] = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}
TASK_NAMES: Tuple[str, ...] = tuple(TASK_CLASSES)
SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.arange(40) * (2 * math.pi / 40)
POSITIONS = np.linspace(0.0, 1.0, 32)

TASK_LABELS: Dict[str, list] = {
    "shape": list(SHAPES),
    "scale": [f"{s:.1f}" for s in SCALES],
    "orientation": [f"{math.degrees(a):g}°" for a in ORIENTATIONS],
    "pos_x": [f"{p:.3f}" for p in POSITIONS],
    "pos_y": [f"{p:.3f}" for p in POSITIONS],
}

NUM_COMBINATIONS = int(np.prod(list(TASK_CLASSES.values())))  # 737,280 as in dSprites
# One combination in this many belongs to the held-out split (about 5%, 36,864 images).
HELDOUT_EVERY = 20
_HELDOUT_SALT = np.uint64(0x9E3779B97F4A7C15)

# Geometry: a sprite at scale 1 has a radius of 10 px; centres span [12.5, 51.5] px so the
# largest sprite never leaves the canvas, and neighbouring positions sit 1.26 px apart.
_RADIUS_PX = 10.0
_CENTRE_LO, _CENTRE_HI = 12.5, 51.5
_WINDOW = 13  # half-width of the window rendered around each sprite; >= the largest extent


Batch = Tuple["torch.Tensor", Dict[str, "torch.Tensor"]]  # noqa: F821


class BatchSource(Protocol):
    """What the trainer needs: a batch for any step, so a resumed run sees the same data."""

    tasks: Sequence[str]

    def batch(self, step: int, batch_size: int, rank: int = 0) -> Batch: ...


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread hash of combination indices."""
    z = values.astype(np.uint64) + _HELDOUT_SALT
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_heldout(combination: np.ndarray) -> np.ndarray:
    """True where a combination index belongs to the held-out split (never trained on)."""
    return (_mix(combination) % np.uint64(HELDOUT_EVERY)) == 0


def factors_to_combination(factors: np.ndarray) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.asarray(factors).T), tuple(TASK_CLASSES.values()))


def combination_to_factors(combination: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(combination, tuple(TASK_CLASSES.values())), axis=1)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the canonical (unit-radius, upright) shape."""
    if shape == 0:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == 1:
        return u * u + (v / 0.5) ** 2 <= 1.0
    # The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, spans y in [-1, 1.25];
    # shrink it to fit the unit radius. It has no rotational symmetry, unlike the others.
    hx, hy = u * 1.15, v * 1.15 + 0.12
    hx2 = hx * hx
    return (hx2 + hy * hy - 1.0) ** 3 - hx2 * hy * hy * hy <= 0.0


def render(factors: np.ndarray) -> np.ndarray:
    """Render sprites for an (N, 5) int array of factor indices -> uint8 (N, 1, 64, 64), 0 or 255.

    Only a window around each sprite is computed, which keeps this at tens of thousands
    of images per second on one core.
    """
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(TASK_NAMES))
    n = len(factors)
    shape, scale, orient, px, py = (factors[:, i] for i in range(5))
    centre_x = _CENTRE_LO + POSITIONS[px] * (_CENTRE_HI - _CENTRE_LO)
    centre_y = _CENTRE_LO + POSITIONS[py] * (_CENTRE_HI - _CENTRE_LO)
    origin_x = np.floor(centre_x).astype(np.int64) - _WINDOW
    origin_y = np.floor(centre_y).astype(np.int64) - _WINDOW
    offsets = np.arange(2 * _WINDOW + 1)
    # Pixel centres relative to the sprite centre, in units of the sprite radius.
    inv_radius = (1.0 / (_RADIUS_PX * SCALES[scale])).astype(np.float32)[:, None]
    dx = ((origin_x[:, None] + offsets + 0.5 - centre_x[:, None]) * inv_radius)[:, None, :]
    dy = ((origin_y[:, None] + offsets + 0.5 - centre_y[:, None]) * inv_radius)[:, :, None]
    angle = ORIENTATIONS[orient]
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    # Rotate image coordinates into the shape's frame; image y grows downwards.
    u = cos * dx - sin * dy
    v = -sin * dx - cos * dy
    window = np.empty(u.shape, dtype=np.uint8)
    for kind in range(len(SHAPES)):
        mine = shape == kind
        window[mine] = _inside(kind, u[mine], v[mine]) * np.uint8(255)

    pad = _WINDOW + 1
    canvas = np.zeros((n, IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad), dtype=np.uint8)
    rows = (origin_y + pad)[:, None, None] + offsets[None, :, None]
    cols = (origin_x + pad)[:, None, None] + offsets[None, None, :]
    canvas[np.arange(n)[:, None, None], rows, cols] = window
    return canvas[:, None, pad : pad + IMAGE_SIZE, pad : pad + IMAGE_SIZE].copy()


def heldout_combinations(seed: int = 0) -> np.ndarray:
    """All held-out combination indices, in a fixed order shuffled by `seed`."""
    everything = np.arange(NUM_COMBINATIONS, dtype=np.int64)
    held = everything[is_heldout(everything)]
    return np.random.default_rng(seed).permutation(held)


def _to_batch(factors: np.ndarray, tasks: Sequence[str]) -> Batch:
    import torch

    images = torch.from_numpy(render(factors)).float().div_(255.0)
    labels = {t: torch.from_numpy(factors[:, TASK_NAMES.index(t)].copy()) for t in tasks}
    return images, labels


class SpritesSource:
    """The embedded default: an unlimited, reproducible stream of training sprites.

    Combinations in the held-out split are rejected, so no training image is ever one
    that evaluation uses.
    """

    def __init__(self, seed: int = 0, tasks: Sequence[str] = TASK_NAMES):
        unknown = [t for t in tasks if t not in TASK_CLASSES]
        if unknown:
            raise ValueError(f"unknown sprites task(s) {unknown}; known: {list(TASK_NAMES)}")
        self.seed = seed
        self.tasks = tuple(tasks)

    def train_factors(self, step: int, batch_size: int, rank: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, rank, step])
        # Oversample then drop held-out combinations; 5% rejection, so 1.25x is plenty.
        drawn = rng.integers(0, NUM_COMBINATIONS, size=int(batch_size * 1.25) + 16)
        kept = drawn[~is_heldout(drawn)][:batch_size]
        return combination_to_factors(kept)

    def batch(self, step: int, batch_size: int, rank: int = 0) -> Batch:
        return _to_batch(self.train_factors(step, batch_size, rank), self.tasks)

    def heldout(self, count: int, offset: int = 0) -> Batch:
        combos = heldout_combinations()[offset : offset + count]
        return _to_batch(combination_to_factors(combos), self.tasks)


class DatasetSource:
    """Adapts a user's map-style dataset (item -> (image, {task: label})) to a BatchSource.

    Each epoch is a seeded permutation, split across ranks; a step maps to a fixed slice
    of it, so resuming needs nothing but the step number.
    """

    def __init__(self, dataset, tasks: Sequence[str], seed: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = dataset
        self.tasks = tuple(tasks)
        self.seed = seed
        self.world_size = world_size

    def batch(self, step: int, batch_size: int, rank: int = 0) -> Batch:
        n = len(self.dataset)
        per_step = batch_size * self.world_size
        steps_per_epoch = max(1, n // per_step)
        epoch, within = divmod(step, steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        start = within * per_step + rank * batch_size
        picked = order[np.arange(start, start + batch_size) % n]
        return collate([self.dataset[int(i)] for i in picked], self.tasks)


def collate(items, tasks: Sequence[str]) -> Batch:
    import torch

    images = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])
    labels: Mapping[str, torch.Tensor] = {
        t: torch.as_tensor([int(item_labels[t]) for _, item_labels in items], dtype=torch.long)
        for t in tasks
    }
    return images, dict(labels)
