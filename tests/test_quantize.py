"""Reduced-precision variants (`kfdeploy quantize`): made, recorded, composed, guarded, checked."""
import json
import shutil

import numpy as np
import pytest

from conftest import cli_fails

# Calibration images for the tests: half the default 512, enough for SimpleConv's ranges.
IMAGES = 256
# An int8 composition must give the fp32 composition's answer on at least this share of the
# held-out images whose fp32 answer is most decided: the DECIDED_SHARE of each task's images
# with its top-1 furthest ahead of the runner-up. The test-sized bundle's modules sit near
# chance (shape 0.45 for 3 classes, orientation 0.02 for 40), so most of their answers are
# near-ties that any rounding flips, and how far apart logits sit differs by task (orientation's
# top two are within 0.19 on three images in four; scale's int8 logits are off by 1.5 at the
# median): a share, not one margin, judges every task on its own clear answers. Over all images
# agreement is 0.72-0.95, on the decided quarter 0.98-1.0 (MinMax, 256 images).
MIN_AGREEMENT = 0.95
DECIDED_SHARE = 0.25


@pytest.fixture(scope="module")
def int8_bundle(bundle, tmp_path_factory):
    from kfdeploy.bundling.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("quantized") / "sprites"
    shutil.copytree(bundle, out)
    quantize_bundle(out, "int8", images=IMAGES, max_drop=0.05, progress=lambda line: None)
    return out


def heldout(count=512):
    from kfdeploy.training.data import SpritesSource

    images, labels = SpritesSource().heldout(count)
    return images.numpy(), {t: v.numpy() for t, v in labels.items()}


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_int8_variants_are_recorded_for_every_module(int8_bundle):
    m = manifest(int8_bundle)
    for name, record in [("trunk", m["trunk"]), *m["tasks"].items()]:
        variant = record["variants"]["int8"]
        assert variant["precision"] == "int8" and variant.get("fallback") is None
        assert variant["file"].startswith("variants/int8/")
        assert variant["method"]["calibration"] == "minmax" and variant["method"]["images"] == IMAGES
        assert variant["method"]["format"] == "QDQ"
        if name != "trunk":
            assert 0.5 <= variant["agreement"] <= 1
            assert variant["fp32_heldout_accuracy"] - variant["heldout_accuracy"] <= 0.05
            assert variant["images"] == 2048


def test_int8_assembly_agrees_with_fp32(int8_bundle):
    import kfdeploy

    images, labels = heldout()
    fp32 = kfdeploy.load(int8_bundle, log=lambda line: None)
    int8 = kfdeploy.load(int8_bundle, precision="int8", log=lambda line: None)
    assert "int8" in int8.describe()
    a, b = fp32(images, logits=True), int8(images, logits=True)
    for task in fp32.tasks:
        top_two = np.sort(a[task], axis=1)[:, -2:]
        lead = top_two[:, 1] - top_two[:, 0]
        decided = lead >= np.quantile(lead, 1 - DECIDED_SHARE)
        assert decided.sum() >= DECIDED_SHARE * len(lead) and lead[decided].min() > 0, (task, "no clear answers to judge")
        agreement = (a[task].argmax(1) == b[task].argmax(1))[decided].mean()
        assert agreement >= MIN_AGREEMENT, (task, agreement)
        assert not np.array_equal(a[task], b[task])  # really another graph


def test_int8_composition_is_a_valid_graph_with_float_interface(int8_bundle, tmp_path):
    import onnx

    import kfdeploy

    model = kfdeploy.load(int8_bundle, tasks=["shape", "scale"], precision="int8", log=lambda line: None)
    fused = onnx.load(model.save_fused(tmp_path / "int8.onnx"))
    onnx.checker.check_model(fused, full_check=True)
    assert [i.name for i in fused.graph.input] == ["image"]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*fused.graph.input, *fused.graph.output])
    assert any(node.op_type == "QuantizeLinear" for node in fused.graph.node)


def test_tampered_int8_file_is_refused(int8_bundle, tmp_path):
    import kfdeploy
    from kfdeploy.errors import KfError

    copy = tmp_path / "b"
    shutil.copytree(int8_bundle, copy)
    graph = copy / "variants" / "int8" / "tasks" / "shape.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(KfError, match="checksum mismatch for variants/int8/tasks/shape.onnx"):
        kfdeploy.load(copy, precision="int8", log=lambda line: None)


def test_bundle_without_int8_names_the_quantize_command(bundle):
    import kfdeploy
    from kfdeploy.errors import KfError

    with pytest.raises(KfError, match=r"no int8 variant of the trunk; make it with `kfdeploy quantize .* --int8`"):
        kfdeploy.load(bundle, precision="int8", log=lambda line: None)


