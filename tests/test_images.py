"""kfdeploy.images: one decoder, one set of rules, for `kfdeploy run` and the demo alike."""
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import cli_fails
from kfdeploy.errors import KfError
from kfdeploy.images import MAX_PIXELS, read_image


def png_header_only(path, width: int, height: int):
    """A valid PNG header claiming width x height grey pixels, with almost no data: what a
    decompression bomb looks like to a reader that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_grey_images_stay_one_channel_and_colour_becomes_rgb(tmp_path):
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(tmp_path / "rgba.png")
    grey, rgba = read_image(tmp_path / "grey.png"), read_image(tmp_path / "rgba.png")
    assert grey.shape == (5, 7) and grey.dtype == np.uint8 and grey[0, 0] == 9
    assert rgba.shape == (5, 7, 3) and rgba.dtype == np.uint8


def test_an_image_above_the_pixel_cap_is_refused_before_its_pixels_are_decoded(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 1  # the file is tiny; decoding it would take 16+ MB
    with pytest.raises(KfError, match=f"too large.*it is {side}x{side}"):
        read_image(png_header_only(tmp_path / "big.png", side, side))


def test_a_decompression_bomb_is_a_kferror_not_pillows_exception(tmp_path):
    # 30000x30000 is past Pillow's own limit: Image.open raises DecompressionBombError,
    # which is not an OSError, so a reader catching OSError only let it through.
    with pytest.raises(KfError, match="bomb.png is too large to read"):
        read_image(png_header_only(tmp_path / "bomb.png", 30000, 30000))


@pytest.mark.parametrize("make", [
    lambda p: p.write_text("not a picture"),
    lambda p: p.write_bytes(png_header_only(p, 64, 64).read_bytes()[:40]),  # truncated
    lambda p: None,  # missing
], ids=["text", "truncated", "missing"])
def test_an_unreadable_file_is_a_kferror_naming_it(tmp_path, make):
    path = tmp_path / "in.png"
    make(path)
    with pytest.raises(KfError, match="in.png is not an image that can be read"):
        read_image(path)


def test_run_refuses_a_bomb_with_one_line_before_loading_the_bundle(tmp_path, capsys):
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    cli_fails(["run", str(tmp_path / "no-bundle"), str(bomb)], capsys, "bomb.png is too large to read")


def test_images_module_does_not_import_torch():
    code = "import sys, kfdeploy.images; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
