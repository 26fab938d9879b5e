"""The runtime: compose trunk + selected tasks, thread-safe, validated, torch-free."""
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest

import kfdeploy
from kfdeploy import KfError, runtime
from kfdeploy.bundle import Bundle
from kfdeploy.cli import main
from kfdeploy.data import TASK_NAMES, render

QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def images():
    factors = np.random.default_rng(0).integers(0, [3, 6, 40, 32, 32], size=(32, 5))
    return render(factors).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def model(bundle):
    return kfdeploy.load(bundle, tasks=["shape", "scale"], **QUIET)


def test_scores_are_probabilities_per_selected_task_with_labels(model, images):
    out = model(images)
    assert set(out) == {"shape", "scale"}
    assert out["shape"].shape == (32, 3) and out["scale"].shape == (32, 6)
    np.testing.assert_allclose(out["shape"].sum(1), 1.0, rtol=1e-5)
    assert model.labels("shape") == ["square", "ellipse", "heart"]
    top = model.top(out, k=2)["shape"][0]
    assert len(top) == 2 and top[0][0] in model.labels("shape") and top[0][1] >= top[1][1]


def test_logits_on_request_match_the_probabilities(model, images):
    logits = model(images, logits=True)["scale"]
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(model(images)["scale"], expected, rtol=1e-4, atol=1e-6)


def test_the_trunk_runs_once_per_call_however_many_tasks(bundle, images):
    model = kfdeploy.load(bundle, **QUIET)
    calls = []
    trunk_run = model._trunk.run
    model._trunk.run = lambda feeds: calls.append(1) or trunk_run(feeds)
    model(images)
    assert len(model.tasks) == 5 and len(calls) == 1


def test_tasks_are_added_and_removed_without_reloading_the_trunk(bundle, images):
    model = kfdeploy.load(bundle, tasks=["shape"], **QUIET)
    trunk_session = model._trunk.session
    model.add_task("pos_x")
    model.remove_task("shape")
    assert model.tasks == ["pos_x"] and model._trunk.session is trunk_session
    assert set(model(images)) == {"pos_x"}


def test_backends_agree_within_the_export_tolerance(bundle, images):
    reference = kfdeploy.load(bundle, backend="onnxruntime", **QUIET)(images, logits=True)
    torch_out = kfdeploy.load(bundle, backend="torch", **QUIET)(images, logits=True)
    lines = []
    tensorrt_out = kfdeploy.load(bundle, backend="tensorrt", log=lines.append)(images, logits=True)
    assert any("falling back to onnxruntime" in line for line in lines)
    for task in TASK_NAMES:
        assert np.abs(torch_out[task] - reference[task]).max() <= 1e-4
        assert (torch_out[task].argmax(1) == reference[task].argmax(1)).all()
        np.testing.assert_array_equal(tensorrt_out[task], reference[task])


GPU_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("installed, gpu, expected, why", [
    (GPU_EPS, True, GPU_EPS, "a CUDA GPU is visible"),
    (GPU_EPS, False, ["CPUExecutionProvider"], "installed, but no CUDA GPU is visible"),
    (GPU_EPS[1:], True, GPU_EPS[1:], "a CUDA GPU is visible"),
    (["CPUExecutionProvider"], True, ["CPUExecutionProvider"], "no CUDA or TensorRT provider is installed"),
])
def test_providers_follow_what_is_installed_and_whether_a_gpu_is_there(monkeypatch, installed, gpu, expected, why):
    # What this machine cannot show for real (onnxruntime-gpu, a GPU), faked at the two
    # places the choice asks: the installed providers and the CUDA driver.
    monkeypatch.setattr(ort, "get_available_providers", lambda: installed)
    monkeypatch.setattr(runtime, "_gpu_visible", lambda: gpu)
    providers, line = runtime.choose_providers()
    assert providers == expected
    assert why in line and ", ".join(expected) in line


def test_the_tensorrt_ep_gets_an_engine_cache_and_each_modules_batch_profile(bundle, monkeypatch, tmp_path):
    # The EP itself cannot run here: record what each session is asked for, run it on the CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_EPS)
    monkeypatch.setattr(runtime, "_gpu_visible", lambda: True)
    monkeypatch.setenv("KFDEPLOY_CACHE", str(tmp_path / "cache"))
    asked, real_session = {}, ort.InferenceSession

    def recording_session(path, options, providers):
        asked[path.rsplit("/", 1)[-1]] = providers
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    lines = []
    kfdeploy.load(bundle, tasks=["shape"], log=lines.append)
    (trt, trunk_options), *rest = asked["trunk.onnx"]
    (_, task_options), *_ = asked["shape.onnx"]
    assert trt == "TensorrtExecutionProvider" and rest == GPU_EPS[1:]
    manifest = Bundle.open(bundle).manifest
    batch, width = manifest["input"]["batch"], manifest["trunk"]["output"]["width"]
    assert trunk_options["trt_profile_min_shapes"] == f"image:{batch['min']}x1x64x64"
    assert trunk_options["trt_profile_max_shapes"] == f"image:{batch['max']}x1x64x64"
    assert task_options["trt_profile_opt_shapes"] == f"image:{batch['opt']}x1x64x64,common:{batch['opt']}x{width}"
    cache = trunk_options["trt_engine_cache_path"]
    assert trunk_options["trt_engine_cache_enable"] and cache.startswith(str(tmp_path / "cache")) and any(cache in line for line in lines)
    assert trunk_options["trt_fp16_enable"] is False  # the bundle's profile is fp32