def test_precision_other_than_fp32_needs_onnxruntime(int8_bundle):
    import kfdeploy
    from kfdeploy.errors import KfError

    with pytest.raises(KfError, match="onnxruntime backend only"):
        kfdeploy.load(int8_bundle, backend="torch", precision="int8", log=lambda line: None)


def test_accuracy_guard_fails_with_numbers_and_leaves_bundle_unchanged(bundle, tmp_path):
    from kfdeploy.errors import KfError
    from kfdeploy.bundling.quantize import quantize_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    before = (copy / "manifest.json").read_bytes()
    # A negative allowance: any task "loses too much", so the guard must fire.
    with pytest.raises(KfError, match=r"int8 loses more than -100 point\(s\) of held-out accuracy on shape.*--allow-mixed"):
        quantize_bundle(copy, "int8", tasks=["shape"], images=64, max_drop=-1.0, progress=lambda line: None)
    assert (copy / "manifest.json").read_bytes() == before
    assert not (copy / "variants").exists()


def test_allow_mixed_keeps_fp32_for_a_task_that_loses(bundle, tmp_path):
    import kfdeploy
    from kfdeploy.bundling.quantize import quantize_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    records = quantize_bundle(copy, "int8", tasks=["shape"], images=64, max_drop=-1.0, allow_mixed=True,
                              progress=lambda line: None)
    m = manifest(copy)
    shape = m["tasks"]["shape"]
    assert records["shape"]["fallback"] == "fp32"
    assert (shape["variants"]["int8"]["file"], shape["variants"]["int8"]["sha256"]) == (shape["file"], shape["sha256"])
    assert m["trunk"]["variants"]["int8"].get("fallback") is None
    model = kfdeploy.load(copy, tasks=["shape"], precision="int8", log=lambda line: None)
    assert model(heldout(8)[0])["shape"].shape == (8, 3)


def test_quantizing_a_task_later_keeps_the_trunk_variant(int8_bundle, tmp_path):
    from kfdeploy.bundling.quantize import quantize_bundle

    copy = tmp_path / "b"
    shutil.copytree(int8_bundle, copy)
    before = manifest(copy)
    quantize_bundle(copy, "int8", tasks=["scale"], images=64, method="percentile", max_drop=0.05, progress=lambda line: None)
    after = manifest(copy)
    assert after["trunk"]["variants"] == before["trunk"]["variants"]
    assert after["tasks"]["shape"]["variants"] == before["tasks"]["shape"]["variants"]
    assert after["tasks"]["scale"]["variants"]["int8"]["method"]["calibration"] == "percentile"


def test_cli_inspect_shows_variants(int8_bundle, capsys):
    from kfdeploy.cli import main

    assert main(["inspect", str(int8_bundle)]) == 0
    out = capsys.readouterr().out
    assert "precisions: fp32, int8" in out
    assert "shape        int8" in out and "agreement" in out


def test_cli_quantize_refuses_an_archive(bundle, capsys):
    archive = bundle.with_name(bundle.name + ".tar.gz")
    cli_fails(["quantize", str(archive), "--int8"], capsys, "quantize works on a bundle folder")


def test_cli_run_with_int8(int8_bundle, tmp_path, capsys):
    from kfdeploy.cli import main

    np.save(tmp_path / "batch.npy", heldout(2)[0])
    assert main(["run", str(int8_bundle), str(tmp_path / "batch.npy"), "--precision", "int8", "--tasks", "shape"]) == 0
    assert "shape=" in capsys.readouterr().out


def test_fp16_variants_keep_float32_interface_and_agree(int8_bundle, tmp_path):
    import onnx

    import kfdeploy
    from kfdeploy.bundling.quantize import quantize_bundle

    copy = tmp_path / "b"
    shutil.copytree(int8_bundle, copy)
    quantize_bundle(copy, "fp16", tasks=["shape"], progress=lambda line: None)
    m = manifest(copy)
    assert m["tasks"]["shape"]["variants"]["fp16"]["agreement"] >= 0.99
    assert "int8" in m["trunk"]["variants"]  # the other precision is kept
    model = kfdeploy.load(copy, tasks=["shape"], precision="fp16", log=lambda line: None)
    fused = onnx.load(model.save_fused(tmp_path / "fp16.onnx"))
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*fused.graph.input, *fused.graph.output])
    images = heldout(64)[0]
    fp32 = kfdeploy.load(copy, tasks=["shape"], log=lambda line: None)
    assert (model(images)["shape"].argmax(1) == fp32(images)["shape"].argmax(1)).mean() >= 0.99
