"""Feeds (kfdeploy.training.feed): sprites rendered with torch draw numpy's pixels, and every feed gives
each step the batch the plain host path gives, so training and resume stay bit-exact."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_fails
from kfdeploy.training import data, feed
from kfdeploy.training.losses import TeacherObjective
from kfdeploy.training.models import BackboneConfig, SpritesTeacher, TeacherConfig
from kfdeploy.training.pipeline import NormalizedSource, open_data
from kfdeploy.training.train import Distributed, TrainConfig, train
from test_folder_data import make_folder

# The torch renderer runs on the training device: on a GPU its float64 kernels are checked
# against numpy's pixels too (only where PyTorch sees one; CI has none).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU visible to PyTorch"))]


def _grid_corners():
    """Every shape x scale x orientation at the four corner positions, where windows leave the image."""
    rows = [(s, sc, o, x, y) for s in range(3) for sc in range(6) for o in range(40) for x in (0, 31) for y in (0, 31)]
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_renderer_draws_the_numpy_renderers_pixels(device):
    # Exactly equal: both start from data.sprite_geometry and do the same float64 arithmetic.
    # (All 737,280 combinations were compared once at 64 and 128: no pixel differs.)
    random = data.SpritesSource(seed=5).train_factors(0, 3000)
    for factors in (_grid_corners(), random):
        expected = data.render(factors)
        got = feed.render(factors, device).cpu().numpy()
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), f"{int((got != expected).sum())} pixels differ"


@pytest.mark.parametrize("device", DEVICES)
def test_torch_renderer_draws_the_numpy_renderers_colour_sprites(device):
    source = data.SpritesRGBSource(seed=2)
    factors, nuisances = source.train_factors(4, 300)
    factors[:24, :5] = _grid_corners()[::40][:24]  # some sprites cut by the image's edges
    expected = data.render_rgb(factors, nuisances)
    got = feed.render_rgb(factors, nuisances, device=device).cpu().numpy()
    assert np.array_equal(got, expected), f"{int((got != expected).sum())} values differ"


@pytest.mark.parametrize("kind, size, norm", [
    ("sprites", 64, None), ("sprites", 48, None), ("sprites-rgb", 128, None), ("sprites-rgb", 32, ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])),
])
@pytest.mark.parametrize("device", DEVICES)
def test_device_batches_equal_host_batches_resized_and_normalized(kind, size, norm, device):
    source = open_data(kind, image_size=size, seed=3).source
    if norm:
        source = NormalizedSource(source, *norm)
    assert feed.renders_on_device(source)
    for step, rank in ((0, 0), (11, 1)):
        images, labels = source.batch(step, 40, rank)
        got_images, got_labels = source.device_batch(step, 40, rank, device)
        assert got_images.device.type == device
        got_images, got_labels = got_images.cpu(), {t: v.cpu() for t, v in got_labels.items()}
        assert got_images.dtype == images.dtype
        if device == "cpu" or (size == {"sprites": 64, "sprites-rgb": 128}[kind] and norm is None):
            assert torch.equal(got_images, images)
        else:  # the pixels are drawn exactly; a GPU's resize and normalize kernels round differently
            torch.testing.assert_close(got_images, images, rtol=0, atol=1e-5)
        assert list(got_labels) == list(labels) and all(torch.equal(got_labels[t], labels[t]) for t in labels)


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_feed_gives_the_plain_batches_in_order_from_any_start(device):
    source = data.SpritesSource(seed=1, tasks=["shape", "pos_x"])
    for start in (0, 7):  # 7: a resumed run starts mid-stream
        prefetch = feed.PrefetchFeed(source, torch.device(device), 16, rank=1, start=start, stop=start + 6)
        try:
            for step in range(start, start + 6):
                images, labels = prefetch.batch(step)
                assert images.device.type == device
                expected_images, expected_labels = source.batch(step, 16, 1)
                assert torch.equal(images.cpu(), expected_images)
                assert all(torch.equal(labels[t].cpu(), expected_labels[t]) for t in expected_labels)
        finally:
            prefetch.close()
        assert not prefetch.thread.is_alive()


class _Failing:
    def __init__(self, source, at):
        self.source, self.at = source, at

    def batch(self, step, batch_size, rank=0):
        if step == self.at:
            raise ValueError(f"cannot read the images of step {step}")
        return self.source.batch(step, batch_size, rank)


def test_prefetch_feed_raises_the_producers_error_at_its_step_and_stops_when_closed_early():
    prefetch = feed.PrefetchFeed(_Failing(data.SpritesSource(), at=2), torch.device("cpu"), 8, 0, start=0, stop=10)
    prefetch.batch(0)
    prefetch.batch(1)
    with pytest.raises(ValueError, match="step 2"):
        prefetch.batch(2)
    prefetch.close()
    early = feed.PrefetchFeed(data.SpritesSource(), torch.device("cpu"), 8, 0, start=0, stop=10_000)
    early.batch(0)
    early.close()  # a run that stops early (time budget, Ctrl-C) leaves no thread making batches
    assert not early.thread.is_alive()


def test_auto_feed_is_inline_on_a_cpu_and_renders_sprites_on_a_gpu():
    sprites, folder_like = data.SpritesSource(), data.DatasetSource([(torch.zeros(1, 8, 8), {"a": 0})], ["a"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # only the device's type is read
    assert feed.resolve_feed("auto", sprites, cpu) == "inline"
    assert feed.resolve_feed("auto", sprites, cuda) == "device"
    assert feed.resolve_feed("auto", folder_like, cuda) == "prefetch"
    assert feed.resolve_feed("device", sprites, cpu) == "device"


class _InterruptAt:
    """A source that presses Ctrl-C when the trainer (or its prefetch thread) reaches a step."""

    def __init__(self, source, at):
        self.source, self.at = source, at

    def batch(self, step, batch_size, rank=0):
        if step == self.at:
            raise KeyboardInterrupt
        return self.source.batch(step, batch_size, rank)


def _teacher_run(out, feed_name, source, resume=False):
    out.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = SpritesTeacher(TeacherConfig({"shape": 3, "scale": 6}, BackboneConfig()))
    config = TrainConfig(steps=24, batch_size=8, checkpoint_every=1000, log_every=4, eval_every=1000, eval_images=64, feed=feed_name)
    train(out, TeacherObjective(model), source, config, evaluate=lambda m: {}, env=Distributed(), resume=resume)
    return load_file(str(out / "model.safetensors"))


def test_every_feed_trains_bit_identical_weights_and_a_prefetched_run_resumes_exactly(tmp_path):
    source = data.SpritesSource(seed=0, tasks=["shape", "scale"])
    inline = _teacher_run(tmp_path / "inline", "inline", source)
    for name in ("prefetch", "device"):
        weights = _teacher_run(tmp_path / name, name, source)
        assert all(torch.equal(weights[k], inline[k]) for k in inline), name
    # Interrupted at step 13 (the prefetch thread meets it first; the step re-raises it), then
    # resumed from the checkpoint written on the way out.
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _teacher_run(out, "prefetch", _InterruptAt(source, 13))
    assert not (out / "model.safetensors").exists()
    resumed = _teacher_run(out, "prefetch", source, resume=True)
    assert all(torch.equal(resumed[k], inline[k]) for k in inline)


def test_feed_device_on_an_image_folder_is_refused_in_one_line_with_nothing_written(tmp_path, capsys):
    folder = make_folder(tmp_path / "photos", count=12)
    out = tmp_path / "run"
    cli_fails(["teacher", "--out", str(out), "--data", str(folder), "--feed", "device", "--steps", "2"], capsys, "--feed prefetch")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_a_teacher_learns_on_a_gpu_from_sprites_rendered_there(tmp_path, compile_mode):
    # The whole GPU path at once: device feed, bf16 autocast, fused AdamW, and with
    # reduce-overhead the step replayed as a CUDA graph. Learning is the check, not speed.
    from kfdeploy.training.train import accuracy

    source = data.SpritesSource(seed=0, tasks=["shape", "scale"])
    model = SpritesTeacher(TeacherConfig({"shape": 3, "scale": 6}, BackboneConfig()))
    config = TrainConfig(steps=300, batch_size=256, checkpoint_every=10_000, log_every=50, eval_every=10_000,
                         feed="device", compile=compile_mode)
    train(tmp_path, TeacherObjective(model), source, config, evaluate=lambda m: {},
          env=Distributed(device=torch.device("cuda", 0)))
    images, labels = source.heldout(2048)
    scores = accuracy(model, images, labels)
    # Chance is 0.33 and 0.17; the same 300 steps on a CPU reach 0.48 and 0.76.
    assert scores["shape"] > 0.38 and scores["scale"] > 0.45, scores
