"""The Gradio demo, driven by the real gradio_client and by a real headless Chromium."""
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import kfdeploy
from conftest import add_on_disk, chromium_driver
from kfdeploy.training.data import render
from kfdeploy.demo import MAX_UPLOAD_BYTES, Demo, build_app, launch, sprite, to_model_input
from kfdeploy.errors import KfError
from test_images import png_header_only
from test_runtime import other_trunk, replace_on_disk

SPRITE = ("heart", 5, 0, 8, 20)  # shape, scale index, orientation index, pos_x, pos_y
OUTPUT_TASKS = ["shape", "scale", "orientation", "pos_x", "pos_y"]  # the Label outputs, in order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle):
    port = _free_port()
    app = launch(bundle, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def _labels(result):
    """Label outputs of the app -> {task: {label: probability}} for the visible ones."""
    out = {}
    for task, value in zip(OUTPUT_TASKS, result[2:7]):
        if value.get("__type__") == "update":  # the app shows or hides each task's label
            if not value["visible"]:
                continue
            value = value["value"]
        out[task] = {c["label"]: c["confidence"] for c in value["confidences"]}
    return out


def _expected(bundle, tasks, precision="fp32"):
    factors = np.array([[2, SPRITE[1], SPRITE[2], SPRITE[3], SPRITE[4]]])
    model = kfdeploy.load(bundle, tasks=tasks, log=lambda s: None, precision=precision)
    scores = model(render(factors))
    return {t: dict(zip(model.labels(t), scores[t][0].tolist())) for t in tasks}


@pytest.mark.slow
def test_the_client_sees_answers_change_with_the_ticked_tasks(client, bundle):
    first = client.predict(*SPRITE, ["shape", "scale"], "onnxruntime", api_name="/predict_sprite")
    second = client.predict(*SPRITE, ["pos_x"], "onnxruntime", api_name="/predict_sprite")
    assert set(_labels(first)) == {"shape", "scale"} and set(_labels(second)) == {"pos_x"}
    for result, tasks in ((first, ["shape", "scale"]), (second, ["pos_x"])):
        expected = _expected(bundle, tasks)
        for task, confidences in _labels(result).items():
            best = max(confidences, key=confidences.get)
            assert best == max(expected[task], key=expected[task].get)
            assert confidences[best] == pytest.approx(expected[task][best], abs=1e-4)
    assert "true" in first[7] and "Latency" in first[7] and "trunk" in first[7]


@pytest.mark.slow
def test_the_torch_backend_answers_like_onnxruntime(client):
    ort_result = _labels(client.predict(*SPRITE, ["scale"], "onnxruntime", api_name="/predict_sprite"))
    torch_result = _labels(client.predict(*SPRITE, ["scale"], "torch", api_name="/predict_sprite"))
    for label, p in ort_result["scale"].items():
        assert torch_result["scale"][label] == pytest.approx(p, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (lambda d: _text_file(d), "is not an image that can be read"),
    (lambda d: _png(d, np.zeros((64, 64), np.uint8)), "the image is blank"),
    (lambda d: _png(d, _big_colour_sprite()), "resized from 2000x2000 to 64x64"),
    (lambda d: _png(d, _big_colour_sprite()), "colour image converted to grey"),
    (lambda d: png_header_only(d / "huge.png", 5000, 5000), "huge.png is too large to read"),
    (lambda d: png_header_only(d / "bomb.png", 30000, 30000), "bomb.png is too large to read"),  # Pillow's DecompressionBombError
])
def test_bad_uploads_get_a_friendly_message_and_the_server_stays_up(client, tmp_path, make, message):
    result = client.predict(handle_file(str(make(tmp_path))), ["shape"], "onnxruntime", api_name="/predict_upload")
    status, summary = result[0], result[7] if isinstance(result[7], str) else ""  # errors leave the summary as it was
    assert message in status + summary
    assert _labels(client.predict(*SPRITE, ["shape"], "onnxruntime", api_name="/predict_sprite"))  # still serving


@pytest.mark.slow
def test_no_task_ticked_is_a_friendly_message(client):
    result = client.predict(*SPRITE, [], "onnxruntime", api_name="/predict_sprite")
    assert "tick at least one task" in result[0]


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not a picture")
    return path


