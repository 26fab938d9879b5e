"""Reading a bundle trusts nothing in it: the manifest's types and strings, the graphs'
storage, the archive's size. Every refusal is one line that names the problem."""
import io
import json
import shutil
import tarfile

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from conftest import cli_fails, run_cli
from kfdeploy.bundling import bundle as bundle_module
from kfdeploy.bundling.bundle import Bundle, extract_archive, is_task_name, sha256_file
from kfdeploy.cli import main
from kfdeploy.names import TASK_NAME_RULE
from kfdeploy.errors import KfError


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def _tamper(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _no_sessions(monkeypatch):
    import onnxruntime

    def no_session(*args, **kwargs):
        raise AssertionError("a session was made from a graph the reader should have refused")
    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)


def _refused(path, expected: str) -> str:
    with pytest.raises(KfError) as caught:
        Bundle.open(path)
    message = str(caught.value)
    assert expected in message, message
    assert "\n" not in message, message
    return message


# -- the manifest's schema ----------------------------------------------------------------

def test_a_trunk_that_is_not_an_object_is_refused_naming_the_field(bundle_copy):
    _tamper(bundle_copy, lambda m: m.update(trunk="t"))
    message = _refused(bundle_copy, "manifest.json: trunk must be an object, got the string 't'")
    assert message.endswith("the bundle is damaged — re-export it")


def test_a_boolean_format_version_is_not_taken_for_an_integer(bundle_copy):
    _tamper(bundle_copy, lambda m: m.update(format_version=True))
    _refused(bundle_copy, "format_version must be an integer of at least 1, got the boolean true")


def test_json_nested_deeper_than_python_parses_is_refused_not_a_recursion_error(bundle_copy):
    (bundle_copy / "manifest.json").write_text(
        '{"format": "kfdeploy-bundle", "format_version": 1, "model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(bundle_copy, "nests its JSON deeper than Python can parse")


def test_an_integer_too_long_to_convert_is_refused_as_invalid_json(bundle_copy):
    _tamper(bundle_copy, lambda m: m.update(created=0))
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace('"created": 0', '"created": ' + "9" * 5000))
    _refused(bundle_copy, "is not valid JSON")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(classes="3"), 'tasks["shape"].classes must be an integer, got the string \'3\''),
    (lambda t: t.update(classes=0), 'tasks["shape"].classes must be at least 1, got the integer 0'),
    (lambda t: t.update(labels=[0, 1, 2]), 'tasks["shape"].labels[0] must be a string, got the integer 0'),
    (lambda t: t.update(labels="square"), 'tasks["shape"].labels must be an array'),
    (lambda t: t.update(labels=["square", "ellipse"]), 'tasks["shape"].labels must hold one label per class (3), got 2'),
    (lambda t: t.update(heldout_accuracy="0.9"), 'tasks["shape"].heldout_accuracy must be a number or null, got the string \'0.9\''),
    (lambda t: t.pop("heldout_accuracy"), 'tasks["shape"].heldout_accuracy is missing'),
    (lambda t: t["parity"].update(argmax_agreement=None), 'tasks["shape"].parity.argmax_agreement must be a number, got null'),
    (lambda t: t.update(weights=[]), 'tasks["shape"].weights must be an object, got []'),
    (lambda t: t.update(heldout_accuracy=5.0), 'tasks["shape"].heldout_accuracy must be a number from 0 to 1, got the number 5.0'),
], ids=["classes-str", "classes-0", "labels-int", "labels-str", "labels-count", "accuracy-str", "accuracy-missing",
        "parity-null", "weights-list", "accuracy-above-1"])
def test_wrong_types_in_a_task_are_refused_naming_the_field(bundle_copy, change, message):
    _tamper(bundle_copy, lambda m: change(m["tasks"]["shape"]))
    _refused(bundle_copy, message)


