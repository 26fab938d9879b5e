"""Reading image files: one decoder with one set of rules for the command line and the demo.

- Images above MAX_PIXELS are refused before their pixels are decoded, and so is what
  Pillow itself calls a decompression bomb: a small file must not expand into gigabytes.
- A file Pillow cannot read (not an image, truncated, missing) is a KfError naming it.
- Grey images stay one channel; anything else becomes RGB, so callers see two layouts only.

Needs Pillow and numpy, never torch: `kfdeploy run` reads PNGs on an edge device.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from .errors import KfError
from .extras import require

MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # 16.8 megapixels: far above what a 64x64 model needs
_GREY_MODES = ("1", "L", "I", "I;16", "F")


def _pillow():
    # Only image files need Pillow: an edge device may feed .npy batches and go without it.
    return require("PIL.Image", None)


@contextlib.contextmanager
def _opened(path, name: str | None = None):
    """The image at `path` (or in a file object, `name` naming it), its header read and its
    size checked; its pixels not yet decoded."""
    Image = _pillow()
    name = name or path.name
    too_big = f"{name} is too large to read: send an image of at most {MAX_SIDE}x{MAX_SIDE} pixels"
    try:
        with Image.open(path) as image:  # reads the header only; the pixels are decoded by the caller
            if image.width * image.height > MAX_PIXELS:
                raise KfError(f"{too_big} (it is {image.width}x{image.height})")
            yield image
    except Image.DecompressionBombError:  # Pillow's own cap, for headers it refuses to believe
        raise KfError(too_big) from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise KfError(f"{name} is not an image that can be read (PNG, JPEG, ...): {exc}") from None


def read_image(path: Path | str) -> np.ndarray:
    """Decode an image file into uint8: (H, W) for grey images, (H, W, 3) RGB for the rest."""
    with _opened(Path(path)) as image:
        return np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """As read_image, for bytes the caller has read (and checked); `name` names them in messages."""
    with _opened(io.BytesIO(data), Path(name).name) as image:
        return np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"))


def is_colour(path: Path | str) -> bool:
    """Whether an image file holds colour (any mode but a grey one), from its header alone."""
    with _opened(Path(path)) as image:
        return image.mode not in _GREY_MODES


def to_grey(array: np.ndarray) -> np.ndarray:
    """An (H, W, 3) RGB array as (H, W) luminance, the way Pillow converts (ITU-R 601-2)."""
    Image = _pillow()
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("L"))