def _png(folder: Path, array: np.ndarray) -> Path:
    path = folder / "in.png"
    Image.fromarray(array).save(path)
    return path


def _big_colour_sprite() -> np.ndarray:
    grey = render(np.array([[0, 5, 0, 16, 16]]))[0, 0]
    big = np.asarray(Image.fromarray(grey).resize((2000, 2000)))
    return np.stack([big, big // 2, big // 3], axis=-1)


def test_a_blank_canvas_is_refused():
    with pytest.raises(KfError, match="blank"):
        to_model_input(np.zeros((256, 256, 4), np.uint8))


def test_a_sketch_of_dark_strokes_on_a_transparent_canvas_becomes_a_white_shape():
    canvas = np.zeros((256, 256, 4), np.uint8)
    canvas[100:150, 100:150] = (0, 0, 0, 255)  # a black square, drawn
    image, notes = to_model_input(canvas)
    assert image.shape == (1, 1, 64, 64) and image[0, 0, 30, 30] > 200 and image[0, 0, 5, 5] < 50
    assert any("inverted" in n for n in notes)


def _page_text(app) -> str:
    return json.dumps(app.config)


def test_without_a_bundle_the_page_says_how_to_make_one(tmp_path):
    text = _page_text(build_app(tmp_path / "missing"))
    assert "kfdeploy quickstart" in text and "kfdeploy export RUN --out BUNDLE" in text


def test_a_bundle_failing_verification_is_explained_not_a_traceback(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "tasks" / "shape.onnx").write_bytes(b"tampered")
    text = _page_text(build_app(copy))
    assert "cannot be used" in text and "checksum mismatch for tasks/shape.onnx" in text


def _set(field, value):
    return lambda m: {**m, field: value}


@pytest.mark.parametrize("damage, message", [
    (lambda m: "{", "is not valid JSON"),
    (_set("format_version", "1"), "format_version"),
    (lambda m: {k: v for k, v in m.items() if k != "tasks"}, "tasks"),
    (_set("trunk", "t"), "trunk"),  # was a TypeError
    (_set("format_version", True), "format_version"),  # a bool passed as an int
    (_set("tasks", None), "tasks"),  # was an AttributeError
], ids=["not-json", "version-a-string", "no-tasks", "trunk-a-string", "version-a-bool", "tasks-null"])
def test_a_malformed_manifest_is_reported_by_the_page_and_the_command(bundle, tmp_path, capsys, damage, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damaged = damage(manifest)
    (copy / "manifest.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    app = launch(copy, port=_free_port(), block=False)
    try:
        err = capsys.readouterr().err
        text = _page_text(app)
    finally:
        app.close()
    assert "cannot be used" in text, text[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("kfdeploy demo: "))
    assert message in line, err


def test_a_manifest_nested_too_deep_is_reported_not_a_recursion_error(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").write_text('{"format": "kfdeploy-bundle", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "cannot be used" in _page_text(build_app(copy))


def test_the_app_sends_no_analytics_even_when_the_environment_allows_them(tmp_path, monkeypatch):
    import gradio.analytics

    calls = []
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    monkeypatch.setattr(gradio.analytics, "version_check", lambda *a, **k: calls.append("version_check"))
    monkeypatch.setattr(gradio.analytics, "_do_analytics_request", lambda *a, **k: calls.append(k.get("topic")))
    app = launch(tmp_path / "missing", port=_free_port(), block=False)
    app.close()
    assert app.analytics_enabled is False and calls == []


@pytest.mark.slow
def test_an_upload_above_the_size_cap_is_refused_by_the_server(server, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    small = _png(tmp_path, np.eye(64, dtype=np.uint8) * 255)
    for path, status in ((big, 413), (small, 200)):
        with open(path, "rb") as f:
            response = httpx.post(f"{server}gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
        assert response.status_code == status, (path.name, response.text[:300])


@pytest.mark.chromium
@pytest.mark.slow
def test_a_browser_ticks_tasks_generates_a_sprite_and_sees_the_labels(server, bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.XPATH, "//*[@id='tasks']//label[.//span[text()='pos_x']]"))
        box.click()  # shape and scale are ticked already: now three tasks
        driver.find_element(By.ID, "generate").click()
        expected = _expected(bundle, ["pos_x"])["pos_x"]
        best = max(expected, key=expected.get)
        wait.until(lambda d: best in d.find_element(By.ID, "label-pos_x").text)
        # The label's heading is its top class and each class shows a percentage: neither
        # exists before an answer (the title "shape" does, and all three class names would).
        shape = _expected(bundle, ["shape"])["shape"]
        top = max(shape, key=shape.get)
        heading = driver.find_element(By.CSS_SELECTOR, "#label-shape [data-testid='label-output-value']")
        assert heading.text == top
        shown = driver.find_element(By.CSS_SELECTOR, f"#label-shape [data-testid='{top}-confidence-set']").text
        assert abs(int(re.search(r"(\d+)%", shown).group(1)) - 100 * shape[top]) <= 1, shown
        assert "Latency" in driver.find_element(By.ID, "summary").text
        shot = Path(os.environ.get("KFDEPLOY_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        driver.quit()


# -- tasks added to the bundle while the demo runs -----------------------------------------
@pytest.fixture
def live_server(live):
    port = _free_port()
    app = launch(live, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def _choices(update):
    return [value for _, value in update["choices"]]


@pytest.mark.slow
def test_a_task_added_to_the_bundle_is_offered_from_the_next_page_load(live_server, live, bundle):
    client = Client(live_server, verbose=False)
    offered, status = client.predict(api_name="/tasks")  # what a page load does
    assert _choices(offered) == ["shape", "scale"] and status == {"__type__": "update"}
    add_on_disk(bundle, live)
    offered, _ = client.predict(api_name="/tasks")
    assert _choices(offered) == ["shape", "scale", "pos_x"]
    result = client.predict(*SPRITE, ["shape", "pos_x"], "onnxruntime", api_name="/predict_sprite")
    truth = sprite(*SPRITE)[1]["pos_x"]
    assert result[0] == "" and f"| pos_x | {truth} |" in result[4]  # answered: the summary has its row


def test_a_replaced_bundle_with_another_trunk_is_not_offered_and_the_page_says_why(live):
    demo = Demo(live)
    assert demo.refresh() is None and demo.tasks == ["shape", "scale"]  # unchanged: nothing read
    replace_on_disk(live, other_trunk)
    problem = demo.refresh()
    assert problem.startswith(f"the bundle at {live} changed on disk and cannot be taken by this running demo (its trunk is another one")
    assert problem.endswith("restart the demo to show it")
    assert demo.tasks == ["shape", "scale"] and demo.refresh() == problem


@pytest.mark.chromium
@pytest.mark.slow
def test_a_browser_reloading_the_page_ticks_an_added_task_and_sees_its_label(live_server, live, bundle):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    add_on_disk(bundle, live)
    driver = chromium_driver()
    try:
        driver.get(live_server)
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.XPATH, "//*[@id='tasks']//label[.//span[text()='pos_x']]"))
        box.click()
        driver.find_element(By.ID, "generate").click()
        expected = _expected(live, ["pos_x"])["pos_x"]
        best = max(expected, key=expected.get)
        wait.until(lambda d: best in d.find_element(By.ID, "label-pos_x").text)
    finally:
        driver.quit()


# -- a precision beside the backend: the variants `kfdeploy quantize` made ---------------------
def _quantize(folder: Path, *options: str) -> Path:
    """`kfdeploy quantize FOLDER --int8` as a user runs it, on 256 calibration images (half the
    default, as tests/test_quantize.py: enough for SimpleConv); the tiny test bundle may lose a
    few points of accuracy, which is not what these tests are about."""
    from kfdeploy.cli import main

    assert main(["quantize", str(folder), "--int8", "--images", "256", "--max-drop", "5", *options]) == 0
    return folder


@pytest.fixture(scope="module")
def int8_copy(bundle, tmp_path_factory):
    return _quantize(shutil.copytree(bundle, tmp_path_factory.mktemp("int8") / "sprites"))


@pytest.fixture(scope="module")
def int8_server(int8_copy):
    port = _free_port()
    app = launch(int8_copy, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.mark.slow
def test_choosing_int8_answers_as_load_at_int8(int8_server, int8_copy):
    client = Client(int8_server, verbose=False)
    assert _choices(client.predict(api_name="/precisions")) == ["fp32", "int8"]
    result = _labels(client.predict(*SPRITE, ["shape", "scale"], "onnxruntime", "int8", api_name="/predict_sprite"))
    expected = _expected(int8_copy, ["shape", "scale"], precision="int8")
    fp32 = _expected(int8_copy, ["shape", "scale"])
    assert any(abs(fp32[t][c] - p) > 1e-3 for t in expected for c, p in expected[t].items())  # int8 is another answer
    for task in ("shape", "scale"):  # the Label shows the top three classes
        assert result[task] == pytest.approx({c: expected[task][c] for c in result[task]}, abs=1e-4)
        assert sorted(result[task], key=result[task].get) == sorted(expected[task], key=expected[task].get)[-3:]


@pytest.mark.slow
def test_the_summary_shows_each_tasks_int8_record_from_the_manifest(int8_server, int8_copy):
    client = Client(int8_server, verbose=False)
    summary = client.predict(*SPRITE, ["scale"], "onnxruntime", "int8", api_name="/predict_sprite")[7]
    record = json.loads((int8_copy / "manifest.json").read_text())["tasks"]["scale"]["variants"]["int8"]
    row = (f"| scale | {100 * record['heldout_accuracy']:.1f}% | {100 * record['fp32_heldout_accuracy']:.1f}% "
           f"| {100 * record['agreement']:.1f}% |")
    assert row in summary and "**Latency** at int8" in summary, summary


@pytest.mark.slow
def test_int8_on_the_torch_backend_is_a_message_not_an_error(int8_server):
    client = Client(int8_server, verbose=False)
    result = client.predict(*SPRITE, ["shape"], "torch", "int8", api_name="/predict_sprite")
    assert "int8 runs on the onnxruntime backend only: choose onnxruntime as the backend, or fp32 for torch" in result[0]


@pytest.mark.slow
def test_a_bundle_without_variants_offers_only_fp32_and_hides_the_choice(client):
    offered = client.predict(api_name="/precisions")
    assert _choices(offered) == ["fp32"] and offered["visible"] is False


@pytest.mark.slow
def test_a_task_added_without_an_int8_variant_says_how_to_make_it(live_server, live, bundle):
    client = Client(live_server, verbose=False)
    _quantize(live)  # while the demo runs: the next load offers int8
    assert _choices(client.predict(api_name="/precisions")) == ["fp32", "int8"]
    add_on_disk(bundle, live)  # pos_x, without an int8 variant
    client.predict(api_name="/tasks")
    assert _choices(client.predict(api_name="/precisions")) == ["fp32", "int8"]  # still, for shape and scale
    result = client.predict(*SPRITE, ["shape", "pos_x"], "onnxruntime", "int8", api_name="/predict_sprite")
    assert f"has no int8 variant of task 'pos_x'; make it with `kfdeploy quantize {live} --int8 --tasks pos_x`" in result[0]


@pytest.mark.slow
def test_a_bundle_quantized_again_while_the_demo_runs_answers_with_the_new_variant(int8_copy, tmp_path):
    copy = shutil.copytree(int8_copy, tmp_path / "b")
    demo = Demo(copy)
    image = sprite(*SPRITE)[0]
    before = demo.answer(image, ["shape"], precision="int8").scores["shape"]
    _quantize(copy, "--seed", "1")  # other calibration images: another int8 trunk
    assert demo.refresh() is None
    after = demo.answer(image, ["shape"], precision="int8").scores["shape"]
    assert after != pytest.approx(before, abs=1e-4)
    assert after == pytest.approx(_expected(copy, ["shape"], precision="int8")["shape"], abs=1e-4)


@pytest.mark.chromium
@pytest.mark.slow
def test_a_browser_switches_to_int8_and_the_answer_panel_says_so(int8_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.get(int8_server)
        wait = WebDriverWait(driver, 60)
        shape_title = "#label-shape [data-testid='block-label']"
        wait.until(lambda d: d.find_element(By.ID, "generate")).click()
        wait.until(lambda d: "Latency" in d.find_element(By.ID, "summary").text)
        assert driver.find_element(By.CSS_SELECTOR, shape_title).text == "shape"
        wait.until(lambda d: d.find_element(By.XPATH, "//*[@id='precision']//label[.//span[text()='int8']]")).click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, shape_title).text == "shape · int8")
        assert "held-out accuracy at int8" in driver.find_element(By.ID, "summary").text
    finally:
        driver.quit()
