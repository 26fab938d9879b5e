"""Tasks of one architecture run merged into one grouped subgraph: the same answers as one by one.

On the session's timm bundle (tests/conftest.py: timm_bundle): MobileNetV2 x0.5 task modules of
3, 6 and 40 classes at 32x32, with a normalization in its graphs and the task networks' weights
and BatchNorm statistics scrambled before export, so that every folded bias and scale differs
from task to task.
"""
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

import kfdeploy
from conftest import TIMM_SIZE, TIMM_TASKS
from kfdeploy import runtime
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.bundling.fuse import Composer
from kfdeploy.runtime import ort_session_for
from kfdeploy.training.data import SpritesSource
from kfdeploy.training.pipeline import resize_images

SIZE, TASKS = TIMM_SIZE, TIMM_TASKS
TOLERANCE = 1e-5
QUIET = {"log": lambda line: None}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images():
    return resize_images(SpritesSource().heldout(24, offset=50)[0], SIZE).numpy()


def composed(bundle_dir, tasks, merge=True, log=None):
    return onnx.load_model_from_string(Composer(Bundle.open(bundle_dir, verify=False).graph, merge, log).compose(tasks))


def run(model, images, tasks):
    outputs = [name for task in tasks for name in (task, f"{task}:probs")]
    return dict(zip(outputs, ort_session_for(model.SerializeToString(), ["CPUExecutionProvider"], 2).run(outputs, {"image": images})))


def units(model):
    return sorted({node.name.split("/")[0] for node in model.graph.node} - {"trunk"})


