"""Export: real ONNX files, checked by onnx, run by ONNX Runtime, in a safe, atomic bundle."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, cli_fails, kill_at, manifest_json, run_cli
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.cli import main
from kfdeploy.training.data import TASK_CLASSES, TASK_NAMES, SpritesSource
from kfdeploy.bundling.export import PARITY_MAX_ABS_ERR, load_profile
from kfdeploy.training.runs import load_factor_run


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def test_bundle_holds_a_trunk_and_one_graph_per_task_with_only_batch_dynamic(bundle):
    manifest = manifest_json(bundle)
    assert set(manifest["tasks"]) == set(TASK_NAMES)
    graphs = [manifest["trunk"]["file"]] + [t["file"] for t in manifest["tasks"].values()]
    for file in graphs:
        model = onnx.load(str(bundle / file))
        for value in list(model.graph.input) + list(model.graph.output):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert isinstance(dims[0], str) and all(isinstance(d, int) for d in dims[1:]), (file, value.name, dims)
    trunk = onnx.load(str(bundle / "trunk.onnx"))
    assert [i.name for i in trunk.graph.input] == ["image"] and [o.name for o in trunk.graph.output] == ["common"]
    task = onnx.load(str(bundle / "tasks" / "shape.onnx"))
    assert [i.name for i in task.graph.input] == ["image", "common"]


def test_every_graph_passes_the_full_onnx_checker_and_carries_no_build_machine_paths(bundle):
    for path in list((bundle / "tasks").glob("*.onnx")) + [bundle / "trunk.onnx"]:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        # torch.onnx's per-node provenance (stack traces) is left out of shipped graphs
        assert str(REPO).encode() not in path.read_bytes(), path


@pytest.mark.parametrize("writer", ["export", "quantize"])
def test_a_graph_readers_would_refuse_is_never_written(bundle, writer):
    # What export and quantize write must read: the same operator allow-list, at both ends.
    from kfdeploy.bundling.export import check_graph
    from kfdeploy.bundling.quantize import _check_interface
    from kfdeploy.errors import KfError

    model = onnx.load(str(bundle / "trunk.onnx"))
    model.graph.initializer.append(onnx.helper.make_tensor("repeats", onnx.TensorProto.INT64, [4], [1, 1, 1, 1]))
    model.graph.node.append(onnx.helper.make_node("Tile", ["image", "repeats"], ["tiled"], name="tile"))
    expected = "uses the operator 'Tile' (node 'tile'), which this kfdeploy never exports"
    with pytest.raises(KfError, match=re.escape(expected)):
        if writer == "export":
            check_graph(model, "trunk.onnx")
        else:
            _check_interface(model, model, "trunk")


def test_manifest_describes_input_producer_labels_and_parity(bundle):
    m = manifest_json(bundle)
    assert m["format"] == "kfdeploy-bundle" and m["format_version"] == 2
    assert {"kfdeploy", "torch", "onnx", "onnxruntime", "opset"} <= set(m["producer"])
    assert m["input"]["shape"] == ["batch", 1, 64, 64] and m["input"]["dtype"] == "float32"
    assert m["tasks"]["shape"]["labels"] == ["square", "ellipse", "heart"]
    for record in [m["trunk"], *m["tasks"].values()]:
        assert len(record["sha256"]) == 64
        assert record["parity"]["images"] == 256
        assert record["parity"]["max_abs_err"] <= PARITY_MAX_ABS_ERR
    for task in m["tasks"].values():
        assert task["trunk_fingerprint"] == m["trunk"]["fingerprint"]
        assert task["parity"]["argmax_agreement"] >= 0.999
        assert 0.0 <= task["heldout_accuracy"] <= 1.0


PLAIN_ORT = """
import sys, numpy as np, onnxruntime as ort
bundle, images = sys.argv[1], np.load(sys.argv[2])
trunk = ort.InferenceSession(bundle + "/trunk.onnx", providers=["CPUExecutionProvider"])
task = ort.InferenceSession(bundle + "/tasks/scale.onnx", providers=["CPUExecutionProvider"])
common = trunk.run(None, {"image": images})[0]
np.save(sys.argv[3], task.run(None, {"image": images, "common": common})[0])
assert not [m for m in sys.modules if m.startswith(("kfdeploy", "torch"))]
"""


def test_exported_files_run_in_plain_onnxruntime_and_match_pytorch(bundle, factor_run, tmp_path):
    images, _ = SpritesSource().heldout(64, offset=1000)
    np.save(tmp_path / "in.npy", images.numpy())
    subprocess.run([sys.executable, "-c", PLAIN_ORT, str(bundle), str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                   check=True, cwd=tmp_path)
    model, _ = load_factor_run(factor_run)
    with torch.no_grad():
        expected = model(images)["scale"].numpy()
    got = np.load(tmp_path / "out.npy")
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_task_graph_runs_its_code_layer_folded_into_its_head(bundle, factor_run):
    """head(common + mu(feature)) is linear in both: the graph ends in one Gemm on [common,
    feature], and the code layer's matrix is not in the file (its answers: the test above)."""
    model, _ = load_factor_run(factor_run)
    code_layer = model.tasks["scale"].tsn.fc[-1].weight
    graph = onnx.load(str(bundle / "tasks" / "scale.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    gemm = producers[graph.output[0].name]
    assert gemm.op_type == "Gemm" and producers[gemm.input[0]].op_type == "Concat"
    assert producers[gemm.input[0]].input[0] == "common"
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    assert shapes[gemm.input[1]] == [TASK_CLASSES["scale"], model.config.feature_dim + code_layer.shape[1]]
    assert list(code_layer.shape) not in shapes.values()


def test_verify_passes_on_a_good_bundle_and_its_archive(bundle, capsys):
    assert main(["verify", str(bundle)]) == 0
    assert main(["verify", str(bundle) + ".tar.gz"]) == 0
    assert "verified" in capsys.readouterr().out


def test_export_and_verify_print_how_long_they_took(factor_run, tmp_path, capsys):
    # The export and verify timings quoted in docs/export.md are what these lines say.
    out = tmp_path / "timed"
    assert main(["export", str(factor_run), "--out", str(out), "--tasks", "shape"]) == 0
    assert re.search(rf"bundle written to {re.escape(str(out))} in \d+\.\d s$", capsys.readouterr().out.strip())
    assert main(["verify", str(out)]) == 0
    assert re.search(rf"bundle {re.escape(str(out))} verified in \d+\.\d s$", capsys.readouterr().out.strip())


def test_a_run_in_a_folder_whose_name_holds_a_tab_exports_a_bundle_its_reader_accepts(factor_run, tmp_path, capsys):
    # Paths on disk may hold control characters; a manifest may not (readers print it), so
    # the run's path is stored escaped rather than making a bundle nothing can open.
    run = tmp_path / "run\tone"
    shutil.copytree(factor_run, run)
    out = tmp_path / "tabbed"
    assert main(["export", str(run), "--out", str(out), "--tasks", "shape"]) == 0
    assert manifest_json(out)["source"]["run"].endswith("run\\tone")
    assert main(["inspect", str(out)]) == 0, capsys.readouterr().err


def test_inspect_shows_tasks_labels_and_checksums(bundle, capsys):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "square, ellipse, heart" in out and "opset 20" in out and "checksums: all" in out


def test_corrupted_module_is_refused_naming_the_file(bundle_copy, capsys):
    data = bytearray((bundle_copy / "tasks" / "scale.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "tasks" / "scale.onnx").write_bytes(bytes(data))
    cli_fails(["verify", str(bundle_copy)], capsys, "checksum mismatch for tasks/scale.onnx")


def test_manifest_of_a_newer_format_version_is_refused(bundle_copy, capsys):
    manifest = manifest_json(bundle_copy)
    manifest["format_version"] = 3
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    cli_fails(["inspect", str(bundle_copy)], capsys, "format version 3, newer than this kfdeploy reads (up to 2); upgrade kfdeploy")


@pytest.mark.parametrize("path, reason", [
    ("../outside.onnx", "climbs out with '..'"),
    ("/etc/passwd", "it is absolute"),
    ("tasks/../../outside.onnx", "climbs out with '..'"),
])
def test_manifest_paths_that_escape_the_bundle_are_refused(bundle_copy, capsys, path, reason):
    manifest = manifest_json(bundle_copy)
    manifest["tasks"]["shape"]["file"] = path
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    cli_fails(["inspect", str(bundle_copy)], capsys, reason)


def test_a_symlinked_module_is_not_followed(bundle_copy, tmp_path, capsys):
    target = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle_copy / "tasks" / "shape.onnx", target)
    (bundle_copy / "tasks" / "shape.onnx").unlink()
    (bundle_copy / "tasks" / "shape.onnx").symlink_to(target)
    cli_fails(["inspect", str(bundle_copy)], capsys, "symbolic link")


def _archive_with(tmp_path, member: tarfile.TarInfo, payload: bytes = b"x"):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return archive


@pytest.mark.parametrize("name, kind, reason", [
    ("../escape.txt", tarfile.REGTYPE, "climbs out"),
    ("{tmp}/absolute.txt", tarfile.REGTYPE, "absolute"),
    ("link", tarfile.SYMTYPE, "link or special file"),
])
def test_archive_members_that_escape_the_bundle_are_refused(tmp_path, monkeypatch, capsys, name, kind, reason):
    # Archives are extracted into a new folder under the temporary folder: make that one of
    # this test's own, so that the places an escaping member would land are known and empty.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    member = tarfile.TarInfo(name.format(tmp=tmp_path))
    member.type = kind
    member.size = 1 if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        member.linkname = "/etc/passwd"
    archive = _archive_with(tmp_path, member)
    landed = {"../escape.txt": temp / "escape.txt", "{tmp}/absolute.txt": tmp_path / "absolute.txt"}.get(name)
    if landed is not None:  # the test's premise: a trusting extraction writes exactly there
        with tarfile.open(archive) as tar:
            trusting = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}  # < 3.11.4: always
            tar.extractall(tempfile.mkdtemp(), **trusting)
        assert landed.read_bytes() == b"x"
        landed.unlink()
        shutil.rmtree(temp)
        temp.mkdir()
    err = cli_fails(["inspect", str(archive)], capsys, reason)
    assert "refusing to extract" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "temp"]
    assert list(temp.iterdir()) == [], "the extraction folder of a refused archive is removed"


def test_adding_a_task_keeps_the_trunk_file_untouched(factor_run, tmp_path):
    out = tmp_path / "partial"
    assert main(["export", str(factor_run), "--out", str(out), "--tasks", "shape"]) == 0
    trunk_before = (out / "trunk.onnx").stat()
    assert main(["export", str(factor_run), "--out", str(out), "--tasks", "pos_x", "--into"]) == 0
    trunk_after = (out / "trunk.onnx").stat()
    assert (trunk_before.st_ino, trunk_before.st_mtime_ns) == (trunk_after.st_ino, trunk_after.st_mtime_ns)
    assert set(manifest_json(out)["tasks"]) == {"shape", "pos_x"}
    assert main(["verify", str(out)]) == 0


def test_a_task_from_another_trunk_is_refused(bundle_copy, teacher_run, tmp_path, capsys):
    other = tmp_path / "other-kf"
    assert main(["factorize", "--teacher", str(teacher_run), "--out", str(other), "--steps", "2",
                 "--batch-size", "8", "--eval-images", "64", "--tasks", "shape", "--seed", "7"]) == 0
    capsys.readouterr()
    before = manifest_json(bundle_copy)
    cli_fails(["export", str(other), "--out", str(bundle_copy), "--into"], capsys, "trained with a different trunk")
    assert manifest_json(bundle_copy) == before


def _kill_export_mid_way(factor_run, out):
    """`kfdeploy export` into `out`, SIGKILLed as it starts exporting a task, after the trunk."""
    staging = []
    kill_at(["export", str(factor_run), "--out", str(out)], "exporting task",
            before_kill=lambda: staging.extend(out.parent.glob(f".{out.name}.staging-*")))
    assert len(staging) == 1 and (staging[0] / "trunk.onnx").is_file(), "the export was writing its staging folder"


@pytest.mark.slow
def test_an_interrupted_export_leaves_the_previous_bundle_whole(bundle_copy, factor_run):
    before = manifest_json(bundle_copy)
    _kill_export_mid_way(factor_run, bundle_copy)
    assert list(bundle_copy.parent.glob(".copy.staging-*")), "a killed export leaves its staging folder"
    assert manifest_json(bundle_copy) == before
    Bundle.open(bundle_copy)  # every checksum still matches
    assert run_cli("export", str(factor_run), "--out", str(bundle_copy), "--tasks", "shape").returncode == 0
    assert not list(bundle_copy.parent.glob(".copy.staging-*")), "the next export clears a dead one's staging"


def test_an_interrupted_first_export_leaves_nothing(factor_run, tmp_path):
    out = tmp_path / "fresh"
    _kill_export_mid_way(factor_run, out)
    assert not out.exists()


def test_export_errors_name_the_problem(factor_run, tmp_path, capsys):
    cli_fails(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")], capsys, "no factorized run at")
    cli_fails(["export", str(factor_run), "--out", str(tmp_path / "b"), "--tasks", "colour"], capsys, "unknown task 'colour'")
    cli_fails(["export", str(factor_run), "--out", "/proc/kfdeploy-test/b"], capsys, "not writable")
    cli_fails(["export", str(factor_run), "--out", str(tmp_path / "b"), "--profile", "nope"], capsys, "unknown export profile 'nope'")
    assert not (tmp_path / "b").exists()


def test_profiles_set_opset_and_batch_range(factor_run, tmp_path):
    assert {p: load_profile(p).opset for p in ("cpu-fp32", "gpu-fp16", "jetson-fp16")} == {"cpu-fp32": 20, "gpu-fp16": 18, "jetson-fp16": 17}
    out = tmp_path / "jetson"
    assert main(["export", str(factor_run), "--out", str(out), "--tasks", "shape", "--profile", "jetson-fp16"]) == 0
    model = onnx.load(str(out / "tasks" / "shape.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert manifest_json(out)["input"]["batch"] == {"min": 1, "opt": 4, "max": 32}


def test_build_engines_without_tensorrt_names_the_missing_package(bundle_copy, capsys):
    pytest.importorskip("kfdeploy.bundling.tensorrt")
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    cli_fails(["build-engines", str(bundle_copy)], capsys, "'tensorrt'")


def test_check_trt_passes_every_exported_graph(bundle, capsys):
    assert main(["check-trt", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == 6 and "within what TensorRT's ONNX parser accepts" in out


@pytest.mark.parametrize("content, message", [
    ("name = 'x'\nopset = ", "is invalid"),
    ("name = 'x'\n[batch]\nmin = 8\nmax = 4\n", "batch needs 1 <= min <= opt <= max"),
    ("name = 'x'\nprecision = 'int8'\n", "precision must be fp32 or fp16"),
    ("name = 'x'\ncolour = 'red'\n", "is invalid"),
])
def test_a_broken_profile_file_is_refused_with_its_problem(factor_run, tmp_path, capsys, content, message):
    profile = tmp_path / "mine.toml"
    profile.write_text(content)
    cli_fails(["export", str(factor_run), "--out", str(tmp_path / "b"), "--profile", str(profile)], capsys, message)
    assert not (tmp_path / "b").exists()


def test_re_exporting_a_task_into_a_bundle_writes_a_new_file_not_the_live_one(bundle_copy, factor_run, tmp_path):
    live = bundle_copy / "tasks" / "shape.onnx"
    witness = tmp_path / "old-shape.onnx"
    os.link(live, witness)  # the inode the live bundle used before the export
    before = (witness.stat().st_mtime_ns, witness.read_bytes())
    assert main(["export", str(factor_run), "--out", str(bundle_copy), "--tasks", "shape", "--into"]) == 0
    assert live.stat().st_ino != witness.stat().st_ino
    assert (witness.stat().st_mtime_ns, witness.read_bytes()) == before
    assert main(["verify", str(bundle_copy)]) == 0


def test_in_place_activations_export_out_of_place_and_are_restored(tmp_path):
    """timm's ReLU6(inplace=True) is exported out of place (torch.export decomposes in-place
    hardtanh_ slowly) and left in place afterwards; the graph computes the same values."""
    from kfdeploy.bundling.export import _quiet_export
    from onnxruntime import InferenceSession

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6(inplace=True), torch.nn.Conv2d(4, 2, 1), torch.nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 8, 8) * 4
    path = tmp_path / "m.onnx"
    _quiet_export(module, (x,), path, ["x"], ["y"], load_profile("cpu-fp32"))
    assert [m.inplace for m in module if hasattr(m, "inplace")] == [True, True]
    got = InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module.eval()(x).numpy(), atol=1e-6)
    assert "Clip" in {node.op_type for node in onnx.load(str(path)).graph.node}


class _OnePixelTail(torch.nn.Module):
    """A network whose last maps are one pixel, as a ResNet's or MobileNet's at 32x32."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 2)  # 2x2 -> 1x1, a kernel of more than one tap: stays
        self.inner = torch.nn.Conv2d(8, 8, 1)  # one pixel, but a residual reads it: stays
        self.last = torch.nn.Conv2d(8, 16, 1)  # one pixel, through an activation into the pooling: a Gemm
        self.head = torch.nn.Linear(16, 3)

    def forward(self, image):
        features = torch.relu(self.stem(image))
        features = features + self.inner(features)
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.relu6(self.last(features)), 1)
        return self.head(torch.flatten(pooled, 1))


def test_a_tail_of_one_pixel_maps_exports_as_matrix_products_with_the_same_answers(tmp_path):
    from kfdeploy.bundling.export import _quiet_export
    from onnxruntime import InferenceSession

    torch.manual_seed(0)
    module, x = _OnePixelTail().eval(), torch.rand(5, 3, 2, 2)
    path = tmp_path / "tail.onnx"
    _quiet_export(module, (x[:2],), path, ["image"], ["logits"], load_profile("cpu-fp32"))
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2 and not {"ReduceMean", "GlobalAveragePool"} & set(ops), ops
    got = InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-6)