def test_tasks_that_are_not_an_object_are_refused(bundle_copy):
    _tamper(bundle_copy, lambda m: m.update(tasks=["shape"]))
    _refused(bundle_copy, 'tasks must be an object, got ["shape"]')


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(shape=["batch", 1, 64]), 'input.shape must be ["batch", C, H, W] with C, H and W positive integers, got ["batch", 1, 64]'),
    (lambda i: i.update(shape=["batch", 1, "64", 64]), "input.shape must be"),
    (lambda i: i.update(range="0..1"), "input.range must be an array, got the string '0..1'"),
    (lambda i: i.update(range=[1.0, 0.0]), "input.range must be [low, high] with low < high, got [1.0, 0.0]"),
    (lambda i: i.update(range=[0, True]), "input.range[1] must be a number, got the boolean true"),
    (lambda i: i["batch"].update(max=0), "input.batch.max must be at least 1, got the integer 0"),
    (lambda i: i["batch"].update(min=64, opt=8), "input.batch must have min <= opt <= max, got 64, 8, 256"),
    (lambda i: i.pop("batch"), "input.batch is missing"),
    (lambda i: i.update(dtype="uint8"), "input.dtype must be \"float32\", got the string 'uint8'"),
], ids=["shape-rank", "shape-str", "range-str", "range-order", "range-bool", "batch-0", "batch-order", "batch-missing", "dtype"])
def test_a_malformed_input_spec_is_refused_naming_the_field(bundle_copy, change, message):
    _tamper(bundle_copy, lambda m: change(m["input"]))
    _refused(bundle_copy, message)


def _write_raw(folder, change, token: str):
    """The manifest with `change` putting a placeholder where `token` (JSON text Python's json
    would not write, e.g. NaN or 1e999) then goes."""
    _tamper(folder, lambda m: change(m, "@TOKEN@"))
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"@TOKEN@"', token))


@pytest.mark.parametrize("token, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"), ("1e999", "inf")])
@pytest.mark.parametrize("where, change", [
    ("trunk.parity.max_abs_err", lambda m, x: m["trunk"]["parity"].update(max_abs_err=x)),
    ('tasks["shape"].parity.argmax_agreement', lambda m, x: m["tasks"]["shape"]["parity"].update(argmax_agreement=x)),
    ('tasks["scale"].heldout_accuracy', lambda m, x: m["tasks"]["scale"].update(heldout_accuracy=x)),
    ("parity_tolerance.max_rel_err", lambda m, x: m["parity_tolerance"].update(max_rel_err=x)),
    ("input.normalization.std[0]", lambda m, x: m["input"]["normalization"]["std"].__setitem__(0, x)),
    ("input.range[1]", lambda m, x: m["input"]["range"].__setitem__(1, x)),
    ("model.trunk.width", lambda m, x: m["model"]["trunk"].update(width=x)),  # read by the torch backend
    ("trunk.notes[0]", lambda m, x: m["trunk"].update(notes=[x])),  # a field readers ignore; inspect --json prints it
], ids=["parity", "agreement", "accuracy", "tolerance", "normalization", "range", "model", "unknown-field"])
def test_nan_and_infinity_are_refused_in_every_numeric_field(bundle_copy, where, change, token, shown):
    _write_raw(bundle_copy, change, token)
    _refused(bundle_copy, f"{where} must be a finite number (JSON has no NaN or Infinity), got the number {shown}")


@pytest.mark.parametrize("opening, doubled, key", [
    ("{", '{"format": "x", ', "format"),
    ('"tasks": {"shape": {', '"tasks": {"shape": {"classes": 99, ', "classes"),
    ('"tasks": {', '"tasks": {"shape": {}, ', "shape"),
], ids=["top-level", "in-a-task", "a-task"])
def test_a_key_given_twice_is_refused_naming_the_key(bundle_copy, opening, doubled, key):
    # Python keeps the last value, other readers the first (or refuse): the same bundle must
    # not mean two things to two readers.
    _tamper(bundle_copy, lambda m: None)  # written compactly, as `opening` expects
    text = (bundle_copy / "manifest.json").read_text()
    assert opening in text
    (bundle_copy / "manifest.json").write_text(text.replace(opening, doubled, 1))
    _refused(bundle_copy, f"manifest.json gives the key {key!r} twice in one object (JSON readers disagree on which one counts)")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(file=3), "trunk.weights.file must be a string, got the integer 3"),
    (lambda r: r.update(file="../../etc/passwd"), "trunk.weights.file must be a relative path inside the bundle, got the string '../../etc/passwd' (it climbs out with '..')"),
    (lambda r: r.update(sha256=r["sha256"].upper()), "trunk.weights.sha256 must be 64 lowercase hex digits (a SHA-256)"),
    (lambda r: r.update(sha256="abc"), "trunk.weights.sha256 must be 64 lowercase hex digits (a SHA-256), got the string 'abc'"),
    (lambda r: r.update(bytes=-1), "trunk.weights.bytes must be at least 0, got the integer -1"),
    (lambda r: r.update(bytes=1.5), "trunk.weights.bytes must be an integer, got the number 1.5"),
    (lambda r: r.update(file="w/" * 17 + "t"), "trunk.weights.file must be a relative path inside the bundle, got the string "
                                               "'w/w/w/w/w/w/w/w/w/w/w/w/w/w/w/w/w/t' (it is more than 16 folders deep)"),
    (lambda r: r.update(file="w" * 256), "(it is longer than 255 characters)"),
], ids=["file-int", "file-escapes", "sha-upper", "sha-short", "bytes-negative", "bytes-float", "file-deep", "file-long"])
def test_a_malformed_file_record_is_refused_naming_the_field(bundle_copy, change, message):
    _tamper(bundle_copy, lambda m: change(m["trunk"]["weights"]))
    _refused(bundle_copy, message)


