"""The runtime: compose trunk + selected tasks, thread-safe, validated, torch-free."""
import gc
import json
import re
import shutil
import subprocess
import sys
import threading
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kfdeploy
from conftest import add_on_disk
from kfdeploy import KfError, runtime
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.cli import main
from kfdeploy.training.data import TASK_NAMES, render

QUIET = {"log": lambda line: None}


class ExcThread(threading.Thread):
    """A thread whose exception reaches the test that joins it (plain threads only warn)."""

    error = None

    def run(self):
        try:
            super().run()
        except BaseException as exc:  # noqa: BLE001 - handed to join_and_raise
            self.error = exc

    def join_and_raise(self, timeout):
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still running after {timeout} s"
        if self.error is not None:
            raise self.error


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


def test_one_session_runs_the_trunk_once_for_every_selected_task(bundle, images):
    model = kfdeploy.load(bundle, **QUIET)
    composition = model._state[1]
    graph = onnx.load_model_from_string(composition.model).graph
    trunk_nodes = len(Bundle.open(bundle).graph("trunk").graph.node)
    assert sum(node.name.startswith("trunk/") for node in graph.node) == trunk_nodes
    assert [o.name for o in graph.output] == [name for t in model.tasks for name in (t, f"{t}:probs")]
    assert set(model(images)) == set(model.tasks) == set(TASK_NAMES)


def test_adding_and_removing_swaps_compositions_and_switching_back_reuses_one(bundle, images):
    model = kfdeploy.load(bundle, tasks=["shape"], **QUIET)
    first = model._state[1]
    model.add_task("pos_x")
    assert model.tasks == ["shape", "pos_x"] and model._state[1] is not first
    model.remove_task("pos_x")
    assert model._state[1] is first  # the recently used composition, not a rebuild
    model.remove_task("shape")
    assert model.tasks == [] and model(images) == {}


def test_a_call_is_answered_while_a_new_composition_is_being_built(bundle, images):
    model = kfdeploy.load(bundle, tasks=["shape"], **QUIET)
    building, release, build = threading.Event(), threading.Event(), model._build

    def slow_build(key):
        building.set()
        assert release.wait(30)
        return build(key)

    model._build = slow_build
    adder = ExcThread(target=model.add_task, args=("scale",))
    adder.start()
    assert building.wait(30)
    assert set(model(images)) == {"shape"}  # answered by the current composition, not blocked
    release.set()
    adder.join_and_raise(30)
    assert set(model(images)) == {"shape", "scale"}


def test_a_subset_call_answers_alike_and_gets_its_own_composition(bundle, images):
    model = kfdeploy.load(bundle, tasks=["shape", "scale", "pos_x"], **QUIET)
    full = model(images, logits=True)
    first = model(images, tasks=["pos_x", "shape"], logits=True)  # full graph now, its own built meanwhile
    model._builder.shutdown(wait=True)
    subset = model._cache[frozenset({"pos_x", "shape"})]
    second = model(images, tasks=["pos_x", "shape"], logits=True)
    assert list(first) == list(second) == ["pos_x", "shape"]
    assert [o.name for o in subset.session.get_outputs()] == ["shape", "shape:probs", "pos_x", "pos_x:probs"]
    for task in ("pos_x", "shape"):
        np.testing.assert_array_equal(first[task], full[task])
        np.testing.assert_allclose(second[task], full[task], atol=1e-5)


def test_old_compositions_are_released_and_the_cache_stays_bounded(bundle):
    model = kfdeploy.load(bundle, tasks=["shape"], cache_size=2, **QUIET)
    seen = []
    for _ in range(3):
        for task in ("scale", "pos_x", "pos_y", "orientation"):
            model.add_task(task)
            seen.append(weakref.ref(model._state[1]))
            model.remove_task(task)
    gc.collect()
    alive = [ref for ref in seen if ref() is not None]
    assert len(model._cache) == 2 and len(alive) <= 2


def test_profile_splits_a_call_between_the_trunk_and_each_task(bundle, images):
    # Tasks run one by one: merged, they are one module (tests/test_merge.py)
    model = kfdeploy.load(bundle, tasks=["shape", "scale"], merge=False, **QUIET)
    timings = model.profile(images, runs=5, warmup=1)
    assert set(timings.tasks_ms) == {"shape", "scale"} and timings.trunk_ms > 0
    assert all(ms > 0 for ms in timings.tasks_ms.values())
    assert timings.total_ms >= timings.trunk_ms + sum(timings.tasks_ms.values())
    assert "trunk" in timings.split() and "scale" in timings.split()
    assert "Conv" in timings.ops_ms and timings.ops_ms["Conv"] > 0, timings.ops_ms
    assert sum(timings.ops_ms.values()) <= timings.total_ms