def test_an_unwritable_tensorrt_cache_is_refused_with_the_setting_that_fixes_it(bundle, monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_EPS)
    monkeypatch.setattr(runtime, "_gpu_visible", lambda: True)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KFDEPLOY_CACHE", str(tmp_path / "file"))  # a file where the folder should go
    with pytest.raises(KfError, match="cannot make the TensorRT engine cache .*set KFDEPLOY_CACHE to a writable folder"):
        kfdeploy.load(bundle, tasks=["shape"], **QUIET)


def test_asking_for_a_provider_that_is_not_installed_names_the_installed_ones():
    with pytest.raises(KfError, match="CUDAExecutionProvider.*not available here; available: .*CPUExecutionProvider"):
        runtime.choose_providers(["CUDAExecutionProvider"])


def test_the_tensorrt_backend_takes_only_engines_built_for_this_gpu(monkeypatch):
    from kfdeploy import tensorrt as trt_backend

    orin = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0.30", "cuda": "12.6"}
    h100 = {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.3.0.30", "cuda": "12.6"}
    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_backend, "device_signature", lambda: orin)
    engine = lambda module, device, builder="tensorrt": {"module": module, "device": device, "builder": builder, "file": f"{module}.plan"}  # noqa: E731
    manifest = {"engines": [engine("trunk", h100), engine("shape", h100), engine("trunk", orin), engine("shape", orin),
                            engine("scale", orin, builder="torch-tensorrt")]}
    engines, why = runtime.engines_for_this_device(manifest)
    assert why == "" and set(engines) == {"trunk", "shape"} and all(e["device"] == orin for e in engines.values())
    engines, why = runtime.engines_for_this_device({"engines": manifest["engines"][:2]})
    assert engines is None and "no TensorRT engine for this device (orin-sm87-trt10.3)" in why and "kfdeploy build-engines" in why


def test_the_gpu_path_binds_inputs_once_and_keeps_common_on_the_device(bundle, images, monkeypatch):
    # On a GPU each call uploads the image once and the trunk's common stays on the device
    # (IOBinding). No GPU here: the same code runs with the CPU standing in for the device.
    reference = kfdeploy.load(bundle, **QUIET)(images, logits=True)
    monkeypatch.setattr(runtime, "io_device_for", lambda providers: "cpu")
    bound = kfdeploy.load(bundle, **QUIET)
    kept = bound._trunk.run_kept({"image": bound._place(images)})
    assert isinstance(kept, ort.OrtValue) and kept.device_name().lower() == "cpu"
    answers = bound(images, logits=True)
    for task, logits in reference.items():
        np.testing.assert_array_equal(answers[task], logits)
    assert bound._trunk.run({"image": images}).shape == (len(images), kept.shape()[1])  # numpy feeds still work


