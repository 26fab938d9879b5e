"""kfdeploy.images: one decoder, one set of rules, for `kfdeploy run` and the demo alike."""
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import cli_fails
from kfdeploy.cli import main
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


UPRIGHT = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7  # not square, no symmetry: any turn or flip shows
# EXIF orientation -> how a camera stored the upright picture under that tag
STORED = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.T, 6: lambda a: np.rot90(a, 1),
          7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, -1)}


def _with_orientation(path, upright: np.ndarray, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_exif_orientation_is_applied_as_a_viewer_shows_the_picture(tmp_path, orientation):
    np.testing.assert_array_equal(read_image(_with_orientation(tmp_path / "photo.png", UPRIGHT, orientation)), UPRIGHT)


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(tmp_path):
    # Pillow's own conversion to 8-bit grey clips: 1000 of 65535 (a dark grey) became white
    wide = UPRIGHT.astype(np.uint16) * 256 + 255  # the low byte is precision 8 bits cannot keep
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    np.testing.assert_array_equal(read_image(tmp_path / "wide.png"), UPRIGHT)


def test_run_answers_a_turned_photo_and_a_16_bit_one_as_the_upright_8_bit_one(bundle, tmp_path, capsys):
    upright = read_image(bundle / "examples" / "0.png")
    Image.fromarray(upright).save(tmp_path / "upright.png")
    _with_orientation(tmp_path / "turned.png", upright, 6)
    Image.fromarray(upright.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    files = [str(tmp_path / name) for name in ("upright.png", "turned.png", "wide.png")]
    assert main(["run", str(bundle), *files, "--json", "--top", "2"]) == 0
    answers = [{task: scores for task, scores in answer.items() if task != "input"} for answer in json.loads(capsys.readouterr().out)]
    assert answers[1] == answers[0] and answers[2] == answers[0]
