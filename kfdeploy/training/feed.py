"""How each step's batch reaches the training device, without the step waiting for the host.

Feeds (`kfdeploy teacher/factorize --feed ...`):

- `inline`: the batch is made on the host inside the step, then copied. What a CPU run
  does: its cores are the ones that would render, so there is nothing to overlap.
- `prefetch`: a background thread makes the next batches (`source.batch` of the coming
  steps, in order), pins them and copies them to the device on a CUDA stream of its own;
  the step takes a batch that is already there. For data that lives on the host (image
  folders), or any data on a CPU run that wants the thread.
- `device`: sprites (grey or colour) are rendered with torch ops on the training device.
  Only the random draws stay on the host (numpy, the same generator as ever, a few numbers
  per image); one pinned copy of those goes to the device, and the pixels are made there.
- `auto` (the default): `device` for sprites on CUDA, `prefetch` for other data on CUDA,
  `inline` on a CPU.

Every feed gives each step the batch `source.batch(step)` gives: a batch stays a pure
function of (seed, rank, step), so `--resume` and data-parallel ranks work as before.
The torch renderer is checked against data.py's numpy renderer pixel for pixel on the CPU
(tests/test_feed.py). On CUDA it runs the same float64 operations one kernel each; that it
is bit-equal there too is expected, not yet verified on a GPU.
"""
from __future__ import annotations

import queue
import threading
from typing import Dict, Sequence

import numpy as np
import torch

from ..errors import KfError
from .data import (
    _COLOUR_RGB, RGB_IMAGE_SIZE, RGB_TASK_NAMES, IMAGE_SIZE, Batch, _texture_bank,
    sprite_geometry, sprite_labels,
)

FEEDS = ("auto", "inline", "prefetch", "device")
PREFETCH_DEPTH = 3  # batches made ahead: enough to ride out one slow batch, little memory


# --- sprites rendered with torch ---------------------------------------------------------------

# Per-sprite numbers travel to the device as one float64 row each (every value here is an
# integer below 2^53 or a float32/float64, so float64 holds it exactly).
_GEOMETRY = ("shape", "origin_y", "origin_x", "centre_y", "centre_x", "inv_radius", "cos", "sin")


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        # Pinned, so the copy is asynchronous and the host goes on to the next step.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _inside(u: torch.Tensor, v: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """data._inside for every shape at once, the same float64 operations in the same order."""
    square = torch.maximum(u.abs(), v.abs()) <= 0.78
    ev = v / 0.5
    ellipse = u * u + ev * ev <= 1.0
    hx, hy = u * 1.15, v * 1.15 + 0.12
    hx2 = hx * hx
    # numpy's `** 3` calls pow(x, 3) and torch computes x * x * x: they can differ in the
    # last bit, which could flip a pixel only if it lay within ~1e-16 of the heart's outline.
    # No pixel of the sprite grid does (all 737,280 combinations compared at 64 and 128).
    a = hx2 + hy * hy - 1.0
    heart = a * a * a - hx2 * hy * hy * hy <= 0.0
    return torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))