def test_the_fused_graph_runs_in_plain_onnxruntime_and_matches_the_assembly(model, images, tmp_path):
    path = model.save_fused(tmp_path / "shape_scale.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["shape", "scale"]
    fused = dict(zip(["shape", "scale"], session.run(None, {"image": images})))
    assembled = model(images, logits=True)
    for task in ("shape", "scale"):
        np.testing.assert_allclose(fused[task], assembled[task], atol=1e-5)


def test_importing_and_running_the_runtime_never_imports_torch(bundle):
    code = (
        "import sys, numpy as np, kfdeploy\n"
        f"model = kfdeploy.load({str(bundle)!r}, tasks=['shape'])\n"
        "model(np.zeros((2, 1, 64, 64), np.float32))\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_many_threads_get_the_same_answers_while_tasks_come_and_go(bundle, images):
    model = kfdeploy.load(bundle, tasks=["shape", "scale", "pos_x"], **QUIET)
    sizes = [1, 3, 8, 16, 32]
    reference = {n: model(images[:n]) for n in sizes}
    failures, stop = [], threading.Event()

    def caller(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            n = int(rng.choice(sizes))
            out = model(images[:n])
            for task in ("shape", "scale"):  # never removed
                if not np.array_equal(out[task], reference[n][task]):
                    failures.append((seed, n, task))
            if "pos_x" in out and not np.array_equal(out["pos_x"], reference[n]["pos_x"]):
                failures.append((seed, n, "pos_x"))

    def churn():
        while not stop.is_set():
            model.remove_task("pos_x")
            model.add_task("pos_x")

    churner = threading.Thread(target=churn)
    churner.start()
    callers = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    stop.set()
    churner.join()
    assert not failures, failures[:5]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 64, 64), np.float32), "rank 3"),
    (np.zeros((2, 1, 32, 32), np.float32), "must be 64x64 pixels"),
    (np.zeros((2, 3, 64, 64), np.float32), "must have 1 channel(s)"),
    (np.array([[["a"]]]), "must be numeric"),
    (np.full((1, 1, 64, 64), np.nan, np.float32), "NaN or infinite"),
    (np.full((1, 1, 64, 64), np.inf, np.float32), "NaN or infinite"),
    (np.full((1, 1, 64, 64), 255.0, np.float32), r"must lie in \[0, 1\].*got values from 255 to 255; scale them"),
    (np.full((1, 1, 64, 64), -0.5), r"must lie in \[0, 1\].*from -0.5 to -0.5"),
])
def test_bad_images_are_refused_with_a_clear_message(model, bad, message):
    with pytest.raises(KfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(bad)


def test_an_empty_batch_returns_empty_scores(model):
    out = model(np.zeros((0, 1, 64, 64), np.float32))
    assert out["shape"].shape == (0, 3) and out["scale"].shape == (0, 6)


def test_uint8_images_are_scaled_as_the_manifest_says(model, images):
    as_uint8 = (images * 255).round().astype(np.uint8)
    np.testing.assert_allclose(model(as_uint8)["shape"], model(images)["shape"], atol=1e-6)


def test_an_unknown_task_lists_the_available_ones(bundle, model):
    with pytest.raises(KfError, match="unknown task 'colour'.*available: shape, scale, orientation, pos_x, pos_y"):
        kfdeploy.load(bundle, tasks=["colour"], **QUIET)
    with pytest.raises(KfError, match="unknown task 'colour'"):
        model.add_task("colour")


def test_a_task_from_another_trunk_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tasks"]["scale"]["trunk_fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    model = kfdeploy.load(copy, tasks=["shape"], **QUIET)
    with pytest.raises(KfError, match="trained with another trunk"):
        model.add_task("scale")


def test_a_checksum_mismatch_is_refused_before_any_session_exists(bundle, tmp_path, monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "trunk.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    sessions = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(a))
    with pytest.raises(KfError, match="checksum mismatch for trunk.onnx"):
        kfdeploy.load(copy, **QUIET)
    assert sessions == []


def test_run_command_answers_png_files_and_npy_batches(bundle, images, tmp_path, capsys):
    from PIL import Image

    Image.fromarray((images[0, 0] * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((images[1, 0] * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "b.png")
    np.save(tmp_path / "batch.npy", images[:3])
    assert main(["run", str(bundle), str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--tasks", "shape"]) == 0
    out = capsys.readouterr().out
    assert out.count("shape=") == 2 and "a.png" in out
    assert main(["run", str(bundle), str(tmp_path / "batch.npy"), "--json", "--top", "2"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 3 and len(answers[0]["pos_y"]) == 2


def test_run_command_refuses_an_unreadable_file(bundle, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["run", str(bundle), str(tmp_path / "notes.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


SHARED_POOL = """
import sys, numpy as np, onnxruntime, kfdeploy
bundle, images, made_by, asked = sys.argv[1], np.load(sys.argv[2]), sys.argv[4], sys.argv[5]
if made_by == "app":  # an app that tunes ONNX Runtime itself, before it loads a bundle
    onnxruntime.set_global_thread_pool_sizes(2, 1)
lines = []
shared = kfdeploy.load(bundle, tasks=["shape", "pos_y"], thread_pool=asked, log=lines.append)
assert shared.thread_pool == "shared", lines
if asked == "per-session":
    assert any("already runs ONNX Runtime's global thread pool" in line for line in lines), lines
np.save(sys.argv[3], shared(images, logits=True)["pos_y"])
"""


@pytest.mark.parametrize("made_by, asked", [("kfdeploy", "shared"), ("app", "per-session"), ("app", "shared")])
def test_a_shared_thread_pool_gives_the_same_answers(bundle, model, images, tmp_path, made_by, asked):
    np.save(tmp_path / "in.npy", images)
    subprocess.run([sys.executable, "-c", SHARED_POOL, str(bundle), str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), made_by, asked],
                   check=True)
    reference = kfdeploy.load(bundle, tasks=["pos_y"], **QUIET)(images, logits=True)["pos_y"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference, atol=1e-5)


def test_after_a_shared_pool_later_assemblies_join_it(bundle):
    code = (
        "import numpy as np, kfdeploy\n"
        f"kfdeploy.load({str(bundle)!r}, tasks=['shape'], thread_pool='shared', log=print)\n"
        f"later = kfdeploy.load({str(bundle)!r}, tasks=['scale'], log=print)\n"
        "assert later(np.zeros((1, 1, 64, 64), np.float32))['scale'].shape == (1, 6)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_thread_pool_or_backend_is_refused(bundle):
    with pytest.raises(KfError, match="unknown thread_pool 'global'"):
        kfdeploy.load(bundle, thread_pool="global", **QUIET)
    with pytest.raises(KfError, match="unknown backend 'tflite'"):
        kfdeploy.load(bundle, backend="tflite", **QUIET)