def test_last_timings_are_this_threads_last_call(bundle, images):
    composed = kfdeploy.load(bundle, tasks=["shape", "scale"], **QUIET)
    assert composed.last_timings.total_ms == 0.0  # no call yet in this thread
    composed(images)
    mine = composed.last_timings
    assert mine.total_ms > 0 and mine.trunk_ms is None and mine.tasks_ms == {}  # one graph: no split per call
    other = threading.Thread(target=lambda: composed(images[:1]))
    other.start()
    other.join()
    assert composed.last_timings.total_ms == mine.total_ms

    chained = kfdeploy.load(bundle, tasks=["shape", "scale"], backend="torch", **QUIET)
    chained(images)
    split = chained.last_timings
    assert set(split.tasks_ms) == {"shape", "scale"} and split.trunk_ms > 0
    assert split.total_ms >= split.trunk_ms + sum(split.tasks_ms.values())
    split.tasks_ms.clear()  # a copy: the caller's to keep
    assert set(chained.last_timings.tasks_ms) == {"shape", "scale"}


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


def test_the_tensorrt_ep_gets_an_engine_cache_per_composition_and_the_batch_profile(bundle, monkeypatch, tmp_path):
    # The EP itself cannot run here: record what each session is asked for, run it on the CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_EPS)
    monkeypatch.setattr(runtime, "_gpu_visible", lambda: True)
    monkeypatch.setenv("KFDEPLOY_CACHE", str(tmp_path / "cache"))
    asked, real_session = [], ort.InferenceSession

    def recording_session(model, options, providers):
        asked.append(providers)
        return real_session(model, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    lines = []
    model = kfdeploy.load(bundle, tasks=["shape"], log=lines.append)
    model.add_task("scale")
    model.remove_task("scale")  # seen before: no new session, no new engine
    assert len(asked) == 2
    (trt, options), *rest = asked[0]
    (_, scale_options), *_ = asked[1]
    assert trt == "TensorrtExecutionProvider" and rest == GPU_EPS[1:]
    batch = Bundle.open(bundle).manifest["input"]["batch"]
    assert options["trt_profile_min_shapes"] == f"image:{batch['min']}x1x64x64"
    assert options["trt_profile_opt_shapes"] == f"image:{batch['opt']}x1x64x64"
    assert options["trt_profile_max_shapes"] == f"image:{batch['max']}x1x64x64"
    cache = options["trt_engine_cache_path"]
    assert options["trt_engine_cache_enable"] and cache.startswith(str(tmp_path / "cache")) and any(cache in line for line in lines)
    assert scale_options["trt_engine_cache_path"] != cache  # another task set, another engine
    assert options["trt_fp16_enable"] is False  # the bundle's profile is fp32


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
    from kfdeploy.bundling import tensorrt as trt_backend

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


def test_the_gpu_path_binds_the_image_once_and_fetches_only_the_requested_outputs(bundle, images, monkeypatch):
    # On a GPU a call goes through IOBinding. No GPU here: the same code runs with the CPU
    # standing in for the device.
    reference = kfdeploy.load(bundle, **QUIET)(images, logits=True)
    monkeypatch.setattr(runtime, "io_device_for", lambda providers: "cpu")
    bound = kfdeploy.load(bundle, **QUIET)
    assert bound._state[1].io_device == "cpu"
    answers = bound(images, logits=True)
    for task, logits in reference.items():
        np.testing.assert_array_equal(answers[task], logits)
    np.testing.assert_allclose(bound(images)["shape"].sum(1), 1.0, rtol=1e-5)


def test_the_fused_graph_runs_in_plain_onnxruntime_and_matches_the_assembly(model, images, tmp_path):
    path = model.save_fused(tmp_path / "shape_scale.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["shape", "shape:probs", "scale", "scale:probs"]
    fused = dict(zip(["shape", "shape:probs", "scale", "scale:probs"], session.run(None, {"image": images})))
    logits, probs = model(images, logits=True), model(images)
    for task in ("shape", "scale"):
        np.testing.assert_array_equal(fused[task], logits[task])
        np.testing.assert_array_equal(fused[f"{task}:probs"], probs[task])


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
        for _ in range(100):
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

    churner = ExcThread(target=churn)
    churner.start()
    callers = [ExcThread(target=caller, args=(seed,)) for seed in range(8)]
    for thread in callers:
        thread.start()
    try:
        for thread in callers:
            thread.join_and_raise(300)
    finally:
        stop.set()
        churner.join_and_raise(60)
    assert not failures, failures[:5]


def test_a_worker_that_raises_fails_the_test_that_started_it():
    # The thread-safety test above relies on this: an exception in a thread only warns.
    worker = ExcThread(target=lambda: 1 / 0)
    worker.start()
    with pytest.raises(ZeroDivisionError):
        worker.join_and_raise(10)


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


def test_the_value_check_takes_the_values_min_and_max_would_take(model):
    # prepare() answers most arrays from the max of their bits as integers: the same answers
    # as comparing each value with the accepted range, at the edges too.
    low, high = model._accepted  # the manifest's range and its rounding slack
    f32 = np.float32
    near = [np.nextafter(f32(edge), f32(direction)) for edge in (low, high, 0) for direction in (-np.inf, np.inf)]
    edges = [0.0, -0.0, 1.0, 0.5, low, high, *near, -0.0011, f32(low) / 2, np.finfo(f32).smallest_subnormal,
             -np.finfo(f32).smallest_subnormal, np.finfo(f32).max, np.inf, -np.inf, np.nan, -np.nan]
    for value in np.array(edges, f32):
        image = np.full((1, 1, 64, 64), 0.5, f32)
        image[0, 0, 17, 3] = value
        if low <= value <= high:  # as numpy compares a float32 with a float; False for NaN
            model.prepare(image)
        else:
            with pytest.raises(KfError, match="NaN or infinite" if not np.isfinite(value) else "must lie in"):
                model.prepare(image)


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
    assert model.tasks == ["shape"]


def test_a_task_from_another_trunk_is_refused_before_any_session_exists(bundle, tmp_path, monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tasks"]["pos_y"]["trunk_fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    sessions = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(a))
    with pytest.raises(KfError, match="task 'pos_y' was trained with another trunk"):
        kfdeploy.load(copy, **QUIET)
    assert sessions == []


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
    assert "notes.png is not an image that can be read (PNG, JPEG, ...)" in capsys.readouterr().err


APP_POOL = """
import sys, numpy as np, onnxruntime, kfdeploy
bundle, images = sys.argv[1], np.load(sys.argv[2])
onnxruntime.set_global_thread_pool_sizes(2, 1)  # an app that tunes ONNX Runtime itself, before it loads a bundle
model = kfdeploy.load(bundle, tasks=["shape", "pos_y"], log=lambda line: None)
model.add_task("scale")
np.save(sys.argv[3], model(images, logits=True)["pos_y"])
"""


def test_an_app_that_made_onnxruntimes_global_pool_gets_the_same_answers(bundle, images, tmp_path):
    np.save(tmp_path / "in.npy", images)
    subprocess.run([sys.executable, "-c", APP_POOL, str(bundle), str(tmp_path / "in.npy"), str(tmp_path / "out.npy")], check=True)
    reference = kfdeploy.load(bundle, tasks=["pos_y"], **QUIET)(images, logits=True)["pos_y"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference, atol=1e-5)


def test_an_unknown_backend_is_refused(bundle):
    with pytest.raises(KfError, match="unknown backend 'tflite'; choose one of onnxruntime, tensorrt, torch"):
        kfdeploy.load(bundle, backend="tflite", **QUIET)


def test_a_task_outside_the_selection_is_refused_per_call(model, images):
    with pytest.raises(KfError, match="task 'pos_x' is not selected; selected: shape, scale"):
        model(images, tasks=["pos_x"])


# -- tasks added to the bundle on disk since it was loaded ---------------------------------
def replace_on_disk(bundle_dir, change):
    """Swap in a copy of the bundle whose manifest `change` edited, and which lists a new task
    'pos_x' (scale's files under another name)."""
    copy = bundle_dir.with_name("replacement")
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tasks"]["pos_x"] = dict(manifest["tasks"]["scale"])
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    old = bundle_dir.with_name("old")
    bundle_dir.rename(old)
    copy.rename(bundle_dir)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_task_added_to_the_bundle_on_disk_after_load_can_be_added(live, bundle, images, backend):
    model = kfdeploy.load(live, tasks=["shape", "scale"], backend=backend, **QUIET)
    before = model(images, logits=True)
    add_on_disk(bundle, live)
    model.add_task("pos_x")
    assert model.tasks == ["shape", "scale", "pos_x"] and "pos_x" in model.bundle.tasks
    fresh = kfdeploy.load(live, tasks=["shape", "scale", "pos_x"], backend=backend, **QUIET)(images, logits=True)
    answers = model(images, logits=True)
    for task in ("shape", "scale", "pos_x"):
        np.testing.assert_allclose(answers[task], fresh[task], atol=1e-5)
    for task in ("shape", "scale"):
        np.testing.assert_array_equal(answers[task], before[task])
    assert model.labels("pos_x") == fresh_labels(live, "pos_x")
    model.remove_task("pos_x")
    model.add_task("pos_x")  # known now: no second read
    assert model.tasks == ["shape", "scale", "pos_x"]


def fresh_labels(bundle_dir, task):
    return Bundle.open(bundle_dir, verify=False).task(task)["labels"]


def test_calls_are_answered_while_the_bundle_is_read_again(live, bundle, images, monkeypatch):
    model = kfdeploy.load(live, tasks=["shape"], **QUIET)
    expected = model(images)["shape"]
    add_on_disk(bundle, live)
    reading, release, real_open = threading.Event(), threading.Event(), Bundle.open

    def slow_open(path, verify=True):
        reading.set()
        assert release.wait(30)
        return real_open(path, verify)

    monkeypatch.setattr(runtime.Bundle, "open", slow_open)
    adder = ExcThread(target=model.add_task, args=("pos_x",))
    adder.start()
    assert reading.wait(30)
    np.testing.assert_array_equal(model(images)["shape"], expected)  # not blocked by the read
    release.set()
    adder.join_and_raise(60)
    assert set(model(images)) == {"shape", "pos_x"}


def test_the_read_again_is_verified_as_the_load_was(live, bundle, monkeypatch):
    model = kfdeploy.load(live, tasks=["shape"], **QUIET)
    add_on_disk(bundle, live)
    (live / "tasks" / "pos_x.onnx").write_bytes(b"tampered")
    with pytest.raises(KfError, match="checksum mismatch for tasks/pos_x.onnx"):
        model.add_task("pos_x")
    assert model.tasks == ["shape"] and "pos_x" not in model.bundle.tasks


def test_an_unknown_task_is_still_refused_listing_the_bundles_tasks_now(live, bundle):
    model = kfdeploy.load(live, tasks=["shape"], **QUIET)
    add_on_disk(bundle, live)
    with pytest.raises(KfError, match=r"unknown task 'colour' in bundle .*; available: shape, scale, pos_x$"):
        model.add_task("colour")
    assert model.tasks == ["shape"]


def other_trunk(manifest):
    manifest["trunk"]["fingerprint"] = "1" * 64
    for task in manifest["tasks"].values():
        task["trunk_fingerprint"] = "1" * 64


@pytest.mark.parametrize("change, problem", [
    (other_trunk, r"its trunk is another one \(fingerprint 111111111111, this assembly runs [0-9a-f]{12}\)"),
    (lambda m: m["input"].update(range=[0.0, 2.0]), r"its input spec differs \(input.range\)"),
], ids=["another-trunk", "another-input-range"])
def test_a_bundle_replaced_by_an_incompatible_one_is_refused_with_the_fix(live, images, change, problem):
    model = kfdeploy.load(live, tasks=["shape"], **QUIET)
    expected = model(images)["shape"]
    replace_on_disk(live, change)
    with pytest.raises(KfError) as refused:
        model.add_task("pos_x")
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert re.search(f"^bundle {re.escape(str(live))} changed on disk since this assembly loaded it: {problem}; "
                     f"to use task 'pos_x', load it again with kfdeploy.load\\('{re.escape(str(live))}'\\)$", message), message
    assert model.tasks == ["shape"] and "pos_x" not in model.bundle.tasks
    np.testing.assert_array_equal(model(images)["shape"], expected)  # the running assembly is untouched


def test_an_assembly_from_an_archive_does_not_read_it_again(bundle, monkeypatch):
    model = kfdeploy.load(bundle.with_name(bundle.name + ".tar.gz"), tasks=["shape"], **QUIET)
    opened = []
    monkeypatch.setattr(runtime.Bundle, "open", lambda *a, **k: opened.append(a))
    with pytest.raises(KfError, match="unknown task 'colour' in bundle .*; available: shape, scale, orientation, pos_x, pos_y$"):
        model.add_task("colour")
    assert opened == []


def test_a_router_serves_a_task_added_to_the_bundle_on_disk(live, bundle, images):
    from kfdeploy.serving.routing import Router

    router = Router(live, tasks=["shape"], **QUIET)
    add_on_disk(bundle, live)
    router.add_task("pos_x")
    assert router.tasks == ["shape", "pos_x"] and "pos_x" in router.bundle.tasks
    answer = router.run(images[:4], logits=True)
    fresh = kfdeploy.load(live, tasks=["pos_x"], **QUIET)(images[:4], logits=True)
    np.testing.assert_allclose(answer["pos_x"], fresh["pos_x"], atol=1e-5)
