"""Apps feed ordinary pixels to any bundle: normalization inside the graphs (format version 2),
uint8 or 0-1 floats, image files of any size and channel count, example images stored in
the bundle, and version 1 bundles still read.

The non-sprites bundle here is a factor network on 3-channel 48x48 images, trained a few
steps from a run whose run.json records a non-trivial per-channel mean and std, the way
runs on image folders and colour sprites record theirs.
"""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import kfdeploy
from conftest import chromium_driver, cli_fails, manifest_json
from kfdeploy.training.architectures import BackboneConfig
from kfdeploy.bundling.bundle import FORMAT_VERSION, Bundle
from kfdeploy.cli import main
from kfdeploy.errors import KfError
from kfdeploy.bundling.export import EXAMPLE_IMAGES, export_bundle, torch_modules
from kfdeploy.training.models import SpritesTeacher, TeacherConfig
from kfdeploy.training.pipeline import factorize
from kfdeploy.training.train import TrainConfig

SIZE = 48
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
LABELS = {"colour": ["red", "green", "blue"], "size": ["small", "large"]}
QUIET = dict(log=lambda line: None)


class Squares(torch.utils.data.Dataset):
    """A red, green or blue square, small or large, on a noisy grey background; images in
    [0, 1], or normalized with MEAN and STD as the network trains on them."""

    def __init__(self, count: int, seed: int, normalized: bool):
        rng = np.random.default_rng(seed)
        self.colour = rng.integers(0, 3, count)
        self.size = rng.integers(0, 2, count)
        self.images = rng.uniform(0.3, 0.5, (count, 3, SIZE, SIZE)).astype(np.float32)
        for i in range(count):
            side = 10 if self.size[i] == 0 else 24
            top, left = rng.integers(0, SIZE - side, 2)
            self.images[i, :, top:top + side, left:left + side] = 0.05
            self.images[i, self.colour[i], top:top + side, left:left + side] = 0.95
        if normalized:
            self.images = (self.images - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), {"colour": int(self.colour[i]), "size": int(self.size[i])}


def _factor_run(root, input_spec):
    backbone = BackboneConfig(in_channels=3, image_size=SIZE, width=8, feature_dim=32)
    torch.manual_seed(0)
    teacher = SpritesTeacher(TeacherConfig({"colour": 3, "size": 2}, backbone)).eval()
    run = root / "kf"
    factorize(teacher, run, train_data=Squares(64, 0, True), heldout_data=Squares(16, 1, True), task_labels=LABELS,
              trunk=backbone, task_width=4, config=TrainConfig(steps=3, batch_size=8, eval_every=1000, log_every=1,
                                                               checkpoint_every=1000))
    info = json.loads((run / "run.json").read_text())
    if input_spec is not None:  # what runs on image folders and colour sprites record
        info["input"] = input_spec
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return _factor_run(tmp_path_factory.mktemp("rgb"), {"channels": 3, "image_size": SIZE, "mean": MEAN, "std": STD})


@pytest.fixture(scope="module")
def rgb_bundle(rgb_run):
    return export_bundle(rgb_run, rgb_run.parent / "bundle", examples=Squares(10, 2, False), progress=lambda m: None)


