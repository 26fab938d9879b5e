import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from kfdeploy.errors import KfError
from kfdeploy.bundling.tensorrt import (
    build_engine, build_torch_tensorrt, device_signature, load_engine, require_tensorrt, require_torch_tensorrt,
    signature_slug,
)
from test_trt_check import TinyNet, export_tiny_net

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
without_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
without_torch_tensorrt = pytest.mark.skipif(HAS_TORCH_TENSORRT, reason="Torch-TensorRT is installed here")
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installable here (NVIDIA index unreachable)")
needs_torch_tensorrt = pytest.mark.skipif(
    not HAS_TORCH_TENSORRT, reason="Torch-TensorRT is not installable here (NVIDIA index unreachable)")

SHAPES = {"image": ((1, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16))}
ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0.30", "cuda": "12.6"}


# -- without TensorRT (the case where kfdeploy is developed) -----------------------------

@without_tensorrt
@pytest.mark.parametrize("call", [
    require_tensorrt,
    device_signature,
    lambda: build_engine("trunk.onnx", "trunk.plan", SHAPES, "fp16"),
    lambda: load_engine("trunk.plan"),
])
def test_tensorrt_entry_points_name_the_missing_package(call):
    with pytest.raises(KfError, match=r"TensorRT is not installed \(Python package 'tensorrt'\).*target device") as info:
        call()
    assert len(str(info.value).splitlines()) == 1


@without_torch_tensorrt
@pytest.mark.parametrize("call", [
    require_torch_tensorrt,
    lambda: build_torch_tensorrt(TinyNet(), list(SHAPES.values()), "fp16", "tiny.ep"),
])
def test_torch_tensorrt_entry_points_name_the_missing_package(call):
    with pytest.raises(KfError, match=r"Torch-TensorRT is not installed \(Python package 'torch-tensorrt'\)"):
        call()


@without_tensorrt
def test_a_tensorrt_that_does_not_import_is_not_called_missing(tmp_path, monkeypatch):
    broken = tmp_path / "tensorrt"
    broken.mkdir()
    (broken / "__init__.py").write_text("import tensorrt_libs_that_are_not_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KfError, match=r"TensorRT is installed but cannot be imported .*tensorrt_libs_that_are_not_here"):
        require_tensorrt()


@pytest.mark.parametrize("precision", ["int8", "bf16", "FP16"])
def test_precisions_other_than_fp32_and_fp16_are_refused_before_looking_for_tensorrt(precision):
    with pytest.raises(KfError, match=f"precision '{precision}' is not supported: use fp32 or fp16"):
        build_engine("trunk.onnx", "trunk.plan", SHAPES, precision)
    with pytest.raises(KfError, match="use fp32 or fp16"):
        build_torch_tensorrt(TinyNet(), list(SHAPES.values()), precision, "tiny.ep")


def test_signature_slug_is_short_and_readable():
    assert signature_slug(ORIN) == "orin-sm87-trt10.3"
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.15.1.29", "cuda": "13.0"}
    assert signature_slug(h100) == "h100-80gb-hbm3-sm90-trt10.15"


@pytest.mark.parametrize("sig", [
    {"gpu": "../../etc/passwd\0 ☃ NVIDIA GeForce RTX 4090/Ti", "compute_capability": "8.9/..", "tensorrt": "10.3; rm"},
    {"gpu": "x" * 500, "compute_capability": 8.6, "tensorrt": None, "cuda": None},
    {},
])
def test_signature_slug_is_filename_safe_for_any_signature(sig):
    slug = signature_slug(sig)
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", slug) and ".." not in slug and len(slug) <= 64, slug
    assert signature_slug(dict(sig)) == slug  # stable: engines are matched by it


def test_importing_the_modules_pulls_in_neither_torch_nor_tensorrt():
    code = "import sys, kfdeploy.bundling.tensorrt, kfdeploy.bundling.trt_check; print(sorted({'torch', 'tensorrt', 'onnx'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- with TensorRT (on the target device) -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ONNX path, the PyTorch module it was exported from, test images, ONNX Runtime's answer)."""
    import onnxruntime as ort

    path = tmp_path_factory.mktemp("tensorrt") / "tiny.onnx"
    model = export_tiny_net(path)
    images = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    return path, model, images, reference


@needs_tensorrt
def test_engine_matches_onnxruntime_in_fp32(tiny, tmp_path):
    path, _, images, reference = tiny
    cache = tmp_path / "timing.cache"
    build_engine(path, tmp_path / "tiny.plan", SHAPES, "fp32", timing_cache_path=cache)
    assert cache.stat().st_size > 0
    engine = load_engine(tmp_path / "tiny.plan")
    assert engine.inputs == ["image"] and engine.outputs == ["logits"]
    logits = engine.run({"image": images})["logits"]
    # TensorRT may run fp32 convolutions and matrix products in TF32 (10-bit mantissa).
    np.testing.assert_allclose(logits, reference, rtol=1e-2, atol=1e-2)
    assert (logits.argmax(1) == reference.argmax(1)).all()
    # A rebuild with the cache it left still builds an engine that agrees.
    build_engine(path, tmp_path / "again.plan", SHAPES, "fp32", timing_cache_path=cache)
    np.testing.assert_allclose(load_engine(tmp_path / "again.plan").run({"image": images})["logits"], logits, atol=1e-2)


@needs_tensorrt
def test_fp16_engine_agrees_with_onnxruntime(tiny, tmp_path):
    path, _, images, reference = tiny
    try:
        build_engine(path, tmp_path / "tiny.plan", SHAPES, "fp16")
    except KfError as exc:
        pytest.skip(str(exc))  # a GPU without fast fp16, or TensorRT 11
    logits = load_engine(tmp_path / "tiny.plan").run({"image": images})["logits"]
    np.testing.assert_allclose(logits, reference, rtol=5e-2, atol=5e-2)


@needs_tensorrt
def test_batches_outside_the_profile_are_refused(tiny, tmp_path):
    path, _, images, _ = tiny
    build_engine(path, tmp_path / "tiny.plan", SHAPES, "fp32")
    engine = load_engine(tmp_path / "tiny.plan")
    with pytest.raises(KfError, match="outside the shapes the engine was built for"):
        engine.run({"image": np.zeros((9, 1, 16, 16), np.float32)})
    with pytest.raises(KfError, match="takes inputs"):
        engine.run({"pixels": images})


@needs_tensorrt
def test_shapes_must_name_the_graph_inputs(tiny, tmp_path):
    with pytest.raises(KfError, match=r"has inputs \['image'\]"):
        build_engine(tiny[0], tmp_path / "tiny.plan", {"pixels": SHAPES["image"]}, "fp32")


@needs_tensorrt
def test_device_signature_describes_this_gpu():
    sig = device_signature()
    assert set(sig) == {"gpu", "compute_capability", "tensorrt", "cuda"}
    assert re.fullmatch(r"\d+\.\d+", sig["compute_capability"]) and sig["gpu"]
    sm, trt = sig["compute_capability"].replace(".", ""), ".".join(sig["tensorrt"].split(".")[:2])
    assert signature_slug(sig).endswith(f"-sm{sm}-trt{trt}")


@needs_torch_tensorrt
def test_torch_tensorrt_module_matches_pytorch(tiny, tmp_path):
    import torch_tensorrt

    _, model, images, _ = tiny
    build_torch_tensorrt(model, list(SHAPES.values()), "fp32", tmp_path / "tiny.ep")
    loaded = torch_tensorrt.load(str(tmp_path / "tiny.ep")).module()
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
        got = loaded(torch.from_numpy(images).cuda()).cpu().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)
