"""The bundle reader under property-based fuzzing: whatever a bundle holds, Bundle.open gives a
Bundle whose accessors answer, which `kfdeploy inspect` prints, whose manifest is plain JSON
(no NaN or Infinity) and which kfdeploy.load composes into scores of the manifest's shapes,
or one of them raises KfError; never another exception.

Each example is a real bundle (the session's) with its manifest and graphs mutated: values
swapped for others of any JSON type (huge, negative, non-finite numbers, unicode text),
keys removed or given twice, the text truncated, graph bytes cut or flipped, nodes and
shapes changed, with checksums re-recorded so the mutation reaches the parser. The examples
are the same on every run; KFDEPLOY_FUZZ_EXAMPLES=5000 searches longer with fresh random
ones. Each crash found became a named regression test in test_bundle.py.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import kfdeploy
from kfdeploy.bundling import bundle as bundle_module
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.cli import main
from kfdeploy.errors import KfError

EXAMPLES = os.environ.get("KFDEPLOY_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 120), deadline=None, database=None, derandomize=EXAMPLES is None)
MODULE_FILES = ("trunk.onnx", "tasks/shape.onnx", "tasks/scale.onnx")

numbers = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, -1, 10 ** 400, -(10 ** 400)]),
                    st.floats(allow_nan=True, allow_infinity=True))
leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12), st.sampled_from(["", "..", "/etc/passwd", "a" * 300]))
# Keys a mutation may add: the schema's own field names (engines, variants, examples, ...) or any text
keys = st.sampled_from(sorted({f.name for item in vars(bundle_module).values() if dataclasses.is_dataclass(item)
                               for f in dataclasses.fields(item)} | {"int8", "fp16", "shape"})) | st.text(max_size=8)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)


def _paths(value, path=()):
    """Every place in a parsed manifest, as a tuple of keys and indexes."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, (*path, key))


def _mutate_value(manifest: dict, data) -> None:
    path = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
    *parents, last = path
    parent = manifest
    for key in parents:
        parent = parent[key]
    how = data.draw(st.sampled_from(["replace", "delete", "retype", "add"]))
    if how == "add":  # beside the place: a key into its object, an item into its array
        if isinstance(parent, dict):
            parent[data.draw(keys)] = data.draw(values)
        else:
            parent.append(data.draw(values))
    elif how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = data.draw(values)
    else:  # the same value as another JSON type
        old = parent[last]
        parent[last] = data.draw(st.sampled_from([[old], {"value": old}, json.dumps(old)]))


def _double_a_key(text: str, data) -> str:
    """The manifest's text with one key given twice, the first time with another value."""
    starts = [i for i in range(len(text)) if text.startswith('": ', i)]
    end = data.draw(st.sampled_from(starts))
    start = text.rindex('"', 0, end)
    key = text[start:end + 1]
    return text[:start] + key + ": " + json.dumps(data.draw(values)) + ", " + text[start:]


def _mutate_graph(model_bytes: bytes, data) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "flip", "op", "drop-node", "dim", "elem-type"]))
    if how == "truncate":
        return model_bytes[:data.draw(st.integers(0, len(model_bytes) - 1))]
    if how == "flip":
        flipped = bytearray(model_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            flipped[data.draw(st.integers(0, len(flipped) - 1))] ^= data.draw(st.integers(1, 255))
        return bytes(flipped)
    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    if how == "op":
        node = graph.node[data.draw(st.integers(0, len(graph.node) - 1))]
        node.op_type = data.draw(st.sampled_from(["Loop", "If", "ConstantOfShape", "Tile", "Relu", "Conv"]) | st.text(max_size=6))
    elif how == "drop-node":
        del graph.node[data.draw(st.integers(0, len(graph.node) - 1))]
    else:
        value = data.draw(st.sampled_from([*graph.input, *graph.output]))
        tensor = value.type.tensor_type
        if how == "elem-type":
            tensor.elem_type = data.draw(st.integers(0, 30))
        else:
            dim = tensor.shape.dim[data.draw(st.integers(0, len(tensor.shape.dim) - 1))]
            dim.dim_value = data.draw(st.integers(0, 2 ** 62))
    return model.SerializeToString()


@pytest.fixture(scope="module")
def pristine(bundle):
    return bundle, json.loads((bundle / "manifest.json").read_text())


def _linked_copy(source: Path, target: Path) -> None:
    """Hard links to every file: a mutated file is replaced, never written through a link."""
    for path in sorted(source.rglob("*")):
        copy = target / path.relative_to(source)
        if path.is_dir():
            copy.mkdir()
        else:
            os.link(path, copy)


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _read(folder: Path) -> None:
    """Open the bundle as every reader does, and use what it gives, up to one call of an
    assembly; KfError is the one way out."""
    try:
        opened = Bundle.open(folder)
    except KfError:
        event("refused")  # --hypothesis-show-statistics: how many examples reach each end
        return
    event("read")
    for module in opened.modules():
        opened.input_shapes(module)
        opened.variant(module)
    for task in opened.tasks:
        opened.task(task)
    opened.normalization(), opened.pixel_types(), opened.precisions(), list(opened.entries()), opened.image_size
    json.dumps(opened.manifest, allow_nan=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["inspect", str(folder)]) == 0
    tasks = opened.tasks[:2]
    try:
        scores = kfdeploy.load(opened, tasks=tasks, log=lambda line: None, threads=1)(np.zeros((2, *opened.manifest["input"]["shape"][1:]), np.float32))
    except KfError:
        return
    assert {task: s.shape for task, s in scores.items()} == {task: (2, opened.task(task)["classes"]) for task in tasks}


@FUZZ
@given(data=st.data())
def test_a_mutated_manifest_reads_as_a_bundle_or_is_refused_with_a_kferror(pristine, data):
    source, manifest = pristine
    manifest = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate_value(manifest, data)
    text = json.dumps(manifest)  # NaN and Infinity written as such, as a careless writer would
    if data.draw(st.booleans()):
        text = _double_a_key(text, data)
    if data.draw(st.integers(0, 4)) == 0:
        text = text[:data.draw(st.integers(0, len(text)))]
    with tempfile.TemporaryDirectory() as folder:
        _linked_copy(source, Path(folder))
        _rewrite(Path(folder) / "manifest.json", text.encode())
        _read(Path(folder))


@FUZZ
@given(data=st.data())
def test_a_mutated_graph_reads_as_a_bundle_or_is_refused_with_a_kferror(pristine, data):
    source, manifest = pristine
    manifest = json.loads(json.dumps(manifest))
    relative = data.draw(st.sampled_from(MODULE_FILES))
    graph = _mutate_graph((source / relative).read_bytes(), data)
    if data.draw(st.booleans()):  # past the checksum, to the parser and the graph checks
        record = manifest["trunk"] if relative == "trunk.onnx" else manifest["tasks"][Path(relative).stem]
        record.update(sha256=hashlib.sha256(graph).hexdigest(), bytes=len(graph))
    with tempfile.TemporaryDirectory() as folder:
        _linked_copy(source, Path(folder))
        _rewrite(Path(folder) / relative, graph)
        _rewrite(Path(folder) / "manifest.json", json.dumps(manifest).encode())
        _read(Path(folder))
