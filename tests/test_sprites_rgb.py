"""Colour sprites (`--data sprites-rgb`): the sprite grid plus a colour task, 3x128x128 on
textured backgrounds, every batch a function of (seed, rank, step); and the grey sprites
unchanged by the renderer they now share."""
import hashlib
import json

import numpy as np
import torch

from conftest import cli_fails
from kfdeploy.training import data
from kfdeploy.cli import main


def test_grey_sprites_render_exactly_as_before_the_renderer_was_shared():
    # sha256 of the first 512 held-out sprites rendered by the 64x64-only renderer: the
    # quickstart's data must not move by a pixel.
    images = data.render(data.combination_to_factors(data.heldout_combinations()[:512]))
    assert hashlib.sha256(images.tobytes()).hexdigest() == "09c098a9493b20e907e0e44dec6aae5338518411c5b34239da161d4cc3bf35ee"


def test_batches_are_3x128x128_in_0_1_with_six_tasks():
    images, labels = data.SpritesRGBSource().batch(0, 32)
    assert images.shape == (32, 3, 128, 128) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert list(labels) == list(data.RGB_TASK_NAMES) == [*data.TASK_NAMES, "colour"]
    for task, classes in data.RGB_TASK_CLASSES.items():
        assert labels[task].min() >= 0 and labels[task].max() < classes
    assert data.RGB_TASK_LABELS["colour"] == list(data.COLOURS) and len(data.COLOURS) == 6


def test_same_seed_step_and_rank_give_the_same_batch_and_others_do_not():
    source = data.SpritesRGBSource(seed=3)
    a, la = source.batch(step=5, batch_size=16)
    b, lb = source.batch(step=5, batch_size=16)
    assert torch.equal(a, b) and all(torch.equal(la[t], lb[t]) for t in la)
    for other in (source.batch(6, 16)[0], source.batch(5, 16, rank=1)[0], data.SpritesRGBSource(seed=4).batch(5, 16)[0]):
        assert not torch.equal(a, other)


def test_training_stream_never_yields_a_heldout_combination():
    source = data.SpritesRGBSource(seed=0)
    heldout = set(data.rgb_heldout_combinations().tolist())
    assert 0.04 < len(heldout) / data.NUM_RGB_COMBINATIONS < 0.06
    for step in range(10):
        factors, _ = source.train_factors(step, 512)
        assert not heldout.intersection(data.rgb_factors_to_combination(factors).tolist())


def test_heldout_images_are_the_same_whatever_the_offset():
    source = data.SpritesRGBSource(tasks=["colour"])
    whole, labels = source.heldout(300)
    part, part_labels = source.heldout(20, offset=250)  # crosses a chunk of drawn nuisances
    assert torch.equal(whole[250:270], part) and torch.equal(labels["colour"][250:270], part_labels["colour"])


def test_every_sprite_pixel_has_its_colour_label_and_no_background_pixel_is_that_saturated():
    source = data.SpritesRGBSource(seed=1)
    factors, nuisances = source.train_factors(0, 64)
    images = data.render_rgb(factors, nuisances).astype(np.int32)
    index, rows, cols = data._sprite_pixels(factors[:, :5], data.RGB_IMAGE_SIZE)
    for i in range(len(factors)):
        pixels = images[i][:, rows[index == i], cols[index == i]].T  # (P, 3)
        assert len(pixels) > 20
        lit = data._COLOUR_RGB[factors[i, 5]] > 0
        # The colour's channels share one brightness (>= 0.7), the others are off.
        assert (pixels[:, ~lit] == 0).all() and (pixels[:, lit] >= 0.7 * 255 - 1).all()
        assert (pixels[:, lit] == pixels[:1, lit]).all()
        background = np.ones(images.shape[2:], dtype=bool)
        background[rows[index == i], cols[index == i]] = False
        rest = images[i][:, background]
        # No background pixel has a sprite's saturation: a sprite's channels differ by >= 178
        # (0.7 x 255 against 0), a background's by at most 110 (texture) + 24 (tint).
        assert (rest.max(0) - rest.min(0)).max() <= 134 and rest.max() <= 110 + 60 + 24


def test_a_teacher_trains_on_sprites_rgb_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["teacher", "--data", "sprites-rgb", "--out", str(out), "--image-size", "32", "--steps", "3",
                 "--batch-size", "8", "--eval-images", "64", "--tasks", "shape,colour"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["data"] == "sprites-rgb"
    assert info["input"] == {"channels": 3, "image_size": 32, "mean": [0.0] * 3, "std": [1.0] * 3}
    assert info["task_labels"]["colour"] == list(data.COLOURS)
    assert info["model"]["backbone"]["in_channels"] == 3


def test_sprites_refuse_a_channel_count_of_their_own(tmp_path, capsys):
    cli_fails(["teacher", "--data", "sprites-rgb", "--channels", "1", "--out", str(tmp_path / "t")], capsys,
              "--channels applies to image folders; sprites-rgb images have 3 channel(s)")
    assert not (tmp_path / "t").exists()
