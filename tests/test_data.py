import numpy as np
import torch

from kfdeploy.training import data


def test_same_seed_and_step_give_the_same_batch():
    source = data.SpritesSource(seed=3)
    a, la = source.batch(step=7, batch_size=32)
    b, lb = source.batch(step=7, batch_size=32)
    assert torch.equal(a, b) and all(torch.equal(la[t], lb[t]) for t in la)


def test_different_steps_and_ranks_give_different_batches():
    source = data.SpritesSource(seed=3)
    a, _ = source.batch(step=7, batch_size=32)
    assert not torch.equal(a, source.batch(step=8, batch_size=32)[0])
    assert not torch.equal(a, source.batch(step=7, batch_size=32, rank=1)[0])


def test_training_stream_never_yields_a_heldout_image():
    source = data.SpritesSource(seed=0)
    heldout = set(data.heldout_combinations().tolist())
    for step in range(20):
        combos = data.factors_to_combination(source.train_factors(step, 512))
        assert not heldout.intersection(combos.tolist())
    assert 0.04 < len(heldout) / data.NUM_COMBINATIONS < 0.06


def test_heldout_covers_every_class_of_every_task():
    factors = data.combination_to_factors(data.heldout_combinations()[:8192])
    for column, classes in enumerate(data.TASK_CLASSES.values()):
        assert set(np.unique(factors[:, column])) == set(range(classes))


def test_rendered_sprites_are_uint8_images_of_0_and_255():
    images = data.render(data.SpritesSource().train_factors(0, 16))
    assert images.dtype == np.uint8 and set(np.unique(images).tolist()) == {0, 255}


def test_images_are_binary_64x64_and_labels_match_the_grid():
    images, labels = data.SpritesSource().batch(0, 64)
    assert images.shape == (64, 1, 64, 64) and images.dtype == torch.float32
    assert set(torch.unique(images).tolist()) <= {0.0, 1.0}
    for task, classes in data.TASK_CLASSES.items():
        assert labels[task].min() >= 0 and labels[task].max() < classes


def _centroid(image):
    ys, xs = np.nonzero(image[0])
    return xs.mean(), ys.mean()


def test_factors_move_and_grow_the_sprite_as_named():
    base = np.array([[2, 0, 0, 0, 0]])
    moved_right = data.render(base + [0, 0, 0, 31, 0])
    moved_down = data.render(base + [0, 0, 0, 0, 31])
    bigger = data.render(base + [0, 5, 0, 0, 0])
    x0, y0 = _centroid(data.render(base)[0])
    assert _centroid(moved_right[0])[0] > x0 + 30 and abs(_centroid(moved_right[0])[1] - y0) < 1
    assert _centroid(moved_down[0])[1] > y0 + 30
    assert bigger.sum() > 3 * data.render(base).sum()


def test_neighbouring_positions_render_differently():
    for shape in range(3):
        row = np.array([[shape, 0, 0, x, 10] for x in range(32)])
        images = data.render(row).reshape(32, -1)
        assert all(not np.array_equal(images[i], images[i + 1]) for i in range(31))


def test_square_is_symmetric_under_quarter_turns_and_the_heart_is_not():
    square = data.render(np.array([[0, 5, 0, 16, 16], [0, 5, 10, 16, 16]]))  # 0 and 90 degrees
    heart = data.render(np.array([[2, 5, 0, 16, 16], [2, 5, 10, 16, 16]]))
    assert (square[0] != square[1]).sum() <= 4  # rasterisation noise only
    assert (heart[0] != heart[1]).sum() > 20


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((1, 4, 4), float(i)), {"id": i}


def test_dataset_source_covers_each_epoch_once_and_splits_ranks():
    source = data.DatasetSource(_Toy(), ["id"], seed=1, world_size=2)
    seen = []
    for step in range(2):  # 10 items, 2 ranks x batch 2 -> 2 steps per epoch (2 items dropped)
        for rank in range(2):
            seen += source.batch(step, 2, rank)[1]["id"].tolist()
    assert len(seen) == len(set(seen)) == 8
    assert torch.equal(source.batch(5, 2, 0)[0], source.batch(5, 2, 0)[0])
