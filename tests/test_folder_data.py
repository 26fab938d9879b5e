"""Labelled image folders (`--data PATH`: images + labels.csv) and your own teacher from the
command line (`--teacher-factory MODULE:FUNCTION`): the happy paths end to end on tiny
generated PNGs and JPEGs, and every refusal's one-line message.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import cli_fails
from kfdeploy.training import folder_data
from kfdeploy.cli import main
from kfdeploy.errors import KfError
from kfdeploy.training import teacher_targets
from kfdeploy.training.data import TASK_CLASSES
from kfdeploy.training.losses import FactorizationObjective, LossWeights
from kfdeploy.training.models import SpritesTeacher, TeacherConfig
from kfdeploy.training.pipeline import factorize, normalized, open_data, open_run_data
from kfdeploy.training.runs import load_factor_run, load_teacher
from kfdeploy.training.train import TrainConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
SIZE = 32
SHORT = ["--steps", "6", "--batch-size", "8", "--checkpoint-every", "1000", "--eval-images", "64"]


def make_folder(root: Path, count: int = 36, split: bool = True, grey: bool = False, columns=("shape", "colour")) -> Path:
    """Coloured circles and squares on dark noise, in three sizes (none of them SIZE), every
    fifth one a JPEG; labels.csv with a split column (every sixth image held out) if `split`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        shape, colour = ("circle", "square")[i % 2], list(COLOURS)[(i // 2) % 3]
        width, height = ((40, 32), (20, 20), (50, 50))[i % 3]
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        box = (width * 0.2, height * 0.2, width * 0.8, height * 0.8)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"img{i:03d}.{'jpg' if i % 5 == 0 else 'png'}"
        (image.convert("L") if grey else image).save(root / name)
        row = {"file": name, "shape": shape, "colour": colour}
        if split:
            row["split"] = "heldout" if i % 6 == 5 else "train"
        rows.append({k: v for k, v in row.items() if k in ("file", "split", *columns)})
    write_labels(root, rows)
    return root


def write_labels(root: Path, rows) -> None:
    with open(root / folder_data.LABELS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(root: Path):
    with open(root / folder_data.LABELS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def refused(argv, capsys, expected: str, out: Path) -> str:
    """kfdeploy ARGV refused in one line (conftest.cli_fails), leaving no `out` behind."""
    err = cli_fails(argv, capsys, expected)
    assert not out.exists(), "a refused command leaves nothing behind"
    return err


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def folder_runs(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    teacher, kf = root / "teacher", root / "kf"
    assert main(["teacher", "--data", str(folder), "--out", str(teacher), "--image-size", str(SIZE), *SHORT]) == 0
    assert main(["factorize", "--teacher", str(teacher), "--out", str(kf), *SHORT]) == 0
    return teacher, kf


def _expected_stats(folder: Path):
    """Per-channel mean and std of the training images, computed here with Pillow directly."""
    pixels = [np.asarray(Image.open(folder / r["file"]).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
              for r in read_rows(folder) if r["split"] == "train"]
    stacked = np.stack(pixels).reshape(-1, 3) / 255.0
    return stacked.mean(0), stacked.std(0)


def test_a_folder_run_records_its_input_and_class_names(folder, folder_runs):
    teacher, kf = folder_runs
    info = json.loads((teacher / "run.json").read_text())
    assert info["data"] == "folder"
    source = info["data_source"]
    assert source["data"] == str(folder.resolve()) and source["split"] == "column"
    assert (source["train_images"], source["heldout_images"]) == (30, 6)
    assert info["task_labels"] == {"shape": ["circle", "square"], "colour": ["blue", "green", "red"]}
    spec = info["input"]
    assert (spec["channels"], spec["image_size"]) == (3, SIZE)
    mean, std = _expected_stats(folder)
    assert np.allclose(spec["mean"], mean, atol=1e-5) and np.allclose(spec["std"], std, atol=1e-5)
    assert info["model"]["backbone"]["in_channels"] == 3 and info["model"]["backbone"]["image_size"] == SIZE
    # The factorization trains on the teacher's data, as the teacher saw it.
    factorized = json.loads((kf / "run.json").read_text())
    for key in ("data", "input", "task_labels"):
        assert factorized[key] == info[key], key
    assert factorized["data_source"]["data"] == source["data"]


def test_the_network_sees_the_training_images_normalized_to_mean_0_std_1(folder_runs):
    info = json.loads((folder_runs[0] / "run.json").read_text())
    opened = open_run_data(info)
    images, _ = normalized(opened.source, info["input"]).batch(0, 30)  # the 30 training images, once each
    per_channel = images.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-3)


def test_the_teachers_targets_are_computed_once_and_every_batch_reads_its_own(folder_runs):
    teacher_run, kf = folder_runs
    teacher, _ = load_teacher(teacher_run)
    model, info = load_factor_run(kf)
    opened = open_run_data(info)
    source = normalized(opened.source, info["input"])
    targeted, seconds = teacher_targets.with_teacher_targets("once", source, teacher_targets.fixed_rows(opened.source),
                                                             teacher, 1, torch.device("cpu"), show_progress=False)
    assert isinstance(targeted, teacher_targets.TargetedSource) and seconds > 0
    objective = FactorizationObjective(model, teacher, LossWeights(**info["loss_weights"]))
    for step in (0, 2, 7):  # 30 training images in batches of 8: three steps an epoch, each a new order
        images, labels = targeted.batch(step, 8)
        plain_images, plain_labels = source.batch(step, 8)
        assert torch.equal(images, plain_images)
        tasks, targets = teacher_targets.split_targets(labels)
        assert tasks.keys() == plain_labels.keys() and all(torch.equal(tasks[t], plain_labels[t]) for t in tasks)
        with torch.no_grad():
            expected = teacher_targets.teacher_outputs(teacher, images, 1)
        assert targets.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(targets[key], expected[key], rtol=1e-5, atol=1e-5)
        losses = []
        for given in (labels, plain_labels):  # read from the batch, or the teacher run in the step
            torch.manual_seed(0)  # the task codes' noise
            with torch.no_grad():
                losses.append(objective(images, given)[0])
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_a_folder_factorization_counts_the_precomputed_targets_in_its_training_time(folder_runs):
    records = [json.loads(line) for line in (folder_runs[1] / "metrics.jsonl").read_text().splitlines()]
    set_up = [r for r in records if r.get("event") == "set up"]
    assert len(set_up) == 1 and set_up[0]["step"] == 0 and set_up[0]["setup_s"] > 0
    assert set_up[0]["time_s"] >= set_up[0]["setup_s"] and records[-1]["time_s"] > set_up[0]["setup_s"]


def test_targets_that_do_not_fit_the_memory_limit_leave_the_teacher_in_the_step(folder_runs, monkeypatch):
    teacher, info = load_teacher(folder_runs[0])
    opened = open_run_data(info)
    monkeypatch.setattr(teacher_targets, "AUTO_MEMORY_LIMIT", 1024)
    kept, _ = teacher_targets.with_teacher_targets("auto", opened.source, teacher_targets.fixed_rows(opened.source),
                                                   teacher, 1, torch.device("cpu"), show_progress=False)
    assert kept is opened.source
    every_step, seconds = teacher_targets.with_teacher_targets("every-step", opened.source, opened.source, teacher, 1,
                                                               torch.device("cpu"), show_progress=False)
    assert every_step is opened.source and seconds == 0.0


def test_targets_once_on_rendered_sprites_is_refused_before_anything_is_written(tmp_path):
    teacher = SpritesTeacher(TeacherConfig(task_classes=dict(TASK_CLASSES)))
    out = tmp_path / "kf"
    with pytest.raises(KfError, match="--teacher-targets once needs an image folder: rendered sprites are new at every step"):
        factorize(teacher, out, data="sprites", config=TrainConfig(steps=2, teacher_targets="once"))
    assert not out.exists()
    with pytest.raises(KfError, match="--teacher-targets must be one of auto, once, every-step, not 'twice'"):
        teacher_targets.check_mode("twice", None)


def test_evaluate_scores_a_folder_run_on_its_heldout_images(folder_runs, capsys):
    kf = folder_runs[1]
    assert main(["evaluate", str(kf), "--images", "100"]) == 0
    result = json.loads((kf / "evaluation.json").read_text())
    assert result["heldout_images"] == 6
    assert set(result["teacher_accuracy"]) == set(result["factor_accuracy"]) == {"shape", "colour"}


def test_grey_images_make_a_one_channel_run_and_channels_3_converts_them(tmp_path):
    grey = make_folder(tmp_path / "grey", count=12, grey=True)
    opened = open_data(grey, image_size=16)
    assert opened.channels == 1 and opened.source.images.shape == (12, 1, 16, 16)
    rgb = open_data(grey, image_size=16, channels=3)
    assert rgb.channels == 3
    assert np.array_equal(rgb.source.images[:, 0], rgb.source.images[:, 2])  # grey repeated


def test_one_colour_image_among_grey_ones_makes_the_run_rgb(tmp_path):
    root = make_folder(tmp_path / "mixed", count=12, grey=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "img001.png")
    assert open_data(root, image_size=16).channels == 3
    assert open_data(root, image_size=16, channels=1).channels == 1


def test_without_a_split_column_a_seeded_hash_of_the_name_splits_and_adding_files_moves_none(tmp_path):
    root = make_folder(tmp_path / "hashed", count=60, split=False)
    table = folder_data.read_labels(root)
    assert table.split == "hash"
    assert np.array_equal(table.heldout, folder_data.read_labels(root).heldout)  # deterministic
    assert 0.1 < table.heldout.mean() < 0.3  # HELDOUT_PERCENT = 20
    before = dict(zip(table.files, table.heldout))
    rows = read_rows(root)
    for i in range(60, 90):  # more files: the old ones keep their split
        Image.new("RGB", (8, 8)).save(root / f"new{i}.png")
        rows.append({"file": f"new{i}.png", "shape": "circle", "colour": "red"})
    write_labels(root, rows)
    grown = folder_data.read_labels(root)
    assert all(before[f] == h for f, h in zip(grown.files, grown.heldout) if f in before)
    assert folder_data.read_labels(root, split_seed=1).heldout.tolist() != grown.heldout.tolist()


def test_number_classes_sort_as_numbers(tmp_path):
    root = make_folder(tmp_path / "numbers", count=24)
    rows = read_rows(root)
    for i, row in enumerate(rows):
        row["shape"] = ("2", "10", "1")[i % 3]
    write_labels(root, rows)
    assert folder_data.read_labels(root).task_labels["shape"] == ["1", "2", "10"]


def _edit(root: Path, change) -> None:
    rows = read_rows(root)
    change(rows)
    write_labels(root, rows)


def _rename_file_column(root):
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("file,", "path,", 1))


def _not_an_image(root):
    (root / "notes.png").write_text("these are notes, not pixels")
    _edit(root, lambda rows: rows.append({**rows[0], "file": "notes.png"}))


def _single_class(root):
    _edit(root, lambda rows: [row.update(shape="circle") for row in rows])


def _class_only_heldout(root):
    def change(rows):
        rows[5]["colour"] = "purple"  # row 5 is held out
    _edit(root, change)


@pytest.mark.parametrize("damage, extra, expected", [
    (_rename_file_column, [], "has no 'file' column (its columns: path, shape, colour, split)"),
    (None, ["--tasks", "shape,size"], "has no column for task 'size'; its tasks: shape, colour"),
    (lambda root: (root / "img003.png").unlink(), [], "lists img003.png, which is not a file in"),
    (_not_an_image, [], "lists notes.png: notes.png is not an image that can be read"),
    (_single_class, [], "task 'shape' has a single class ('circle')"),
    (_class_only_heldout, [], "class 'purple' of task 'colour' is in held-out images (img005.jpg) but in no training image"),
    (lambda root: (root / "labels.csv").unlink(), [], "has no labels.csv"),
    (lambda root: _edit(root, lambda rows: rows[0].update(split="test")), [], "split must be train or heldout, not 'test'"),
    (lambda root: _edit(root, lambda rows: rows[1].update(colour="")), [], "(img001.png) has no class for task 'colour'"),
    (lambda root: _edit(root, lambda rows: rows[1].update(colour="\x1b[31mred")), [],
     "(img001.png): class '\\x1b[31mred' of task 'colour' holds control characters"),
    (lambda root: _edit(root, lambda rows: rows.append(dict(rows[0]))), [], "lists img000.jpg twice (lines 2 and 38)"),
])
def test_bad_folders_are_refused_with_one_line_and_nothing_written(tmp_path, capsys, damage, extra, expected):
    root = make_folder(tmp_path / "data")
    if damage:
        damage(root)
    out = tmp_path / "teacher"
    refused(["teacher", "--data", str(root), "--out", str(out), *extra, *SHORT], capsys, expected, out)


def test_a_missing_folder_is_refused_naming_the_choices(tmp_path, capsys):
    out = tmp_path / "teacher"
    refused(["teacher", "--data", str(tmp_path / "nowhere"), "--out", str(out)], capsys, "no such folder", out)


def test_factorizing_on_a_folder_with_classes_the_teacher_does_not_know_or_another_size_is_refused(folder, folder_runs, tmp_path, capsys):
    other = make_folder(tmp_path / "other", count=24)
    _edit(other, lambda rows: rows[0].update(colour="purple"))
    out = tmp_path / "kf"
    refused(["factorize", "--teacher", str(folder_runs[0]), "--data", str(other), "--out", str(out), *SHORT], capsys,
            "class 'purple' of task 'colour'", out)
    refused(["factorize", "--teacher", str(folder_runs[0]), "--data", str(folder), "--image-size", "16", "--out", str(out)],
            capsys, "takes 3x32x32 images; this data gives 3x16x16", out)


# --- your own teacher from the command line ------------------------------------------------

TEACHERS = '''
from pathlib import Path

import torch
from torch import nn

Path(__file__).with_name("imported.marker").write_text("imported")


class Net(nn.Module):
    # Declared in output order, which is not the sorted order of the names.
    task_labels = {"shape": ["circle", "square"], "colour": ["red", "green", "blue"]}

    def __init__(self, pooled=True):
        super().__init__()
        self.pooled = pooled
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.heads = nn.ModuleDict({"shape": nn.Linear(8, 2), "colour": nn.Linear(8, 3)})

    def forward_features(self, x):
        x = self.body(x)
        return x.mean((2, 3)) if self.pooled else x

    def forward_head(self, features):
        return {t: head(features) for t, head in self.heads.items()}


class Headless(nn.Module):
    def forward_features(self, x):
        return x.mean((2, 3))


def build():
    return Net()


def build_headless():
    return Headless()


def build_unpooled():
    return Net(pooled=False)


def build_not_a_module():
    return {"forward_features": None}


def build_raises():
    raise RuntimeError("checkpoint path not configured")
'''


@pytest.fixture
def teachers(tmp_path, monkeypatch):
    """A module of teacher factories in the current folder, importable as the CLI imports it."""
    (tmp_path / "kf_test_teachers.py").write_text(TEACHERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kf_test_teachers", None)
    yield tmp_path
    sys.modules.pop("kf_test_teachers", None)


def _weights(teachers: Path) -> Path:
    import kf_test_teachers

    torch.manual_seed(0)
    path = teachers / "teacher.safetensors"
    save_file(kf_test_teachers.build().state_dict(), str(path))
    return path


def test_factorize_your_own_teacher_from_the_command_line(teachers, folder, capsys):
    weights = _weights(teachers)
    out = teachers / "kf"
    assert main(["factorize", "--teacher-factory", "kf_test_teachers:build", "--teacher-weights", str(weights),
                 "--data", str(folder), "--image-size", str(SIZE), "--out", str(out), *SHORT]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["teacher_run"] is None and info["teacher"]["factory"] == "kf_test_teachers:build"
    assert info["teacher"]["weights"]["file"] == str(weights.resolve()) and len(info["teacher"]["weights"]["sha256"]) == 64
    # Classes in the teacher's output order, and labels mapped to it: a red image is class 0.
    assert info["task_labels"] == {"shape": ["circle", "square"], "colour": ["red", "green", "blue"]}
    opened = open_run_data(info)
    red = [i for i, r in enumerate(read_rows(folder)) if r["colour"] == "red"]
    assert (opened.source.table.labels["colour"][red] == 0).all()
    # No pretrained_cfg on the teacher: it gets the pixels it was trained on, unnormalized.
    assert info["input"] == {"channels": 3, "image_size": SIZE, "mean": [0.0] * 3, "std": [1.0] * 3}
    capsys.readouterr()
    refused(["evaluate", str(out)], capsys, f"--teacher-factory kf_test_teachers:build --teacher-weights {weights.resolve()}", teachers / "absent")
    assert main(["evaluate", str(out), "--images", "50", "--teacher-factory", "kf_test_teachers:build",
                 "--teacher-weights", str(weights)]) == 0


def test_a_teacher_factory_is_imported_only_when_named_on_the_command_line(teachers, folder, capsys):
    out = teachers / "kf"
    assert main(["factorize", "--teacher-factory", "kf_test_teachers:build", "--data", str(folder),
                 "--image-size", "16", "--out", str(out), *SHORT]) == 0
    marker = teachers / "imported.marker"
    assert marker.exists()
    marker.unlink()
    # run.json names the factory; evaluate must not import it from there (nor export, inspect, ...).
    result = subprocess.run([sys.executable, "-m", "kfdeploy", "evaluate", str(out)], cwd=teachers,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--teacher-factory kf_test_teachers:build" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("factory, extra, expected", [
    ("kf_test_teachers.build", [], "is not MODULE:FUNCTION (e.g. my_pkg.models:build)"),
    ("kf_no_such_module:build", [], "cannot import kf_no_such_module (ModuleNotFoundError: No module named 'kf_no_such_module')"),
    ("kf_test_teachers:missing", [], "kf_test_teachers has no function missing"),
    ("kf_test_teachers:build_headless", [], "returned a Headless without forward_head"),
    ("kf_test_teachers:build_not_a_module", [], "returned a dict, not a torch nn.Module"),
    ("kf_test_teachers:build_raises", [], "build_raises() raised RuntimeError: checkpoint path not configured"),
    ("kf_test_teachers:build_unpooled", [], "forward_features gave (2, 8, 8, 8), not pooled (N, D) features"),
    ("kf_test_teachers:build", ["--teacher-weights", "nowhere.safetensors"], "--teacher-weights nowhere.safetensors: no such file"),
    ("kf_test_teachers:build", ["--teacher-weights", "wrong.safetensors"], "does not fit the module kf_test_teachers:build returns: missing body.0.bias"),
])
def test_bad_teacher_factories_are_refused_with_one_line(teachers, folder, capsys, factory, extra, expected):
    save_file({"body.0.weight": torch.zeros(8, 3, 3, 3)}, str(teachers / "wrong.safetensors"))
    out = teachers / "kf"
    refused(["factorize", "--teacher-factory", factory, *extra, "--data", str(folder), "--image-size", "16", "--out", str(out)],
            capsys, expected, out)


def test_a_teacher_factory_needs_data_and_teacher_weights_need_a_factory(teachers, folder_runs, capsys):
    out = teachers / "kf"
    refused(["factorize", "--teacher-factory", "kf_test_teachers:build", "--out", str(out)], capsys, "--teacher-factory needs --data", out)
    refused(["factorize", "--teacher", str(folder_runs[0]), "--teacher-weights", "w.safetensors", "--out", str(out)], capsys,
            "--teacher-weights goes with --teacher-factory", out)


def test_a_factory_teacher_whose_outputs_do_not_match_the_classes_is_refused(teachers, tmp_path, capsys):
    # Four colours in the data, three outputs in the teacher, which names its classes.
    root = make_folder(tmp_path / "four", count=24)
    _edit(root, lambda rows: rows[0].update(colour="purple"))
    out = teachers / "kf"
    refused(["factorize", "--teacher-factory", "kf_test_teachers:build", "--data", str(root), "--image-size", "16", "--out", str(out)],
            capsys, "class 'purple' of task 'colour'", out)


def test_read_labels_refuses_a_task_name_that_cannot_name_a_module(tmp_path):
    root = make_folder(tmp_path / "names", count=12, columns=("shape",))
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("shape", "my shape", 1))
    with pytest.raises(KfError, match="task column 'my shape' cannot name a task module"):
        folder_data.read_labels(root)
