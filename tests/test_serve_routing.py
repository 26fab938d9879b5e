"""kfdeploy.serving.routing: one batch whose requests ask for different tasks, answered by one
session that runs the trunk once and each task on its own rows."""
import threading

import numpy as np
import onnx
import pytest

import kfdeploy
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.errors import KfError
from kfdeploy.serving.routing import Router, compose_routed, rows_input

QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def reference(bundle):
    return kfdeploy.load(bundle, **QUIET)


@pytest.fixture(scope="module")
def router(bundle):
    return Router(bundle, tasks=["shape", "scale", "pos_x"], **QUIET)


def images(count, seed=0):
    return np.random.default_rng(seed).random((count, 1, 64, 64), dtype=np.float32)


def test_each_request_gets_its_tasks_as_kfdeploy_load_answers(router, reference):
    requests = [(images(2, 1), ["shape"], False), (images(1, 2), None, True), (images(3, 3), ["pos_x", "shape"], False),
                (images(0, 4), ["scale"], False), (images(4, 5), ["scale"], True)]
    answers = router.run_requests(requests)
    assert [list(a) for a in answers] == [["shape"], ["shape", "scale", "pos_x"], ["pos_x", "shape"], ["scale"], ["scale"]]
    for (x, _, logits), answer in zip(requests, answers):
        expected = reference(x, logits=logits)
        for task, scores in answer.items():
            assert scores.shape == (len(x), reference.bundle.task(task)["classes"]) and scores.dtype == np.float32
            np.testing.assert_allclose(scores, expected[task], rtol=1e-5, atol=1e-6)


def test_the_routed_graph_is_valid_onnx_and_takes_row_indices_per_task(bundle):
    opened = Bundle.open(bundle)
    graphs = {m: opened.graph(m) for m in ["trunk", "shape", "pos_y"]}
    routed = compose_routed(graphs, ["shape", "pos_y"])
    onnx.checker.check_model(routed, full_check=True)
    assert [i.name for i in routed.graph.input] == ["image", rows_input("shape"), rows_input("pos_y")]
    assert [o.name for o in routed.graph.output] == ["shape", "shape:probs", "pos_y", "pos_y:probs"]
    assert {n.name.split("/")[0] for n in routed.graph.node} == {"trunk", "shape", "pos_y"}  # the profiler's attribution
    with pytest.raises(KfError, match="needs at least one task"):
        compose_routed(graphs, [])


def test_tasks_no_row_asks_for_cost_nothing_and_padding_gives_the_same_answers(router, reference):
    x = images(5, 7)
    (answer,) = router.run_requests([(x, ["shape"], False)])
    np.testing.assert_allclose(answer["shape"], reference(x)["shape"], rtol=1e-5, atol=1e-6)
    served, routed = router._state
    routed.pad_empty = True  # what non-CPU providers get: one padding row for a task without rows
    try:
        (padded,) = router.run_requests([(x, ["shape"], False)])
    finally:
        routed.pad_empty = False
    np.testing.assert_array_equal(padded["shape"], answer["shape"])


def test_a_routed_graph_that_fails_while_running_is_one_line_naming_its_module(bundle):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    router = Router(bundle, tasks=["shape", "scale"], **QUIET)
    _, routed = router._state

    class Failing:  # what ONNX Runtime raises when a bundle's node cannot run (tests/test_bundle.py makes one for real)
        def run(self, names, feeds):
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                                   "running Expand node. Name:'scale/allocates' Status Message: out of memory")

    routed.session = Failing()
    with pytest.raises(KfError, match=r"^task module 'scale' failed while running in ONNX Runtime \(.*Name:'scale/allocates'"):
        router.run_requests([(images(2), None, False)])


def test_bad_requests_each_get_their_error_and_the_good_ones_of_the_batch_are_answered(router, reference):
    good = images(2)
    nan = good.copy()
    nan[1, 0, 5, 5] = np.nan
    requests = [(good, None, False), (nan, None, False), (good, ["orientation"], False), (good, ["colour"], False),
                (good, None, "yes"), (good[:, :, :32], None, False), (good * 300, ["shape"], False), (good, ["pos_x"], True)]
    answers = router.run_requests(requests)
    failures = {i: str(a) for i, a in enumerate(answers) if isinstance(a, KfError)}
    assert sorted(failures) == [1, 2, 3, 4, 5, 6]
    assert failures[1] == "images contain NaN or infinite values"
    assert failures[2] == "task 'orientation' is not served; served: shape, scale, pos_x"
    assert failures[3] == "task 'colour' is not a task of this bundle; served: shape, scale, pos_x"
    assert failures[4] == "logits must be true or false, got 'yes'"
    assert "must be 64x64 pixels" in failures[5] and "must lie in [0, 1]" in failures[6]
    expected, expected_logits = reference(good), reference(good, logits=True)
    assert list(answers[0]) == ["shape", "scale", "pos_x"] and list(answers[7]) == ["pos_x"]
    for task, scores in answers[0].items():
        np.testing.assert_allclose(scores, expected[task], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers[7]["pos_x"], expected_logits["pos_x"], rtol=1e-5, atol=1e-5)
    with pytest.raises(KfError, match="images contain NaN or infinite values"):
        router.run(nan)


def test_tasks_come_and_go_while_batches_run(bundle, reference):
    router = Router(bundle, tasks=["shape"], **QUIET)
    x = images(3, 11)
    expected = reference(x)
    errors, stop = [], threading.Event()

    def caller():
        while not stop.is_set():
            try:
                (answer,) = router.run_requests([(x, ["shape"], False)])
                np.testing.assert_allclose(answer["shape"], expected["shape"], rtol=1e-5, atol=1e-6)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        for _ in range(5):
            router.add_task("pos_y")
            (answer,) = router.run_requests([(x, ["pos_y"], False)])
            np.testing.assert_allclose(answer["pos_y"], expected["pos_y"], rtol=1e-5, atol=1e-6)
            router.remove_task("pos_y")
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors[:3]
    assert router.tasks == ["shape"]
    with pytest.raises(KfError, match=r"task 'pos_y' is not served; served: shape"):
        router.remove_task("pos_y")
    with pytest.raises(KfError, match=r"unknown task 'colour' in bundle .*; available: shape, scale"):
        router.add_task("colour")