def _engine(**changes):
    return {"module": "trunk", "file": "trunk.onnx", "sha256": "0" * 64, "bytes": 1, "builder": "tensorrt",
            "precision": "fp16", "device": {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3", "cuda": "12.6"},
            "batch": {"min": 1, "opt": 4, "max": 32}, **changes}


@pytest.mark.parametrize("engines, message", [
    ({}, "engines must be an array, got an object"),
    ([_engine(module="colour")], "engines[0].module must be 'trunk' or a task of this bundle, got the string 'colour'"),
    ([_engine(module="../trunk")], "engines[0].module must be \"trunk\" or a task name"),
    ([_engine(builder="trtexec")], "engines[0].builder must be \"tensorrt\" or \"torch-tensorrt\", got the string 'trtexec'"),
    ([_engine(precision="int8")], "engines[0].precision must be \"fp32\" or \"fp16\""),
    ([_engine(device="orin")], "engines[0].device must be an object, got the string 'orin'"),
    ([_engine(device={"gpu": 87})], "engines[0].device.gpu must be a string or null, got the integer 87"),
], ids=["object", "unknown-module", "module-path", "builder", "precision", "device-str", "gpu-int"])
def test_malformed_engine_records_are_refused_naming_the_field(bundle_copy, engines, message):
    _tamper(bundle_copy, lambda m: m.update(engines=engines))
    _refused(bundle_copy, message)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../../x", "a b", "", "trunk", "image", "common", "t" * 65])
def test_a_task_name_that_cannot_be_a_file_name_or_would_shadow_a_graph_name_is_refused_on_read(bundle_copy, name):
    # "trunk" would shadow the trunk module; "image" and "common" are every task graph's inputs
    assert not is_task_name(name)
    _tamper(bundle_copy, lambda m: m["tasks"].update({name: m["tasks"].pop("shape")}))
    shown = repr(name) if len(name) <= 40 else repr(name[:40]) + "..."  # long names are cut short
    _refused(bundle_copy, f"the key {shown} of tasks must be a task name ({TASK_NAME_RULE})")


@pytest.mark.parametrize("where", ["range", "mean"])
def test_an_integer_too_large_for_a_float_is_refused_naming_the_field(bundle_copy, where):
    huge = 10 ** 400
    if where == "range":
        _tamper(bundle_copy, lambda m: m["input"].update(range=[0, huge]))
        _refused(bundle_copy, "input.range[1] must be a number a float can hold, got the integer 1000")
    else:
        _tamper(bundle_copy, lambda m: m["input"].update(normalization={"mean": [huge], "std": [1.0], "in_graph": True}))
        _refused(bundle_copy, "input.normalization.mean[0] must be a number a float can hold")


@pytest.mark.parametrize("field, text", [
    ("label", r"\u001b[31mred"), ("created", r"\ud800"), ("producer", r"\u001b]0;owned\u0007"),
], ids=["escape-in-label", "lone-surrogate", "terminal-title"])
def test_text_with_control_characters_or_lone_surrogates_is_refused(bundle_copy, field, text):
    # Such text would reach the terminal of whoever runs `kfdeploy inspect` on the bundle.
    value = json.loads(f'"{text}"')
    where = {"label": 'tasks["shape"].labels[0]', "created": "created", "producer": "producer.kfdeploy"}[field]
    _tamper(bundle_copy, {"label": lambda m: m["tasks"]["shape"]["labels"].__setitem__(0, value),
                          "created": lambda m: m.update(created=value),
                          "producer": lambda m: m["producer"].update(kfdeploy=value)}[field])
    _refused(bundle_copy, f"{where} must be text without control characters or lone surrogates")
    result = run_cli("inspect", str(bundle_copy))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "\x1b" not in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["trunk", "task"])