def assert_equal_answers(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        assert np.abs(got[name] - value).max() <= TOLERANCE, name


def test_tasks_of_one_architecture_run_as_one_grouped_subgraph_with_the_answers_of_their_own_graphs(timm_bundle, images):
    merged, alone = composed(timm_bundle, TASKS), composed(timm_bundle, TASKS, merge=False)
    onnx.checker.check_model(merged, full_check=True)
    assert units(merged) == ["shape+scale+orientation"] and units(alone) == sorted(TASKS)
    group = [node for node in merged.graph.node if node.name.startswith("shape+scale+orientation/")]
    convs = [node for node in group if node.op_type == "Conv"]
    per_task = [node for node in alone.graph.node if node.name.startswith("shape/") and node.op_type == "Conv"]
    assert len(convs) == len(per_task)  # one grouped Conv for the k tasks' convolutions
    groups = [helper.get_attribute_value(a) for node in convs for a in node.attribute if a.name == "group"]
    assert groups[0] == 1 and all(g % len(TASKS) == 0 for g in groups[1:])  # the stem reads the image once
    # The normalization every graph starts with, computed once for the group
    assert [n.op_type for n in group].count("Sub") == 1 and [n.op_type for n in group].count("Div") == 1
    assert [n.op_type for n in alone.graph.node if not n.name.startswith("trunk/")].count("Sub") == len(TASKS)
    answers = run(merged, images, TASKS)
    assert answers["orientation"].shape == (len(images), 40) and answers["shape"].shape == (len(images), 3)
    assert_equal_answers(answers, run(alone, images, TASKS))


def test_a_subset_of_tasks_in_another_order_merges_alike(timm_bundle, images):
    subset = ["orientation", "shape"]
    model = kfdeploy.load(timm_bundle, tasks=subset, **QUIET)
    reference = kfdeploy.load(timm_bundle, tasks=subset, merge=False, **QUIET)
    # A composition lists its tasks in the bundle's order, whatever the order they were asked in
    assert units(onnx.load_model_from_string(model._state[1].model)) == ["shape+orientation"]
    for batch in (1, len(images)):
        got, expected = model(images[:batch], logits=True), reference(images[:batch], logits=True)
        assert list(got) == subset
        assert_equal_answers(got, expected)


def test_tasks_added_and_removed_live_join_and_leave_the_merged_group(timm_bundle, images):
    model = kfdeploy.load(timm_bundle, tasks=["scale"], **QUIET)
    reference = kfdeploy.load(timm_bundle, merge=False, **QUIET)(images, logits=True)
    steps = [("add", "orientation", ["scale+orientation"]), ("add", "shape", ["shape+scale+orientation"]),
             ("remove", "scale", ["shape+orientation"]), ("remove", "orientation", ["shape"])]
    for action, task, expected_units in steps:
        getattr(model, f"{action}_task")(task)
        assert units(onnx.load_model_from_string(model._state[1].model)) == expected_units
        got = model(images, logits=True)
        assert_equal_answers(got, {t: reference[t] for t in model.tasks})


def test_the_profiler_reports_a_merged_group_as_one_module_named_by_its_tasks(timm_bundle, images):
    merged = kfdeploy.load(timm_bundle, **QUIET).profile(images[:4], runs=3, warmup=1)
    assert list(merged.tasks_ms) == ["shape+scale+orientation"] and merged.trunk_ms > 0
    assert merged.tasks_ms["shape+scale+orientation"] > 0 and "shape+scale+orientation" in merged.split()
    alone = kfdeploy.load(timm_bundle, merge=False, **QUIET).profile(images[:4], runs=3, warmup=1)
    assert list(alone.tasks_ms) == TASKS
    # Past merge_max_batch calls run one by one, and the profile is of what they run
    large = kfdeploy.load(timm_bundle, merge_max_batch=2, **QUIET).profile(images[:4], runs=3, warmup=1)
    assert list(large.tasks_ms) == TASKS


def test_save_fused_writes_the_merged_graph_the_assembly_runs(timm_bundle, images, tmp_path):
    model = kfdeploy.load(timm_bundle, **QUIET)
    written = onnx.load(model.save_fused(tmp_path / "all.onnx"))
    assert units(written) == ["shape+scale+orientation"]
    answers = run(written, images, TASKS)
    for task, logits in model(images, logits=True).items():
        np.testing.assert_array_equal(answers[task], logits)
    unmerged = kfdeploy.load(timm_bundle, merge=False, **QUIET)
    assert units(onnx.load(unmerged.save_fused(tmp_path / "one_by_one.onnx"))) == sorted(TASKS)


# -- what does not merge ------------------------------------------------------------------------
def rewrite_task(bundle_dir, task, change):
    """Replace a task's graph in the bundle with `change(graph)`, its checksum recorded anew."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    record = manifest["tasks"][task]
    model = onnx.load(str(bundle_dir / record["file"]))
    change(model.graph)
    data = model.SerializeToString()
    (bundle_dir / record["file"]).write_bytes(data)
    record.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def after_stem(graph, op, **attributes):
    """Insert `op` on the output of the graph's first Conv."""
    stem = next(node for node in graph.node if node.op_type == "Conv")
    index = list(graph.node).index(stem)
    inserted = helper.make_node(op, [stem.output[0] + "_in"], [stem.output[0]], name=f"inserted_{op}", **attributes)
    stem.output[0] += "_in"
    graph.node.insert(index + 1, inserted)


def test_tasks_whose_graphs_differ_run_one_by_one_beside_a_merged_group_and_come_and_go_live(timm_bundle, images, tmp_path):
    copy = shutil.copytree(timm_bundle, tmp_path / "mixed")
    rewrite_task(copy, "scale", lambda graph: after_stem(graph, "Relu"))  # another architecture than the others'
    model = kfdeploy.load(copy, tasks=["shape", "scale"], **QUIET)
    reference = kfdeploy.load(copy, merge=False, **QUIET)(images, logits=True)
    assert units(onnx.load_model_from_string(model._state[1].model)) == ["scale", "shape"]
    for action, task, expected_units in [("add", "orientation", ["scale", "shape+orientation"]),
                                         ("remove", "shape", ["orientation", "scale"]),
                                         ("add", "shape", ["scale", "shape+orientation"])]:
        getattr(model, f"{action}_task")(task)
        assert units(onnx.load_model_from_string(model._state[1].model)) == expected_units
        assert_equal_answers(model(images, logits=True), {t: reference[t] for t in model.tasks})


def test_graphs_with_an_operation_across_channels_run_one_by_one_and_say_why(timm_bundle, images, tmp_path):
    copy = shutil.copytree(timm_bundle, tmp_path / "across")
    for task in TASKS:  # one architecture still, but its Softmax across channels mixes them
        rewrite_task(copy, task, lambda graph: after_stem(graph, "Softmax", axis=1))
    lines = []
    merged = composed(copy, TASKS, log=lines.append)
    assert units(merged) == sorted(TASKS)
    assert lines == ["tasks shape, scale, orientation share an architecture but run one by one: their graphs cannot "
                     "be merged (Softmax is not known to be channel-local)"]
    assert_equal_answers(run(merged, images, TASKS), run(composed(copy, TASKS, merge=False), images, TASKS))


def test_a_call_past_the_merged_bound_runs_the_tasks_one_by_one_with_the_same_answers(timm_bundle, images):
    """On a CPU merged task modules win small batches and lose large ones, so a call of
    more than merge_max_batch images runs a twin composed one by one, built on first use."""
    default = kfdeploy.load(timm_bundle, **QUIET)
    composition = default._state[1]
    merged_bytes = default._composer.merged_bytes(TASKS)
    assert merged_bytes > 0 and composition.merged_rows == runtime.MERGED_CALL_BYTES // merged_bytes
    reference = kfdeploy.load(timm_bundle, merge=False, **QUIET)
    assert reference._state[1].merged_rows == runtime.sys.maxsize  # nothing merged: no twin, ever

    model = kfdeploy.load(timm_bundle, merge_max_batch=4, **QUIET)
    merged = model._state[1]
    small = model(images[:4], logits=True)
    assert merged.one_by_one is None  # not built before a call needs it
    large = model(images, logits=True)
    twin = merged.one_by_one
    assert units(onnx.load_model_from_string(merged.model)) == ["shape+scale+orientation"]
    assert units(onnx.load_model_from_string(twin.model)) == sorted(TASKS)
    assert model(images[:5], logits=True).keys() == large.keys() and merged.one_by_one is twin  # built once
    expected = reference(images, logits=True)
    for task in TASKS:
        assert np.abs(large[task] - expected[task]).max() <= TOLERANCE, task
        assert np.abs(small[task] - expected[task][:4]).max() <= TOLERANCE, task
    for bad in (0, 2.5, True, "16"):
        with pytest.raises(kfdeploy.KfError, match="merge_max_batch must be a whole number of images"):
            kfdeploy.load(timm_bundle, merge_max_batch=bad, **QUIET)


def test_a_batch_bigger_than_a_run_takes_runs_in_equal_parts_with_the_same_answers(timm_bundle, images, monkeypatch):
    whole = kfdeploy.load(timm_bundle, **QUIET)
    expected = whole(images, logits=True)
    merged_bytes = whole._composer.image_bytes(TASKS)
    assert whole._state[1].rows == runtime.RUN_BYTES // merged_bytes >= len(images)
    monkeypatch.setattr(runtime, "RUN_BYTES", 5 * merged_bytes)  # 24 images: 5 runs of 5 (4 at the end)
    parted = kfdeploy.load(timm_bundle, **QUIET)
    composition = parted._state[1]
    runs, session = [], composition.session
    composition.session = type("Counted", (), {"run": lambda self, names, feeds: runs.append(len(feeds["image"]))
                                               or session.run(names, feeds)})()
    got = parted(images, logits=True)
    assert runs == [5, 5, 5, 5, 4]
    for task in TASKS:
        np.testing.assert_array_equal(got[task], expected[task])
