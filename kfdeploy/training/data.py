"""Data: the embedded procedural sprites (the dSprites factor grid) and user datasets.

Every batch is a pure function of (seed, rank, step). That is what makes `--resume`
exact and data-parallel ranks disjoint without any sampler state to checkpoint.

A batch is `(images, labels)`: images float32 (N, C, H, W) in [0, 1], labels a dict
task name -> int64 tensor (N,).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Mapping, Protocol, Sequence, Tuple

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


def sprite_geometry(factors: np.ndarray, size: int) -> Dict[str, np.ndarray]:
    """Per-sprite numbers of the rendering, for an (N, 5) int array of factor indices at size x size.

    `half`: the window's half-width (the window is 2 * half + 1 pixels square, _WINDOW at
    64x64); per sprite: `shape`, the row and column of its window's top-left pixel
    (`origin_y`, `origin_x`, int64; some lie outside the image near its edges), its centre
    in pixels (`centre_y`, `centre_x`, float64), 1 / radius in pixels (`inv_radius`,
    float32) and the rotation (`cos`, `sin`, float32). The geometry is the 64x64 one scaled
    by size / 64. Both renderers start from these numbers (numpy here, torch on the
    training device in kfdeploy.training.feed), so they can only differ in the per-pixel arithmetic.
    """
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(TASK_NAMES))
    k = size / IMAGE_SIZE
    half = math.ceil(_WINDOW * k)  # window half-width; _WINDOW itself at 64x64
    shape, scale, orient, px, py = (factors[:, i] for i in range(5))
    centre_x = k * (_CENTRE_LO + POSITIONS[px] * (_CENTRE_HI - _CENTRE_LO))
    centre_y = k * (_CENTRE_LO + POSITIONS[py] * (_CENTRE_HI - _CENTRE_LO))
    angle = ORIENTATIONS[orient]
    return {
        "half": half, "shape": shape,
        "origin_x": np.floor(centre_x).astype(np.int64) - half, "origin_y": np.floor(centre_y).astype(np.int64) - half,
        "centre_x": centre_x, "centre_y": centre_y,
        "inv_radius": (1.0 / (k * _RADIUS_PX * SCALES[scale])).astype(np.float32),
        "cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32),
    }


def _sprite_windows(factors: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sprite membership in a window around each sprite, for an (N, 5) int array of factor indices.

    Returns (window bool (N, w, w), row and column of each window's top-left pixel (N,)),
    some of which lie outside the image near its edges. Computing the window alone keeps
    rendering at tens of thousands of images per second on one core.
    """
    g = sprite_geometry(factors, size)
    origin_x, origin_y, shape = g["origin_x"], g["origin_y"], g["shape"]
    offsets = np.arange(2 * g["half"] + 1)
    # Pixel centres relative to the sprite centre, in units of the sprite radius.
    inv_radius = g["inv_radius"][:, None]
    dx = ((origin_x[:, None] + offsets + 0.5 - g["centre_x"][:, None]) * inv_radius)[:, None, :]
    dy = ((origin_y[:, None] + offsets + 0.5 - g["centre_y"][:, None]) * inv_radius)[:, :, None]
    cos, sin = g["cos"][:, None, None], g["sin"][:, None, None]
    # Rotate image coordinates into the shape's frame; image y grows downwards.
    u = cos * dx - sin * dy
    v = -sin * dx - cos * dy
    window = np.empty(u.shape, dtype=bool)
    for kind in range(len(SHAPES)):
        mine = shape == kind
        window[mine] = _inside(kind, u[mine], v[mine])
    return window, origin_y, origin_x