def test_a_fingerprint_that_climbs_out_of_the_cache_is_refused(bundle_copy, where):
    # The TensorRT EP cache joins the fingerprint into a folder path under $KFDEPLOY_CACHE.
    if where == "trunk":
        _tamper(bundle_copy, lambda m: m["trunk"].update(fingerprint="../../../../tmp/owned"))
        _refused(bundle_copy, "trunk.fingerprint must be 64 lowercase hex digits (a SHA-256), got the string '../../../../tmp/owned'")
    else:
        _tamper(bundle_copy, lambda m: m["tasks"]["scale"].update(trunk_fingerprint="../.."))
        _refused(bundle_copy, 'tasks["scale"].trunk_fingerprint must be 64 lowercase hex digits (a SHA-256), got the string \'../..\'')


def test_unknown_fields_and_absent_optional_fields_are_accepted(bundle_copy):
    def change(m):
        m["added_by_a_newer_writer"] = {"anything": [1, 2]}
        m["trunk"]["notes"] = "kept"
        for optional in ("created", "profile", "source", "parity_tolerance", "engines"):
            m.pop(optional)
        m["tasks"]["shape"]["heldout_accuracy"] = None
    _tamper(bundle_copy, change)
    opened = Bundle.open(bundle_copy)
    assert opened.manifest["added_by_a_newer_writer"] == {"anything": [1, 2]}  # the plain dict, as parsed
    assert opened.tasks and opened.input_shapes("shape")["image"][0][1:] == tuple(opened.manifest["input"]["shape"][1:])


def test_untrusted_text_quoted_in_a_message_is_cut_short_and_escaped(bundle_copy):
    key = "\x1b[2J\x1b]0;owned\x07" * 100_000  # clears the screen and retitles the terminal, 1.8 MB of it
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text.replace("{", "{" + json.dumps(key) + ": 1, " + json.dumps(key) + ": 2, ", 1))
    message = _refused(bundle_copy, "manifest.json gives the key '\\x1b[2J\\x1b]0;owned\\x07")
    assert len(message.replace(str(bundle_copy), "")) < 200 and "\x1b" not in message, message