@pytest.fixture
def rgb_copy(rgb_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(rgb_bundle, copy)
    return copy


def _write_manifest(path, manifest):
    (path / "manifest.json").write_text(json.dumps(manifest))


def _pixels(count=5, seed=3):
    return np.random.default_rng(seed).uniform(0, 1, (count, 3, SIZE, SIZE)).astype(np.float32)


# -- normalization, in the graphs ----------------------------------------------------------

def test_the_manifest_says_how_pixels_are_normalized_and_which_pixel_types_are_taken(rgb_bundle):
    manifest = manifest_json(rgb_bundle)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    spec = manifest["input"]
    assert spec["shape"] == ["batch", 3, SIZE, SIZE] and spec["range"] == [0.0, 1.0] and spec["dtype"] == "float32"
    assert spec["normalization"] == {"mean": MEAN, "std": STD, "in_graph": True}
    assert spec["pixel_types"] == ["uint8", "float"]
    assert Bundle.open(rgb_bundle).normalization() == (MEAN, STD)


def test_every_graph_normalizes_its_image_input_with_a_sub_and_a_div(rgb_bundle):
    bundle = Bundle.open(rgb_bundle)
    for module in bundle.modules():
        graph = bundle.graph(module).graph
        constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        # Only the normalization reads the pixels' values (a Shape reads the batch size).
        consumers = [n for n in graph.node if "image" in n.input and n.op_type != "Shape"]
        assert [n.op_type for n in consumers] == ["Sub"], module
        divide = [n for n in graph.node if consumers[0].output[0] in n.input]
        assert [n.op_type for n in divide] == ["Div"], module
        np.testing.assert_array_equal(constants[consumers[0].input[1]].ravel(), np.float32(MEAN))
        np.testing.assert_array_equal(constants[divide[0].input[1]].ravel(), np.float32(STD))


def test_runtime_torch_backend_and_a_plain_onnxruntime_session_normalize_alike(rgb_bundle):
    """0-1 pixels in everywhere; the reference is the trained network on pixels normalized by hand."""
    x = _pixels()
    network = torch_modules(Bundle.open(rgb_bundle))
    normalized = (x - np.reshape(MEAN, (1, 3, 1, 1)).astype(np.float32)) / np.reshape(STD, (1, 3, 1, 1)).astype(np.float32)
    with torch.no_grad():
        reference = {t: v.numpy() for t, v in network(torch.from_numpy(normalized)).items()}
        unnormalized = {t: v.numpy() for t, v in network(torch.from_numpy(x)).items()}
    # A plain ONNX Runtime user, reading BUNDLE_FORMAT.md: feed 0-1 pixels to the graphs.
    manifest = manifest_json(rgb_bundle)
    trunk = ort.InferenceSession(str(rgb_bundle / manifest["trunk"]["file"]), providers=["CPUExecutionProvider"])
    common = trunk.run(None, {"image": x})[0]
    plain = {}
    for task, record in manifest["tasks"].items():
        session = ort.InferenceSession(str(rgb_bundle / record["file"]), providers=["CPUExecutionProvider"])
        plain[task] = session.run(None, {"image": x, "common": common})[0]
    runtime = kfdeploy.load(rgb_bundle, **QUIET)(x, logits=True)
    torch_backend = kfdeploy.load(rgb_bundle, backend="torch", **QUIET)(x, logits=True)
    for task in LABELS:
        for got in (plain[task], runtime[task], torch_backend[task]):
            np.testing.assert_allclose(got, reference[task], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(runtime[task], plain[task], atol=1e-6)
        # The test has teeth: skipping the normalization changes the answers.
        assert np.abs(unnormalized[task] - reference[task]).max() > 1e-3


def test_uint8_pixels_answer_exactly_as_the_same_pixels_divided_by_255(rgb_bundle):
    pixels = np.random.default_rng(4).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    for backend in ("onnxruntime", "torch"):
        model = kfdeploy.load(rgb_bundle, backend=backend, **QUIET)
        as_uint8, as_float = model(pixels, logits=True), model(pixels.astype(np.float32) / 255.0, logits=True)
        for task in LABELS:
            np.testing.assert_array_equal(as_uint8[task], as_float[task])


def test_a_bundle_that_takes_uint8_only_refuses_floats_naming_its_pixel_types(rgb_copy):
    manifest = manifest_json(rgb_copy)
    manifest["input"]["pixel_types"] = ["uint8"]
    _write_manifest(rgb_copy, manifest)
    model = kfdeploy.load(rgb_copy, **QUIET)
    with pytest.raises(KfError, match=r"this bundle takes uint8 pixels \(its input.pixel_types\), not float32"):
        model(_pixels())
    assert model(np.zeros((1, 3, SIZE, SIZE), np.uint8))["colour"].shape == (1, 3)


def test_into_refuses_a_run_that_normalizes_differently(rgb_run, rgb_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(rgb_run, other)
    info = json.loads((other / "run.json").read_text())
    info["input"]["mean"] = [0.0, 0.0, 0.0]
    (other / "run.json").write_text(json.dumps(info))
    before = manifest_json(rgb_copy)
    with pytest.raises(KfError, match="normalizes its pixels with mean"):
        export_bundle(other, rgb_copy, tasks=["size"], into=True, progress=lambda m: None)
    assert manifest_json(rgb_copy) == before


@pytest.mark.parametrize("spec, message", [
    ({"channels": 3, "image_size": SIZE, "mean": [0.5, 0.5], "std": STD}, "input.mean must be 3 finite number(s)"),
    ({"channels": 3, "image_size": SIZE, "mean": MEAN, "std": [0.2, 0.0, 0.3]}, "input.std must be positive"),
    ({"channels": 1, "image_size": SIZE, "mean": MEAN, "std": STD}, "input.channels is 1 but the model takes 3"),
], ids=["mean-count", "std-zero", "channels"])
def test_a_run_with_a_malformed_normalization_is_refused_before_anything_is_written(rgb_run, tmp_path, spec, message):
    other = tmp_path / "other"
    shutil.copytree(rgb_run, other)
    info = json.loads((other / "run.json").read_text())
    info["input"] = spec
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(KfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_bundle(other, tmp_path / "b", progress=lambda m: None)
    assert not (tmp_path / "b").exists()


# -- format versions -------------------------------------------------------------------------

def _as_version_1(folder):
    """What a version 1 exporter wrote: no normalization (the identity), no pixel types, no examples."""
    manifest = manifest_json(folder)
    manifest["format_version"] = 1
    for key in ("normalization", "pixel_types"):
        manifest["input"].pop(key)
    for record in manifest.pop("examples", []):
        (folder / record["file"]).unlink()
    _write_manifest(folder, manifest)


def test_a_version_1_bundle_loads_with_identity_normalization(bundle, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(bundle, old)
    _as_version_1(old)
    opened = Bundle.open(old)
    assert opened.normalization() == ([0.0], [1.0]) and opened.examples == [] and opened.pixel_types() == ["uint8", "float"]
    pixels = np.random.default_rng(5).integers(0, 256, (4, 1, 64, 64), dtype=np.uint8)
    for backend in ("onnxruntime", "torch"):
        got = kfdeploy.load(old, backend=backend, **QUIET)(pixels, logits=True)
        expected = kfdeploy.load(bundle, backend=backend, **QUIET)(pixels, logits=True)
        for task in expected:
            np.testing.assert_array_equal(got[task], expected[task])
    assert main(["verify", str(old)]) == 0


def test_into_a_version_1_bundle_writes_a_version_2_manifest(bundle, factor_run, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(bundle, old)
    _as_version_1(old)
    export_bundle(factor_run, old, tasks=["pos_x"], into=True, progress=lambda m: None)
    manifest = manifest_json(old)
    assert manifest["format_version"] == 2
    assert manifest["input"]["normalization"] == {"mean": [0.0], "std": [1.0], "in_graph": True}
    assert len(manifest["examples"]) == EXAMPLE_IMAGES and Bundle.open(old).examples


def test_the_sprites_graphs_carry_no_normalization(bundle):
    spec = manifest_json(bundle)["input"]
    assert spec["normalization"] == {"mean": [0.0], "std": [1.0], "in_graph": True}
    graph = Bundle.open(bundle).graph("trunk").graph
    assert not [n for n in graph.node if "image" in n.input and n.op_type in ("Sub", "Div")]


@pytest.mark.parametrize("change, message", [
    (lambda m: m["input"].pop("normalization"), "input.normalization is missing (format version 2 requires it)"),
    (lambda m: m["input"].pop("pixel_types"), "input.pixel_types is missing (format version 2 requires it)"),
    (lambda m: m["input"]["normalization"].update(mean=[0.5]), "input.normalization.mean must hold one value per channel (3), got 1"),
    (lambda m: m["input"]["normalization"].update(std=[1, 0, 1]), "input.normalization.std must be positive"),
    (lambda m: m["input"]["normalization"].update(in_graph=False), "input.normalization.in_graph must be true"),
    (lambda m: m["input"].update(pixel_types=["uint16"]), "input.pixel_types[0] must be \"uint8\" or \"float\""),
    (lambda m: m["examples"][0]["labels"].update(colour="purple"), 'examples[0].labels["colour"] must be one of the task\'s labels'),
    (lambda m: m["examples"][0]["labels"].update(weight="heavy"), "examples[0].labels must name tasks of this bundle"),
    (lambda m: m["examples"][0].update(file="../x.png"), "examples[0].file must be a relative path inside the bundle"),
    (lambda m: m.update(format_version=3), "format version 3, newer than this kfdeploy reads (up to 2)"),
], ids=["no-normalization", "no-pixel-types", "mean-count", "std-zero", "in-graph-false", "pixel-type", "example-label",
        "example-task", "example-escapes", "version-3"])
def test_a_malformed_version_2_manifest_is_refused_naming_the_field(rgb_copy, change, message):
    manifest = manifest_json(rgb_copy)
    change(manifest)
    _write_manifest(rgb_copy, manifest)
    with pytest.raises(KfError) as caught:
        Bundle.open(rgb_copy)
    assert message in str(caught.value), str(caught.value)


# -- example images --------------------------------------------------------------------------

def test_examples_are_stored_checksummed_with_their_true_labels(rgb_bundle):
    manifest, bundle = manifest_json(rgb_bundle), Bundle.open(rgb_bundle)
    examples = Squares(10, 2, False)
    assert len(manifest["examples"]) == EXAMPLE_IMAGES
    for i, record in enumerate(manifest["examples"]):
        assert record["file"] == f"examples/{i}.png"
        image, labels = bundle.example(i)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        expected = np.round(examples[i][0].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        np.testing.assert_array_equal(image, expected)
        assert labels == {"colour": LABELS["colour"][examples.colour[i]], "size": LABELS["size"][examples.size[i]]}


def test_sprites_bundles_carry_held_out_sprites_labelled_for_their_tasks(bundle):
    opened = Bundle.open(bundle)
    assert len(opened.examples) == EXAMPLE_IMAGES
    image, labels = opened.example(0)
    assert image.shape == (64, 64) and set(labels) == set(opened.tasks)


def test_a_tampered_example_is_refused_like_any_other_file(rgb_copy, capsys):
    path = rgb_copy / "examples" / "0.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KfError, match="checksum mismatch for examples/0.png"):
        Bundle.open(rgb_copy)
    cli_fails(["inspect", str(rgb_copy)], capsys, "checksum mismatch for examples/0.png")
    with pytest.raises(KfError, match="checksum mismatch for examples/0.png"):
        kfdeploy.load(rgb_copy, **QUIET)
    # Changed after opening: the bytes decoded are the bytes checked.
    opened = Bundle.open(rgb_copy, verify=False)
    with pytest.raises(KfError, match="checksum mismatch for examples/0.png"):
        opened.example(0)


def test_verify_and_inspect_report_normalization_and_examples(rgb_bundle, capsys):
    assert main(["verify", str(rgb_bundle)]) == 0
    assert f"examples: {EXAMPLE_IMAGES} images at the input's size" in capsys.readouterr().out
    assert main(["inspect", str(rgb_bundle)]) == 0
    out = capsys.readouterr().out
    assert "normalization (inside the graphs): mean [0.5, 0.4, 0.3], std [0.2, 0.25, 0.3]; pixels taken: uint8, float" in out
    assert f"examples: {EXAMPLE_IMAGES} (examples/0.png" in out


# -- kfdeploy run on image files -------------------------------------------------------------

def _files(folder):
    rng = np.random.default_rng(6)
    rgb = folder / "photo.png"
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(rgb)
    grey = folder / "scan.png"
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(grey)
    return [rgb, grey]


def _as_the_bundle_takes(path, mode, size):
    """What any app would do with Pillow: convert, then a bilinear resize."""
    image = Image.open(path).convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@pytest.mark.parametrize("which", ["rgb", "sprites"])
def test_run_resizes_and_converts_image_files_as_kfdeploy_load_sees_them(request, tmp_path, capsys, which):
    bundle = request.getfixturevalue("rgb_bundle" if which == "rgb" else "bundle")
    mode, size = ("RGB", SIZE) if which == "rgb" else ("L", 64)
    files = _files(tmp_path)
    assert main(["run", str(bundle), *map(str, files), "--json", "--top", "2"]) == 0
    captured = capsys.readouterr()
    answers = json.loads(captured.out)
    model = kfdeploy.load(bundle, **QUIET)
    pixels = np.stack([_as_the_bundle_takes(path, mode, size) for path in files])
    expected = model.top(model(pixels), k=2)
    for i, answer in enumerate(answers):
        assert answer["input"] == str(files[i])
        for task in model.tasks:
            got = [(entry["label"], entry["probability"]) for entry in answer[task]]
            assert [label for label, _ in got] == [label for label, _ in expected[task][i]]
            np.testing.assert_allclose([p for _, p in got], [p for _, p in expected[task][i]], atol=1e-6)
    converted = "colour image converted to grey (1 of 2)" if which == "sprites" else "grey image converted to RGB (1 of 2)"
    assert converted in captured.err and "resized (2 of 2)" in captured.err


def test_a_folder_run_exports_its_normalization_and_held_out_images_and_run_answers_its_files(tmp_path, capsys):
    """The chain on a labelled folder of RGB PNGs and JPEGs of three sizes: teacher, factorize,
    export (normalization, examples and held-out accuracy from the run), verify, then
    `kfdeploy run` on the held-out files answers as kfdeploy.load does on the same pixels."""
    from test_folder_data import SHORT, make_folder, read_rows

    folder = make_folder(tmp_path / "shapes")
    teacher, kf, bundle = tmp_path / "teacher", tmp_path / "kf", tmp_path / "bundle"
    assert main(["teacher", "--data", str(folder), "--out", str(teacher), "--image-size", "32", *SHORT]) == 0
    assert main(["factorize", "--teacher", str(teacher), "--out", str(kf), *SHORT]) == 0
    assert main(["export", str(kf), "--out", str(bundle)]) == 0
    assert main(["verify", str(bundle)]) == 0
    capsys.readouterr()
    manifest, run = manifest_json(bundle), json.loads((kf / "run.json").read_text())
    normalization = manifest["input"]["normalization"]
    assert (normalization["mean"], normalization["std"]) == (run["input"]["mean"], run["input"]["std"]) != ([0.0] * 3, [1.0] * 3)
    heldout = [row for row in read_rows(folder) if row["split"] == "heldout"]
    assert len(manifest["examples"]) == EXAMPLE_IMAGES
    for record, row in zip(manifest["examples"], heldout):
        assert record["labels"] == {"shape": row["shape"], "colour": row["colour"]}
    files = [folder / row["file"] for row in heldout]
    assert main(["run", str(bundle), *map(str, files), "--json", "--top", "2"]) == 0
    answers = json.loads(capsys.readouterr().out)
    model = kfdeploy.load(bundle, **QUIET)
    images = np.stack([_as_the_bundle_takes(path, "RGB", 32) for path in files])
    for task in ("shape", "colour"):  # export measures every task on the folder's held-out split
        truth = np.array([manifest["tasks"][task]["labels"].index(row[task]) for row in heldout])
        assert manifest["tasks"][task]["heldout_accuracy"] == pytest.approx((model(images)[task].argmax(1) == truth).mean(), abs=1e-9)
    expected = model.top(model(images), k=2)
    for i, answer in enumerate(answers):
        for task in ("shape", "colour"):
            assert [e["label"] for e in answer[task]] == [label for label, _ in expected[task][i]]
            np.testing.assert_allclose([e["probability"] for e in answer[task]], [p for _, p in expected[task][i]], atol=1e-6)


def test_run_refuses_an_unreadable_file_before_opening_the_bundle(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    cli_fails(["run", str(tmp_path / "no-bundle"), str(tmp_path / "notes.png")], capsys, "notes.png is not an image that can be read")


def _npy(path, shape, descr="<f4", payload=b""):
    """An .npy file whose header declares `shape` of `descr`, followed by `payload` only."""
    from numpy.lib import format as npy

    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)
    return path


@pytest.mark.parametrize("case", ["billions", "truncated", "objects", "strings", "format-3"])
def test_an_npy_that_claims_more_than_it_holds_or_is_not_numbers_is_refused_before_allocating(tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "batch.npy"
    expected = {
        "billions": ("declares a 1000000x3x1000x1000 array, 3000000000000 values, more than the 134217728 a batch may hold "
                     "here: split it into smaller .npy files"),
        "truncated": ("declares a 100x1x64x64 array of float32 (1638400 bytes) but holds 100 bytes after its header: it is "
                      "truncated or not what it says"),
        "objects": "holds object values, not numbers: save a uint8 or float array with numpy.save",
        "strings": "holds <U8 values, not numbers",
        "format-3": "is a .npy of format 3.0, which holds structured arrays, not a batch of numbers",
    }[case]
    if case == "billions":
        _npy(path, (10 ** 6, 3, 1000, 1000))
    elif case == "truncated":
        _npy(path, (100, 1, 64, 64), payload=bytes(100))
    elif case == "objects":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif case == "strings":
        np.save(path, np.array(["pictures"]))
    else:
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.zeros((1, 1, 4, 4), np.float32), version=(3, 0))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the array was read before its header was checked")
    monkeypatch.setattr(np, "load", no_allocation)
    monkeypatch.setattr(np, "fromfile", no_allocation)
    cli_fails(["run", str(tmp_path / "no-bundle"), str(path)], capsys, f"{path} {expected}")


# -- the demo on a bundle that is not sprites -----------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rgb_server(rgb_bundle):
    from kfdeploy.demo import launch

    port = _free_port()
    app = launch(rgb_bundle, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", app
    app.close()


def _expected(bundle, pixels, tasks):
    model = kfdeploy.load(bundle, tasks=tasks, **QUIET)
    scores = model(pixels)
    return {t: dict(zip(model.labels(t), scores[t][0].tolist())) for t in tasks}


def _example_pixels(bundle, index):
    """Example `index` as kfdeploy.load takes it: (1, 3, H, W) uint8, read straight from its PNG."""
    record = manifest_json(bundle)["examples"][index]
    return np.asarray(Image.open(bundle / record["file"]).convert("RGB")).transpose(2, 0, 1)[None], record["labels"]


def test_the_demo_of_a_non_sprites_bundle_has_examples_and_no_sprite_generator(rgb_server):
    _, app = rgb_server
    text = json.dumps(app.config, default=str)
    assert "Generate a sprite" not in text and '"generate"' not in text
    assert "What the model sees (48x48 RGB)" in text and '"examples"' in text
    endpoints = {d.get("api_name") for d in app.config["dependencies"]}
    assert {"predict_example", "predict_upload", "predict_sketch"} <= endpoints and "predict_sprite" not in endpoints


def test_an_example_answers_as_kfdeploy_load_and_shows_its_true_labels(rgb_bundle):
    from kfdeploy.demo import Demo, summary_markdown

    demo = Demo(rgb_bundle)
    assert not demo.sprites and len(demo.examples) == EXAMPLE_IMAGES
    answer = demo.answer_example(2, ["colour", "size"])
    pixels, labels = _example_pixels(rgb_bundle, 2)
    expected = _expected(rgb_bundle, pixels, ["colour", "size"])
    for task in ("colour", "size"):
        assert answer.scores[task] == pytest.approx(expected[task], abs=1e-6)
    assert answer.truth == labels and answer.seen.shape == (SIZE, SIZE, 3) and answer.notes == []
    assert f"| colour | {labels['colour']} |" in summary_markdown(answer, None)
    with pytest.raises(KfError, match="there is no example 99"):
        demo.answer_example(99, ["colour"])


@pytest.mark.slow
def test_the_client_gets_answers_for_examples_and_uploads_of_any_size(rgb_server, rgb_bundle, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(rgb_server[0], verbose=False)

    def labels(result):
        out = {}
        for task, value in zip(LABELS, result[2:4]):
            value = value["value"] if value.get("__type__") == "update" else value
            if value:
                out[task] = {c["label"]: c["confidence"] for c in value["confidences"]}
        return out

    result = client.predict(1, ["colour", "size"], "onnxruntime", api_name="/predict_example")
    pixels, truth = _example_pixels(rgb_bundle, 1)
    expected = _expected(rgb_bundle, pixels, ["colour", "size"])
    for task, confidences in labels(result).items():
        assert confidences == pytest.approx(expected[task], abs=1e-4)
    assert f"| size | {truth['size']} |" in result[4]
    # A grey upload of another size: converted to RGB and resized, as `kfdeploy run` does.
    grey = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 20), dtype=np.uint8)).save(grey)
    result = client.predict(handle_file(str(grey)), ["size"], "torch", api_name="/predict_upload")
    expected = _expected(rgb_bundle, _as_the_bundle_takes(grey, "RGB", SIZE)[None], ["size"])
    assert labels(result)["size"] == pytest.approx(expected["size"], abs=1e-4)
    assert "grey image converted to RGB" in result[4] and "resized from 20x30 to 48x48" in result[4]


def test_a_bundle_with_a_tampered_example_is_explained_by_the_demo(rgb_copy):
    from kfdeploy.demo import build_app

    (rgb_copy / "examples" / "3.png").write_bytes(b"tampered")
    text = json.dumps(build_app(rgb_copy).config)
    assert "cannot be used" in text and "checksum mismatch for examples/3.png" in text


@pytest.mark.chromium
@pytest.mark.slow
def test_a_browser_clicks_an_example_of_a_non_sprites_bundle_and_sees_the_answer(rgb_server, rgb_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(rgb_server[0])
        wait = WebDriverWait(driver, 60)
        thumbnail = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#examples [aria-label='Thumbnail 4 of {EXAMPLE_IMAGES}']"))
        assert not driver.find_elements(By.ID, "generate")  # no sprite generator on this bundle
        thumbnail.click()  # colour and size are ticked: the fourth example, answered
        pixels, truth = _example_pixels(rgb_bundle, 3)
        for task in ("colour", "size"):
            expected = _expected(rgb_bundle, pixels, [task])[task]
            top = max(expected, key=expected.get)
            selector = f"#label-{task} [data-testid='label-output-value']"
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, selector) and d.find_element(By.CSS_SELECTOR, selector).text == top)
        summary = driver.find_element(By.ID, "summary").text
        assert truth["colour"] in summary and "Latency" in summary
        driver.save_screenshot(str(tmp_path / "demo-rgb.png"))
    finally:
        driver.quit()