def _sprite_pixels(factors: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image index, row, column) of every pixel inside a sprite, for images of size x size."""
    window, origin_y, origin_x = _sprite_windows(factors, size)
    image, r, c = np.nonzero(window)
    rows, cols = origin_y[image] + r, origin_x[image] + c
    keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    return image[keep], rows[keep], cols[keep]


def render(factors: np.ndarray) -> np.ndarray:
    """Render sprites for an (N, 5) int array of factor indices -> uint8 (N, 1, 64, 64), 0 or 255."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(TASK_NAMES))
    images = np.zeros((len(factors), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    image, rows, cols = _sprite_pixels(factors, IMAGE_SIZE)
    images[image, 0, rows, cols] = 255
    return images


def heldout_combinations(seed: int = 0) -> np.ndarray:
    """All held-out combination indices, in a fixed order shuffled by `seed`."""
    everything = np.arange(NUM_COMBINATIONS, dtype=np.int64)
    held = everything[is_heldout(everything)]
    return np.random.default_rng(seed).permutation(held)


# --- new tasks: functions of the factors that factorization never trains -------------------
# `kfdeploy add-task` and `kfdeploy transferability` teach a shipped trunk one of these, so
# the plug-and-play story runs with no download. They range from what the trunk's feature
# already holds (quadrant: coarse position) to what it has no reason to (x_parity: the
# position's last bit), so how well each transfers is not a foregone conclusion.

_GRID_CENTRE = (len(POSITIONS) - 1) / 2
_CENTRE_DISTANCES = np.hypot(*np.meshgrid(np.arange(len(POSITIONS)) - _GRID_CENTRE, np.arange(len(POSITIONS)) - _GRID_CENTRE))
_RING_EDGES = np.quantile(_CENTRE_DISTANCES, [0.25, 0.5, 0.75])  # four rings, each a quarter of the positions


def _column(name: str) -> Callable[[np.ndarray], np.ndarray]:
    return lambda factors: factors[:, TASK_NAMES.index(name)]


NEW_TASKS: Dict[str, Tuple[list, Callable[[np.ndarray], np.ndarray]]] = {
    # image y grows downwards: pos_y index 0 is the top row
    "quadrant": (["top-left", "top-right", "bottom-left", "bottom-right"],
                 lambda f: (_column("pos_y")(f) >= 16) * 2 + (_column("pos_x")(f) >= 16)),
    "ring": (["inner", "middle", "outer", "corner"],
             lambda f: np.searchsorted(_RING_EDGES, np.hypot(_column("pos_x")(f) - _GRID_CENTRE, _column("pos_y")(f) - _GRID_CENTRE))),
    "diagonal": (["on or above", "below"], lambda f: _column("pos_y")(f) > _column("pos_x")(f)),
    "orientation_quarter": (["0-81°", "90-171°", "180-261°", "270-351°"], lambda f: _column("orientation")(f) // 10),
    "x_parity": (["even", "odd"], lambda f: _column("pos_x")(f) % 2),
}
NEW_TASK_LABELS: Dict[str, list] = {task: labels for task, (labels, _) in NEW_TASKS.items()}
NEW_TASK_STEPS = 1000  # add-task's default training: ~2 minutes on 2 CPU cores at sprites scale


def sprite_labels(factors: np.ndarray, task: str) -> np.ndarray:
    """int64 class indices of `task` (a factor, colour, or one of NEW_TASKS) for an (N, 5 or 6) factor array."""
    if task in NEW_TASKS:
        return NEW_TASKS[task][1](factors).astype(np.int64)
    return factors[:, RGB_TASK_NAMES.index(task)].astype(np.int64)  # the grey factors are its first five


def _unknown_tasks(tasks: Sequence[str], factor_tasks: Mapping[str, int], data: str) -> None:
    unknown = [t for t in tasks if t not in factor_tasks and t not in NEW_TASKS]
    if unknown:
        raise ValueError(f"unknown {data} task(s) {unknown}; known: {list(factor_tasks)}, and new tasks {list(NEW_TASKS)}")


def _to_batch(factors: np.ndarray, tasks: Sequence[str]) -> Batch:
    import torch

    images = torch.from_numpy(render(factors)).float().div_(255.0)
    labels = {t: torch.from_numpy(sprite_labels(factors, t)) for t in tasks}
    return images, labels


class SpritesSource:
    """The embedded default: an unlimited, reproducible stream of training sprites.

    Combinations in the held-out split are rejected, so no training image is ever one
    that evaluation uses.
    """

    def __init__(self, seed: int = 0, tasks: Sequence[str] = TASK_NAMES):
        _unknown_tasks(tasks, TASK_CLASSES, "sprites")
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

    renders_on_device = True  # kfdeploy.training.feed: --feed device

    def device_batch(self, step: int, batch_size: int, rank: int = 0, device="cpu") -> Batch:
        """batch(step) rendered with torch on `device` (kfdeploy.training.feed): the same draws, the same pixels."""
        from .feed import sprites_batch

        return sprites_batch(self.train_factors(step, batch_size, rank), self.tasks, device)

    def heldout(self, count: int, offset: int = 0) -> Batch:
        combos = heldout_combinations()[offset : offset + count]
        return _to_batch(combination_to_factors(combos), self.tasks)


# --- colour sprites: the same factor grid in colour, on textured backgrounds --------------

RGB_IMAGE_SIZE = 128
# Six hues 60 degrees apart, fully saturated: the colour task. Backgrounds are grey-ish
# (little saturation), so a sprite's colour is never the background's.
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
_COLOUR_RGB = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=np.float32)
RGB_TASK_CLASSES: Dict[str, int] = {**TASK_CLASSES, "colour": len(COLOURS)}
RGB_TASK_NAMES: Tuple[str, ...] = tuple(RGB_TASK_CLASSES)
RGB_TASK_LABELS: Dict[str, list] = {**TASK_LABELS, "colour": list(COLOURS)}
NUM_RGB_COMBINATIONS = NUM_COMBINATIONS * len(COLOURS)
# Backgrounds are crops of a fixed bank of textures (part of the data set's definition, the
# same for every seed), brightened and tinted per image: copying a crop is far cheaper than
# drawing 49k random numbers per image, and 32 tiles x 65 x 65 crops x 61 brightnesses x
# 13^3 tints is variety enough for a nuisance that carries no label.
_BANK_TILES = 32
_BANK_MARGIN = 64
_BANK_MAX = 110  # bank values 0..110, + brightness 0..60 + tint 0..24 stays below 255: no clipping
_BANK_SEED = 0x5EED
_HELDOUT_CHUNK = 256  # held-out nuisances are drawn per chunk, so image i is the same whatever the offset


def rgb_factors_to_combination(factors: np.ndarray) -> np.ndarray:
    return np.ravel_multi_index(tuple(np.asarray(factors).T), tuple(RGB_TASK_CLASSES.values()))


def rgb_combination_to_factors(combination: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(combination, tuple(RGB_TASK_CLASSES.values())), axis=1)


@functools.lru_cache(maxsize=2)
def _texture_bank(size: int) -> np.ndarray:
    """uint8 (tiles, 3, size + margin, size + margin): colour blotches at two scales plus pixel noise."""
    rng = np.random.default_rng(_BANK_SEED)
    side = size + _BANK_MARGIN
    bank = np.full((_BANK_TILES, 3, side, side), 45.0, dtype=np.float32)
    for cells, amplitude in ((6, 45.0), (24, 25.0)):
        coarse = rng.uniform(-amplitude, amplitude, size=(_BANK_TILES, 3, cells, cells)).astype(np.float32)
        # Bilinear upsampling as two small matrix products (rows, then columns).
        grid = np.linspace(0.0, cells - 1.0, side, dtype=np.float32)
        low = np.minimum(grid.astype(np.int64), cells - 2)
        up = np.zeros((side, cells), dtype=np.float32)
        up[np.arange(side), low] = 1.0 - (grid - low)
        up[np.arange(side), low + 1] = grid - low
        bank += up @ coarse @ up.T
    bank += rng.normal(0.0, 12.0, size=bank.shape).astype(np.float32)  # sensor-like pixel noise
    return np.clip(bank, 0, _BANK_MAX).astype(np.uint8)


def draw_nuisances(rng: np.random.Generator, n: int) -> Dict[str, np.ndarray]:
    """Everything about an image that is not a label: background crop and tint, sprite brightness."""
    return {
        "tile": rng.integers(0, _BANK_TILES, n),
        "dy": rng.integers(0, _BANK_MARGIN + 1, n), "dx": rng.integers(0, _BANK_MARGIN + 1, n),
        "grey": rng.integers(0, 61, n),  # background brightness
        "tint": rng.integers(0, 25, (n, 3)),  # a faint colour cast, far below a sprite's saturation
        "value": rng.uniform(0.7, 1.0, n).astype(np.float32),  # sprite brightness
    }


def render_rgb(factors: np.ndarray, nuisances: Dict[str, np.ndarray], size: int = RGB_IMAGE_SIZE) -> np.ndarray:
    """Colour sprites for an (N, 6) int array (the 5 sprite factors, then colour) -> uint8 (N, 3, size, size)."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(RGB_TASK_NAMES))
    n = len(factors)
    bank = _texture_bank(size)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    tile, dy, dx = nuisances["tile"], nuisances["dy"], nuisances["dx"]
    for i in range(n):
        images[i] = bank[tile[i], :, dy[i] : dy[i] + size, dx[i] : dx[i] + size]
    images += (nuisances["grey"][:, None] + nuisances["tint"]).astype(np.uint8)[:, :, None, None]
    colour = np.rint(_COLOUR_RGB[factors[:, 5]] * nuisances["value"][:, None] * 255.0).astype(np.uint8)  # (N, 3)
    image, rows, cols = _sprite_pixels(factors[:, :5], size)
    images[image, :, rows, cols] = colour[image]
    return images


@functools.lru_cache(maxsize=1)
def rgb_heldout_combinations() -> np.ndarray:
    """All held-out colour-sprite combinations (the sprites' hash over the 6 factors), in a fixed shuffled order."""
    everything = np.arange(NUM_RGB_COMBINATIONS, dtype=np.int64)
    held = everything[is_heldout(everything)]
    return np.random.default_rng(0).permutation(held)


def _rgb_batch(factors: np.ndarray, nuisances: Dict[str, np.ndarray], tasks: Sequence[str]) -> Batch:
    import torch

    images = torch.from_numpy(render_rgb(factors, nuisances)).float().div_(255.0)
    labels = {t: torch.from_numpy(sprite_labels(factors, t)) for t in tasks}
    return images, labels


class SpritesRGBSource:
    """Colour sprites (`--data sprites-rgb`): the sprite factor grid plus a colour task,
    3x128x128 on textured backgrounds; an unlimited stream, every batch a function of
    (seed, rank, step), with the sprites' kind of held-out split (5% of the combinations of
    all six factors, never in the training stream)."""

    def __init__(self, seed: int = 0, tasks: Sequence[str] = RGB_TASK_NAMES):
        _unknown_tasks(tasks, RGB_TASK_CLASSES, "sprites-rgb")
        self.seed = seed
        self.tasks = tuple(tasks)

    def train_factors(self, step: int, batch_size: int, rank: int = 0) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        # "rgb" in the seed: the colour stream is not the grey stream's draws reused.
        rng = np.random.default_rng([self.seed, rank, step, 0x726762])
        drawn = rng.integers(0, NUM_RGB_COMBINATIONS, size=int(batch_size * 1.25) + 16)
        kept = drawn[~is_heldout(drawn)][:batch_size]
        return rgb_combination_to_factors(kept), draw_nuisances(rng, len(kept))

    def batch(self, step: int, batch_size: int, rank: int = 0) -> Batch:
        return _rgb_batch(*self.train_factors(step, batch_size, rank), self.tasks)

    renders_on_device = True  # kfdeploy.training.feed: --feed device

    def device_batch(self, step: int, batch_size: int, rank: int = 0, device="cpu") -> Batch:
        """batch(step) rendered with torch on `device` (kfdeploy.training.feed): the same draws, the same pixels."""
        from .feed import sprites_rgb_batch

        return sprites_rgb_batch(*self.train_factors(step, batch_size, rank), self.tasks, device)

    def heldout_factors(self, count: int, offset: int = 0) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        combos = rgb_heldout_combinations()[offset : offset + count]
        first, last = offset // _HELDOUT_CHUNK, (offset + len(combos) - 1) // _HELDOUT_CHUNK
        chunks = [draw_nuisances(np.random.default_rng([_BANK_SEED, c]), _HELDOUT_CHUNK)
                  for c in range(first, last + 1)]
        start = offset - first * _HELDOUT_CHUNK
        nuisances = {k: np.concatenate([c[k] for c in chunks])[start : start + len(combos)] for k in chunks[0]}
        return rgb_combination_to_factors(combos), nuisances

    def heldout(self, count: int, offset: int = 0) -> Batch:
        return _rgb_batch(*self.heldout_factors(count, offset), self.tasks)


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
        picked = epoch_slice(len(self.dataset), step, batch_size, self.seed, self.world_size, rank)
        return collate([self.dataset[int(i)] for i in picked], self.tasks)


def epoch_slice(n: int, step: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0) -> np.ndarray:
    """Which of `n` items a step's batch holds: each epoch is a seeded permutation, split
    across ranks, and a step maps to a fixed slice of it, so a batch is a function of
    (seed, rank, step) and resuming needs nothing but the step number."""
    per_step = batch_size * world_size
    epoch, within = divmod(step, max(1, n // per_step))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    start = within * per_step + rank * batch_size
    return order[np.arange(start, start + batch_size) % n]


def collate(items, tasks: Sequence[str]) -> Batch:
    import torch

    images = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])
    labels: Mapping[str, torch.Tensor] = {
        t: torch.as_tensor([int(item_labels[t]) for _, item_labels in items], dtype=torch.long)
        for t in tasks
    }
    return images, dict(labels)