def sprite_masks(factors: np.ndarray, size: int, device: torch.device | str) -> torch.Tensor:
    """Sprite membership, bool (N, size, size) on `device`: data._sprite_pixels as an image, made with torch.

    The window around each sprite is computed (as numpy does), then placed by a gather, so
    nothing waits on the device (no nonzero, no boolean indexing).
    """
    device = torch.device(device)
    g = sprite_geometry(factors, size)
    half = g["half"]
    width = 2 * half + 1
    rows = _to_device(np.stack([np.asarray(g[k], dtype=np.float64) for k in _GEOMETRY], axis=1), device)
    shape, origin_y, origin_x = (rows[:, i].long() for i in range(3))
    centre_y, centre_x, inv_radius, cos, sin = (rows[:, i] for i in range(3, 8))
    offsets = torch.arange(width, device=device)
    dx = (((origin_x[:, None] + offsets).double() + 0.5 - centre_x[:, None]) * inv_radius[:, None])[:, None, :]
    dy = (((origin_y[:, None] + offsets).double() + 0.5 - centre_y[:, None]) * inv_radius[:, None])[:, :, None]
    cos, sin = cos[:, None, None], sin[:, None, None]
    u = cos * dx - sin * dy
    v = -sin * dx - cos * dy
    window = _inside(u, v, shape[:, None, None])  # (N, w, w)
    # Pixel (r, c) of the image is window pixel (r - origin_y, c - origin_x) where that exists.
    pixels = torch.arange(size, device=device)
    r = pixels[None, :] - origin_y[:, None]
    c = pixels[None, :] - origin_x[:, None]
    r_ok, c_ok = (r >= 0) & (r < width), (c >= 0) & (c < width)
    n = torch.arange(len(shape), device=device)[:, None, None]
    gathered = window[n, r.clamp(0, width - 1)[:, :, None], c.clamp(0, width - 1)[:, None, :]]
    return gathered & r_ok[:, :, None] & c_ok[:, None, :]


