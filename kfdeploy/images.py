"""Reading image files: one decoder with one set of rules for the command line and the demo.

- Images above MAX_PIXELS are refused before their pixels are decoded, and so is what
  Pillow itself calls a decompression bomb: a small file must not expand into gigabytes.
- A file Pillow cannot read (not an image, truncated, missing) is a KfError naming it.
- Grey images stay one channel; anything else becomes RGB, so callers see two layouts only.
- Pixels come out as an image viewer shows them: turned as the EXIF orientation says (a
  phone stores a portrait photo sideways, with a tag saying so), and 16-bit grey scaled to
  8 bits by its high byte, as Pillow reads 16-bit colour (its own conversion to 8-bit grey
  clips: everything above 255 of 65535 would turn white).
- `fit_image` brings a decoded image to a bundle's channel count and size, one way for
  every consumer: channels first (Pillow's grey <-> RGB conversion), then a bilinear
  resize (antialiased when shrinking, as the training data is resized).

Needs Pillow and numpy, never torch: `kfdeploy run` reads PNGs on an edge device.
"""
from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path
from typing import List, Tuple

import numpy as np

from .errors import KfError
from .extras import require

MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # 16.8 megapixels: far above what a 64x64 model needs
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit files; "I" also holds 32-bit ones
_GREY_MODES = ("1", "L", "F", *_WIDE_GREY_MODES)


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


def _as_shown(image) -> np.ndarray:
    """An opened image's pixels as a viewer shows them, uint8: (H, W) grey or (H, W, 3) RGB."""
    ImageOps = require("PIL.ImageOps", None)
    image.load()  # a damaged file fails here, as one that cannot be read
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError, struct.error):  # EXIF a viewer cannot read either: shown as stored
        pass
    if image.mode in _WIDE_GREY_MODES:
        return (np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    return np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"))


def read_image(path: Path | str) -> np.ndarray:
    """Decode an image file into uint8: (H, W) for grey images, (H, W, 3) RGB for the rest."""
    with _opened(Path(path)) as image:
        return _as_shown(image)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """As read_image, for bytes the caller has read (and checked); `name` names them in messages."""
    with _opened(io.BytesIO(data), Path(name).name) as image:
        return _as_shown(image)


def is_colour(path: Path | str) -> bool:
    """Whether an image file holds colour (any mode but a grey one), from its header alone."""
    with _opened(Path(path)) as image:
        return image.mode not in _GREY_MODES


def to_grey(array: np.ndarray) -> np.ndarray:
    """An (H, W, 3) RGB array as (H, W) luminance, the way Pillow converts (ITU-R 601-2)."""
    Image = _pillow()
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("L"))


def fit_image(array: np.ndarray, channels: int, size: Tuple[int, int]) -> Tuple[np.ndarray, List[str]]:
    """A decoded uint8 image ((H, W) grey or (H, W, 3) RGB) as the (channels, height, width)
    uint8 array a bundle takes, and what was changed, in words ("resized from 100x80 to 64x64").

    Channels first: RGB to grey as Pillow converts (ITU-R 601-2 luminance), grey to RGB by
    repeating it. Then a bilinear resize with Pillow, which averages over the source pixels
    when it shrinks (an antialiased resize, like the one training data goes through).
    """
    Image = _pillow()
    if channels not in (1, 3):
        raise KfError(f"the bundle takes {channels}-channel images; image files give 1 (grey) or 3 (RGB): "
                      "feed it a numpy batch instead")
    array = np.asarray(array, dtype=np.uint8)
    notes = []
    image = Image.fromarray(array)
    if channels == 1 and array.ndim == 3:
        image, notes = image.convert("L"), ["colour image converted to grey"]
    elif channels == 3 and array.ndim == 2:
        image, notes = image.convert("RGB"), ["grey image converted to RGB"]
    height, width = size
    if (image.height, image.width) != (height, width):
        notes.append(f"resized from {image.width}x{image.height} to {width}x{height}")
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    fitted = np.asarray(image)
    return (fitted[None] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)).copy(), notes