def test_a_bundle_of_thousands_of_tasks_lists_a_few_when_one_is_unknown(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    many = Bundle(bundle, {**manifest, "tasks": {f"task_{i}": {} for i in range(5000)}})
    with pytest.raises(KfError, match=r"unknown task 'colour' in bundle .*; available: task_0, task_1, .* and 49\d\d more$"):
        many.task("colour")


def test_inspect_on_a_malformed_manifest_prints_one_line_and_exits_2(bundle_copy):
    _tamper(bundle_copy, lambda m: m.update(trunk="t"))
    result = run_cli("inspect", str(bundle_copy))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("kfdeploy: error: ") and "trunk must be an object, got the string 't'" in result.stderr


# -- graphs keep their tensors inside ------------------------------------------------------

def _move_weight_outside(folder, location: str):
    """Rewrite the trunk's largest initializer as external data at `location` (relative to
    the graph), and re-record the graph's checksum so that only the external-data rule can
    catch it."""
    model = onnx.load(str(folder / "trunk.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    assert data
    (folder / location).write_bytes(data)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(data))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    (folder / "trunk.onnx").write_bytes(model.SerializeToString())
    _tamper(folder, lambda m: m["trunk"].update(sha256=sha256_file(folder / "trunk.onnx"), bytes=(folder / "trunk.onnx").stat().st_size))
    return tensor.name


@pytest.mark.parametrize("location", ["trunk.data", "../outside.data"], ids=["inside", "outside"])
def test_a_graph_with_tensors_in_an_external_file_is_refused_before_any_session(bundle_copy, location, monkeypatch, capsys):
    tensor = _move_weight_outside(bundle_copy, location)
    expected = f"trunk.onnx in bundle {bundle_copy} keeps tensor {tensor!r} in an external file"
    _refused(bundle_copy, expected)
    _no_sessions(monkeypatch)
    for command in ("verify", "check-trt", "inspect"):
        assert main([command, str(bundle_copy)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (command, err)


def test_a_graph_whose_names_are_not_utf8_is_refused_when_read(bundle_copy, monkeypatch, capfd):
    # Found by tests/test_fuzz_reader.py: protobuf parsed the graph and handed out a node's input
    # name as bytes, on which composing failed (UnicodeDecodeError) and ONNX Runtime printed "EP Error"
    data = bytearray((bundle_copy / "trunk.onnx").read_bytes())
    data[data.index(b"image")] ^= 0x80  # "image" as b"\xe9mage": a name, and no UTF-8
    (bundle_copy / "trunk.onnx").write_bytes(bytes(data))
    _tamper(bundle_copy, lambda m: m["trunk"].update(sha256=sha256_file(bundle_copy / "trunk.onnx")))
    _no_sessions(monkeypatch)
    expected = (f"trunk.onnx in bundle {bundle_copy} is not a readable ONNX graph (text in its onnx.NodeProto.input is not "
                "UTF-8); re-export the bundle")
    _refused(bundle_copy, expected)
    cli_fails(["run", str(bundle_copy), str(bundle_copy / "examples" / "0.png")], capfd, expected)


# -- graphs take and give what the manifest says --------------------------------------------

def _rewrite_graph(folder, relative: str, change):
    """Change a module's graph and re-record its checksum, so that only the check under test
    can catch it."""
    model = onnx.load(str(folder / relative))
    change(model)
    (folder / relative).write_bytes(model.SerializeToString())
    module = "trunk" if relative == "trunk.onnx" else relative.split("/")[1].removesuffix(".onnx")
    _tamper(folder, lambda m: (m["trunk"] if module == "trunk" else m["tasks"][module]).update(
        sha256=sha256_file(folder / relative), bytes=(folder / relative).stat().st_size))


def _rename_input(model, old: str, new: str):
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


@pytest.mark.parametrize("case", ["task-input-renamed", "task-outputs-wider", "trunk-input-smaller", "trunk-batch-fixed",
                                  "task-output-rank-unknown"])
def test_a_graph_that_does_not_take_or_give_what_the_manifest_says_is_refused(bundle_copy, case):
    if case == "trunk-batch-fixed":
        _rewrite_graph(bundle_copy, "trunk.onnx",
                       lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 1))
        expected = "trunk.onnx in bundle {} has 'image' of shape (1, 1, 64, 64) where the manifest says (batch, 1, 64, 64)"
    elif case == "task-output-rank-unknown":
        _rewrite_graph(bundle_copy, "tasks/shape.onnx", lambda m: m.graph.output[0].type.tensor_type.ClearField("shape"))
        expected = "tasks/shape.onnx in bundle {} has 'logits' of unknown rank where the manifest says (batch, 3)"
    elif case == "task-input-renamed":
        _rewrite_graph(bundle_copy, "tasks/shape.onnx", lambda m: _rename_input(m, "common", "feat"))
        expected = "tasks/shape.onnx in bundle {} must take the inputs image, common and give one output (it takes image, feat"
    elif case == "task-outputs-wider":
        _rewrite_graph(bundle_copy, "tasks/shape.onnx",
                       lambda m: setattr(m.graph.output[0].type.tensor_type.shape.dim[1], "dim_value", 5))
        expected = "tasks/shape.onnx in bundle {} has 'logits' of shape (?, 5) where the manifest says (batch, 3)"
    else:
        _tamper(bundle_copy, lambda m: m["input"].update(shape=["batch", 1, 32, 32]))
        expected = "trunk.onnx in bundle {} has 'image' of shape (?, 1, 64, 64) where the manifest says (batch, 1, 32, 32)"
    message = _refused(bundle_copy, expected.format(bundle_copy))
    assert message.endswith("re-export the bundle"), message


def test_a_task_graph_taking_its_inputs_in_the_other_order_composes_by_name(bundle, bundle_copy):
    import kfdeploy

    _rewrite_graph(bundle_copy, "tasks/shape.onnx", lambda m: m.graph.input.reverse())
    images = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    quiet = {"tasks": ["shape"], "log": lambda line: None}
    np.testing.assert_array_equal(kfdeploy.load(bundle_copy, **quiet)(images)["shape"], kfdeploy.load(bundle, **quiet)(images)["shape"])


def test_a_graph_onnx_runtime_cannot_run_is_a_one_line_error(bundle_copy):
    import kfdeploy

    def relu_of_two_inputs(model):
        model.graph.node.append(onnx.helper.make_node("Relu", ["common", "common"], ["relu_out"]))
    _rewrite_graph(bundle_copy, "tasks/shape.onnx", relu_of_two_inputs)
    with pytest.raises(KfError, match=r"^ONNX Runtime [0-9.]+ cannot run this bundle's graphs \(.*\); re-export") as caught:
        kfdeploy.load(bundle_copy, tasks=["shape"], log=lambda line: None)
    assert "\n" not in str(caught.value)


def _append_node(op: str, domain: str = "", inputs=("common",), **attributes):
    def change(model):
        model.graph.node.append(onnx.helper.make_node(op, list(inputs), [f"{op}_out"], name=f"{op}_node", domain=domain, **attributes))
    return change


@pytest.mark.parametrize("relative, change, op", [
    ("tasks/shape.onnx", _append_node("Loop", inputs=("", "")), "Loop"),
    ("trunk.onnx", _append_node("If", inputs=("image",)), "If"),
    ("tasks/shape.onnx", _append_node("ConstantOfShape"), "ConstantOfShape"),
    ("tasks/shape.onnx", _append_node("Mystery", domain="com.example"), "com.example.Mystery"),
], ids=["loop", "if", "constant-of-shape", "other-domain"])
def test_an_operator_no_export_emits_is_refused_when_the_graph_is_read(bundle_copy, monkeypatch, capsys, relative, change, op):
    # Loops and allocations sized by data are what a graph built to hang or exhaust memory uses
    _rewrite_graph(bundle_copy, relative, change)
    _no_sessions(monkeypatch)
    which = "the trunk" if relative == "trunk.onnx" else "task module 'shape'"
    expected = (f"{relative} in bundle {bundle_copy} ({which}) uses the operator {op!r} (node '{op.split('.')[-1]}_node'), "
                "which this kfdeploy never exports; refusing it before any session — re-export the bundle with kfdeploy")
    _refused(bundle_copy, expected)
    for command in (["run", str(bundle_copy), str(bundle_copy / "examples" / "0.png")], ["verify", str(bundle_copy)]):
        cli_fails(command, capsys, expected)


def _constant(model, name: str, values, dtype=onnx.TensorProto.INT64):
    model.graph.initializer.append(onnx.helper.make_tensor(name, dtype, [len(values)] if len(values) > 1 else [], values))


@pytest.mark.parametrize("case", ["expand", "range", "padding"])
def test_a_constant_that_sizes_an_output_absurdly_is_refused(bundle_copy, monkeypatch, case):
    def expand(model):
        _constant(model, "huge_shape", [1 << 20, 1 << 20])
        _append_node("Expand", inputs=("common", "huge_shape"))(model)

    def range_(model):
        for name, value in (("start", 0), ("limit", 10 ** 12), ("delta", 1)):
            _constant(model, name, [value])
        _append_node("Range", inputs=("start", "limit", "delta"))(model)

    def padding(model):
        conv = next(node for node in model.graph.node if node.op_type == "Conv")
        next(a for a in conv.attribute if a.name == "pads").ints[:] = [100_000] * 4
    _rewrite_graph(bundle_copy, "tasks/shape.onnx", {"expand": expand, "range": range_, "padding": padding}[case])
    _no_sessions(monkeypatch)
    _refused(bundle_copy, {
        "expand": "(task module 'shape') has a node 'Expand_node' whose constants make Expand give 1.1e+12 elements, more than 268435456",
        "range": "(task module 'shape') has a node 'Range_node' whose constants make Range give 1e+12 elements, more than 268435456",
        "padding": "padded by '[100000, 100000, 100000, 100000]' around a kernel of '[4, 4]': exports pad less than the kernel",
    }[case])


# -- graphs that fail or lie at run time ---------------------------------------------------

def _through(make_nodes):
    """A change that routes a graph's output through `make_nodes(before, after)` (names of
    the old output and of the graph's output), and leaves its width unstated."""
    def change(model):
        output = model.graph.output[0]
        producer = next(node for node in model.graph.node if output.name in node.output)
        producer.output[list(producer.output).index(output.name)] = "before_output"
        model.graph.node.extend(make_nodes("before_output", output.name))
        output.type.tensor_type.shape.dim[1].dim_param = "width"
    return change


def _allocating_without_bound(model):
    """Adds to the output a mean over an Expand sized by the image's shape times constants:
    operators exports emit, a size known only at run time (10^14 elements for 2 images)."""
    model.graph.initializer.extend([onnx.helper.make_tensor("by", onnx.TensorProto.INT64, [4], [1000, 1000, 100, 100]),
                                    onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])])
    return _through(lambda before, after: [
        onnx.helper.make_node("Shape", ["image"], ["image_shape"]),
        onnx.helper.make_node("Mul", ["image_shape", "by"], ["huge_shape"]),
        onnx.helper.make_node("Expand", ["one", "huge_shape"], ["huge"], name="allocates"),
        onnx.helper.make_node("ReduceMean", ["huge"], ["mean"], keepdims=0),
        onnx.helper.make_node("Add", [before, "mean"], [after]),
    ])(model)


def _twice_as_wide(model):
    _through(lambda before, after: [onnx.helper.make_node("Concat", [before, before], [after], axis=1)])(model)


@pytest.fixture(scope="module")
def png(bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("png") / "0.png"
    shutil.copy(bundle / "examples" / "0.png", path)
    return path


def test_a_graph_that_fails_while_running_is_one_line_naming_its_module(bundle_copy, png, capfd):
    import kfdeploy

    _rewrite_graph(bundle_copy, "tasks/shape.onnx", _allocating_without_bound)
    model = kfdeploy.load(bundle_copy, tasks=["scale", "shape"], log=lambda line: None)  # composed: one graph
    images = np.zeros((2, 1, 64, 64), np.float32)
    with pytest.raises(KfError, match=r"^task module 'shape' failed while running in ONNX Runtime \(.*running Expand node. Name:'shape/allocates' "
                                      r"Status Message: .*\); if the batch is large, call with fewer images, else the bundle's graphs are "
                                      r"damaged: check it with `kfdeploy verify`, or re-export it$"):
        model(images)
    assert "onnxruntime" not in capfd.readouterr().err  # its own error lines stay off the terminal
    for command in (["run", str(bundle_copy), str(png)], ["verify", str(bundle_copy)]):
        cli_fails(command, capfd, "task module 'shape' failed while running in ONNX Runtime")


def test_a_graph_whose_output_is_wider_than_its_manifest_says_is_refused_at_each_call(bundle_copy, png, capfd):
    import kfdeploy

    _rewrite_graph(bundle_copy, "tasks/shape.onnx", _twice_as_wide)
    model = kfdeploy.load(bundle_copy, tasks=["shape"], log=lambda line: None)
    with pytest.raises(KfError, match=r"^task module 'shape' gave scores of shape \(2, 6\) for 2 image\(s\), where the manifest "
                                      r"says 3 classes: its graph does not compute what bundle .* declares; re-export the bundle$"):
        model(np.zeros((2, 1, 64, 64), np.float32))
    cli_fails(["run", str(bundle_copy), str(png)], capfd, "task module 'shape' gave scores of shape (1, 6) for 1 image(s)")
    cli_fails(["verify", str(bundle_copy)], capfd, "task module 'shape' gave an output of shape (256, 6) for 256 image(s) "
                                                   "where the manifest says (256, 3)")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(image_size="64"), "model.trunk.image_size must be int, got str '64'"),
    (lambda t: t.update(arch=5), "model.trunk.arch must be str, got int 5"),
    (lambda t: t.update(in_channels=1.5), "model.trunk.in_channels must be int, got float 1.5"),
    (lambda t: t.update(width=-3), "model.trunk.width must be at least 1, got -3"),
], ids=["size-str", "arch-int", "channels-float", "width-negative"])
def test_a_model_configuration_of_the_wrong_types_is_refused_before_a_network_is_built(bundle_copy, change, message):
    import kfdeploy

    _tamper(bundle_copy, lambda m: change(m["model"]["trunk"]))
    with pytest.raises(KfError, match="model is not a factor network configuration") as caught:
        kfdeploy.load(bundle_copy, backend="torch", log=lambda line: None)
    assert message in str(caught.value)