def render(factors: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """data.render with torch on `device`: uint8 (N, 1, 64, 64), 0 or 255."""
    return sprite_masks(factors, IMAGE_SIZE, device)[:, None].to(torch.uint8) * 255


_BANKS: Dict[tuple, torch.Tensor] = {}


def _bank(size: int, device: torch.device) -> torch.Tensor:
    key = (size, str(device))
    if key not in _BANKS:
        _BANKS[key] = torch.from_numpy(_texture_bank(size)).to(device)
    return _BANKS[key]


def render_rgb(factors: np.ndarray, nuisances: Dict[str, np.ndarray], size: int = RGB_IMAGE_SIZE,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """data.render_rgb with torch on `device`: uint8 (N, 3, size, size)."""
    device = torch.device(device)
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(RGB_TASK_NAMES))
    # Per image, on the host exactly as data.render_rgb computes them: the crop, the
    # background's brightness and tint, the sprite's colour.
    colour = np.rint(_COLOUR_RGB[factors[:, 5]] * nuisances["value"][:, None] * 255.0).astype(np.uint8)
    shift = (nuisances["grey"][:, None] + nuisances["tint"]).astype(np.uint8)
    per_image = np.concatenate([nuisances["tile"][:, None], nuisances["dy"][:, None], nuisances["dx"][:, None],
                                shift, colour], axis=1).astype(np.int64)
    values = _to_device(per_image, device)
    tile, dy, dx = values[:, 0], values[:, 1], values[:, 2]
    shift, colour = values[:, 3:6].to(torch.uint8), values[:, 6:9].to(torch.uint8)
    pixels = torch.arange(size, device=device)
    channels = torch.arange(3, device=device)
    background = _bank(size, device)[
        tile[:, None, None, None], channels[None, :, None, None],
        (dy[:, None] + pixels)[:, None, :, None], (dx[:, None] + pixels)[:, None, None, :],
    ]  # (N, 3, size, size): the crop of the texture bank
    background = background + shift[:, :, None, None]  # never wraps: the bank stays below 255 - 84
    mask = sprite_masks(factors[:, :5], size, device)[:, None]
    return torch.where(mask, colour[:, :, None, None], background)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] as the host path does it (`.float().div_(255.0)`), on any device.

    The divisor is a 0-dim tensor on the images' device, not a Python number: CUDA divides
    by a host scalar as a multiplication by its reciprocal, which can differ in the last bit.
    """
    return images.to(torch.float32).div_(torch.full((), 255.0, device=images.device))


def _labels(factors: np.ndarray, tasks: Sequence[str], device: torch.device) -> Dict[str, torch.Tensor]:
    columns = _to_device(np.stack([sprite_labels(factors, t) for t in tasks], axis=1), device)  # one copy for all tasks
    return {t: columns[:, i].contiguous() for i, t in enumerate(tasks)}


def sprites_batch(factors: np.ndarray, tasks: Sequence[str], device: torch.device | str) -> Batch:
    """data._to_batch on `device`."""
    device = torch.device(device)
    return to_unit(render(factors, device)), _labels(factors, tasks, device)


def sprites_rgb_batch(factors: np.ndarray, nuisances: Dict[str, np.ndarray], tasks: Sequence[str], device: torch.device | str) -> Batch:
    """data._rgb_batch on `device`."""
    device = torch.device(device)
    return to_unit(render_rgb(factors, nuisances, device=device)), _labels(factors, tasks, device)


# --- feeds ------------------------------------------------------------------------------------

def _move(batch: Batch, device: torch.device) -> Batch:
    images, labels = batch
    return images.to(device, non_blocking=True), {t: y.to(device, non_blocking=True) for t, y in labels.items()}


class InlineFeed:
    """The batch made on the host when the step asks for it, then copied to the device."""

    name = "inline"

    def __init__(self, source, device: torch.device, batch_size: int, rank: int):
        self.source, self.device, self.batch_size, self.rank = source, device, batch_size, rank

    def batch(self, step: int) -> Batch:
        return _move(self.source.batch(step, self.batch_size, self.rank), self.device)

    def close(self) -> None:
        pass


class DeviceFeed(InlineFeed):
    """Sprites rendered on the training device (the source's `device_batch`)."""

    name = "device"

    def batch(self, step: int) -> Batch:
        return self.source.device_batch(step, self.batch_size, self.rank, self.device)


class PrefetchFeed:
    """A background thread makes the batches of steps start, start + 1, ... ahead of the step.

    On CUDA each batch is pinned and copied on a stream of the thread's own; the step's
    stream waits for that copy (an event, not the host) and the tensors are recorded on it
    so the caching allocator keeps them until the step is done with them.
    """

    name = "prefetch"

    def __init__(self, source, device: torch.device, batch_size: int, rank: int, start: int, stop: int,
                 depth: int = PREFETCH_DEPTH):
        self.source, self.device, self.batch_size, self.rank = source, device, batch_size, rank
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._produce, args=(start, stop), name="kfdeploy-prefetch", daemon=True)
        self.thread.start()

    def _produce(self, start: int, stop: int) -> None:
        try:
            for step in range(start, stop):
                images, labels = self.source.batch(step, self.batch_size, self.rank)
                ready = None
                if self.cuda:
                    images, labels = images.pin_memory(), {t: y.pin_memory() for t, y in labels.items()}
                    with torch.cuda.stream(self.stream):
                        images, labels = _move((images, labels), self.device)
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                if not self._put((step, images, labels, ready)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def batch(self, step: int) -> Batch:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        made_for, images, labels, ready = item
        if made_for != step:
            raise RuntimeError(f"prefetch feed made the batch of step {made_for}, the step asked for {step}")
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in (images, *labels.values()):
                tensor.record_stream(current)
        return images, labels

    def close(self) -> None:
        self.stopping.set()
        while True:  # free the producer if it waits on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


def renders_on_device(source) -> bool:
    return bool(getattr(source, "renders_on_device", False))


def resolve_feed(feed: str, source, device: torch.device) -> str:
    """The feed `auto` stands for here, or `feed` itself once checked against the data."""
    if feed not in FEEDS:
        raise KfError(f"--feed must be one of {', '.join(FEEDS)}, not {feed!r}")
    if feed == "auto":
        if device.type != "cuda":
            return "inline"
        return "device" if renders_on_device(source) else "prefetch"
    if feed == "device" and not renders_on_device(source):
        raise KfError("--feed device renders sprites on the training device; this data comes from the host "
                      "(use --feed prefetch: a background thread loads the next batches)")
    return feed


def open_feed(feed: str, source, device: torch.device, batch_size: int, rank: int, start: int, stop: int):
    """A feed whose batch(step) is source.batch(step, batch_size, rank) on `device`, for steps start..stop - 1."""
    name = resolve_feed(feed, source, device)
    if name == "prefetch":
        return PrefetchFeed(source, device, batch_size, rank, start, stop)
    return (DeviceFeed if name == "device" else InlineFeed)(source, device, batch_size, rank)