def test_a_model_configuration_too_large_for_its_weights_is_refused_before_memory_is_spent(bundle_copy, monkeypatch):
    import torch

    import kfdeploy
    from kfdeploy.bundling import export

    _tamper(bundle_copy, lambda m: m["model"]["trunk"].update(width=10 ** 6))  # ~10^14 parameters if built
    devices = []

    def build(config):
        devices.append(str(torch.empty(0).device))
        if devices[-1] != "meta":
            pytest.fail("the network was built with storage before its weights were checked")
        return real_factor_net(config)
    real_factor_net = export.FactorNet
    monkeypatch.setattr(export, "FactorNet", build)
    with pytest.raises(KfError, match=r"^trunk weights: the weights do not fit the configured model \(.*in trunk.safetensors, "
                                      r"\(1000000, .*\) configured\)"):
        kfdeploy.load(bundle_copy, backend="torch", log=lambda line: None)
    assert devices == ["meta"]


# -- archives ----------------------------------------------------------------------------

def _archive(path, members):
    """A .tar.gz of (name, payload bytes) regular files."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_an_archive_that_unpacks_beyond_the_size_limit_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundle_module, "MAX_ARCHIVE_BYTES", 1 << 20)
    bomb = _archive(tmp_path / "bomb.tar.gz", [("manifest.json", b"{}"), ("zeros.bin", bytes(16 << 20))])
    assert bomb.stat().st_size < 100_000  # 16 MiB of zeros packs into a few kB
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(KfError, match=r"unpacks to more than 1048576 bytes, more than any bundle .*refusing to extract it"):
        extract_archive(bomb, target)
    assert list(target.iterdir()) == []
    assert main(["inspect", str(bomb)]) == 2
    assert "unpacks to more than 1048576 bytes" in capsys.readouterr().err


def test_an_archive_with_too_many_members_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_module, "MAX_ARCHIVE_MEMBERS", 10)
    many = _archive(tmp_path / "many.tar.gz", [(f"f{i}", b"") for i in range(50)])
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(KfError, match="has more than 10 members, more than any bundle; refusing to extract it"):
        extract_archive(many, target)
    assert list(target.iterdir()) == []


def test_an_archive_holding_the_same_file_twice_is_refused(tmp_path):
    twice = _archive(tmp_path / "twice.tar.gz", [("manifest.json", b"{}"), ("./manifest.json", b"{}")])
    with pytest.raises(KfError, match="has the file './manifest.json' twice"):
        extract_archive(twice, tmp_path / "out")


@pytest.mark.parametrize("name, reason", [
    ("a/" * 2020 + "f", "it is longer than 255 characters"),  # made folder by folder, pathlib's mkdir recursed past the limit
    ("d/" * 17 + "f", "it is more than 16 folders deep"),
    ("x" * 100_000, "it is longer than 255 characters"),
    ("\x1b]0;owned\x07" * 1000, "it is longer than 255 characters"),
], ids=["thousands-of-folders", "deep", "long", "escape-sequences"])
def test_an_archive_member_with_an_absurd_name_is_refused_in_one_short_line(tmp_path, capsys, name, reason):
    archive = _archive(tmp_path / "absurd.tar.gz", [(name, b"x")])
    err = cli_fails(["inspect", str(archive)], capsys, f"which is not a path inside a bundle ({reason}); refusing to extract it")
    assert len(err.replace(str(archive), "")) < 400 and "\x1b" not in err and "\x07" not in err, err


def test_archives_open_on_a_python_whose_tarfile_lacks_the_data_filter(bundle, tmp_path, monkeypatch):
    # Python 3.11.0-3.11.3: no tarfile.data_filter, and extractall takes no `filter`.
    extractall = tarfile.TarFile.extractall

    def old_extractall(self, path=".", members=None, *, numeric_owner=False, **kwargs):
        if kwargs:
            raise TypeError(f"extractall() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return extractall(self, path, members, numeric_owner=numeric_owner)
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)

    opened = Bundle.open(str(bundle) + ".tar.gz")
    assert opened.tasks == Bundle.open(bundle).tasks
    escape = _archive(tmp_path / "evil.tar.gz", [("../escape.txt", b"x")])
    (tmp_path / "out").mkdir()
    with pytest.raises(KfError, match="climbs out with '..'"):
        extract_archive(escape, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()  # where '../escape.txt' would have landed


def test_a_module_read_after_the_bundle_was_swapped_says_so(bundle_copy, tmp_path):
    """export and add-task --replace swap a new folder in whole: a reader that opened the old
    one and reads a module after the swap gets the new bundle's file. That is not damage,
    and the message must not say re-export; what helps is opening the bundle again."""
    opened = Bundle.open(bundle_copy)
    replacement = tmp_path / "replacement"
    shutil.copytree(bundle_copy, replacement)
    (replacement / "tasks" / "shape.onnx").write_bytes(b"retrained")  # what --replace rewrote, in short
    bundle_copy.rename(tmp_path / "old")
    replacement.rename(bundle_copy)
    with pytest.raises(KfError, match=r"was replaced on disk while it was being read \(tasks/shape.onnx is the new "
                                      r"bundle's, e.g. after `kfdeploy add-task --replace`\); open or load it again$"):
        opened.graph("shape")
    # the same file damaged in a bundle nobody swapped is still a checksum mismatch
    with pytest.raises(KfError, match=r"checksum mismatch for tasks/shape.onnx"):
        Bundle.open(bundle_copy, verify=False).graph("shape")
