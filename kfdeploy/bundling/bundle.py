"""Reading and checking bundles: the format in export/BUNDLE_FORMAT.md, safe by construction.

Reading never executes code (JSON, ONNX protobuf and safetensors only) and never touches
a path outside the bundle: every file the manifest names, and every member of an archive,
is checked before use. This module imports neither torch nor onnxruntime, so an edge
device with only numpy and onnx (the base install) can read a bundle.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import math
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import (Annotated, Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Union, get_args,
                    get_origin, get_type_hints)

from ..atomic import atomic_write
from ..errors import KfError
from ..names import TASK_NAME_RULE, is_task_name, listing, module_title, quote, unprintable

FORMAT = "kfdeploy-bundle"
# 2: the input spec says how pixels are normalized (inside the graphs) and which pixel types
# readers take; bundles may carry example images. Version 1 bundles still read: identity
# normalization, no examples.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
# Limits on what an archive may unpack to, checked before anything is written: far above
# a real bundle (a few files per module), far below what fills a disk.
MAX_ARCHIVE_BYTES = 4 << 30
MAX_ARCHIVE_MEMBERS = 10_000
# Paths a bundle may hold, in its manifest and its archive: ours reach ~140 characters and 4
# levels (engines/<task>.<device>.<precision>.plan, variants/int8/tasks/<task>.onnx). Deeper
# or longer ones are refused before a folder is made: thousands of nested folders would
# outlast the recursion of the tools that make and remove them (pathlib, shutil.rmtree).
MAX_PATH_CHARS = 255
MAX_PATH_DEPTH = 16


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _escape_reason(relative: str) -> Optional[str]:
    """Why a manifest or archive path is not a plain path inside the bundle (it would leave
    it, or it is absurdly long or deep), or None if it is one."""
    if not isinstance(relative, str) or not relative:
        return "it is not a non-empty string"
    if len(relative) > MAX_PATH_CHARS:
        return f"it is longer than {MAX_PATH_CHARS} characters"
    if "\\" in relative or "\x00" in relative:
        return "it contains a backslash or NUL"
    path = PurePosixPath(relative)
    if path.is_absolute() or (len(relative) > 1 and relative[1] == ":"):
        return "it is absolute"
    if ".." in path.parts:
        return "it climbs out with '..'"
    if len(path.parts) > MAX_PATH_DEPTH:
        return f"it is more than {MAX_PATH_DEPTH} folders deep"
    return None


def resolve_inside(root: Path, relative: str) -> Path:
    """The file `relative` names inside `root`; refuses escapes and symbolic links."""
    reason = _escape_reason(relative)
    if reason:
        raise KfError(f"bundle at {root} names the path {quote(relative, 200)}, which is not a path inside a bundle ({reason}); "
                      "refusing to read it — re-export the bundle")
    current = root
    for part in PurePosixPath(relative).parts:
        current = current / part
        if current.is_symlink():
            raise KfError(f"bundle at {root}: {quote(relative, 200)} goes through a symbolic link ({quote(current.name, 200)}); "
                          "refusing to follow it — re-export the bundle")
    if not current.is_file():
        raise KfError(f"bundle at {root} is missing {quote(relative, 200)}; the bundle is incomplete — re-export it")
    return current


def _file_identity(path: Path) -> Optional[tuple]:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size



def module_entries(record: dict) -> Iterator[dict]:
    """A module's file records (the trunk's or a task's): its graph, its weights, its variants."""
    yield record
    if "weights" in record:
        yield record["weights"]
    yield from record.get("variants", {}).values()

class Bundle:
    """A bundle folder opened for reading; `manifest` is the parsed manifest.json."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        # export and add-task swap a whole new folder in: a file read after that belongs to
        # another manifest than this one, and its mismatch is no sign of damage
        self._manifest_identity = _file_identity(root / MANIFEST)
        self.verified = False  # whether open() checked every checksum and graph
        self.archive: Optional[Path] = None  # the .tar.gz it was extracted from: a folder that never changes

    def _checksum_mismatch(self, relative: str) -> KfError:
        if _file_identity(self.root / MANIFEST) != self._manifest_identity:
            return KfError(f"bundle {self.root} was replaced on disk while it was being read ({relative} is the new "
                           "bundle's, e.g. after `kfdeploy add-task --replace`); open or load it again")
        return KfError(f"checksum mismatch for {relative} in bundle {self.root}: the file is corrupted or "
                       "was modified after export; re-export the bundle or restore the file")

    @classmethod
    def open(cls, path: Path | str, verify: bool = True) -> "Bundle":
        """Open a bundle folder or archive. The manifest is always checked against its schema;
        with `verify`, every checksum too, and every module graph parsed and refused if it
        is not self-contained: all of it before anything makes a session."""
        path = Path(path)
        if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
            return cls._open_archive(path, verify)
        if path.is_file():
            raise KfError(f"{path} is a file, not a bundle: a bundle is a folder made by `kfdeploy export RUN --out BUNDLE`, "
                          f"or its {ARCHIVE_SUFFIXES[0]} archive")
        if not path.is_dir():
            raise KfError(f"no bundle at {path}; make one with `kfdeploy export RUN --out {path}`")
        bundle = cls(path, read_manifest(path))
        if verify:
            bundle.verify()
        bundle.verified = verify
        return bundle

    @classmethod
    def _open_archive(cls, archive: Path, verify: bool) -> "Bundle":
        target = Path(tempfile.mkdtemp(prefix="kfdeploy-bundle-"))
        atexit.register(shutil.rmtree, target, True)  # the extraction lives as long as the process
        try:
            extract_archive(archive, target)
            bundle = cls.open(target, verify)
            bundle.archive = archive
            return bundle
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def file(self, relative: str) -> Path:
        return resolve_inside(self.root, relative)

    def entries(self) -> Iterator[dict]:
        """Every file record in the manifest: trunk, its weights, tasks, engines, examples."""
        for module in (self.manifest["trunk"], *self.manifest["tasks"].values()):
            yield from module_entries(module)
        yield from self.manifest.get("engines", [])
        yield from self.examples

    def verify(self) -> None:
        """Every file record's checksum; module graphs through graph(), which also refuses
        tensors kept in external files."""
        modules = {id(record): (module, "fp32") for module, record in self.modules().items()}
        modules.update({id(variant): (module, precision) for module, record in self.modules().items()
                        for precision, variant in record.get("variants", {}).items()})
        for entry in self.entries():
            if id(entry) in modules:
                self.graph(*modules[id(entry)])
            elif sha256_file(self.file(entry["file"])) != entry["sha256"]:
                raise self._checksum_mismatch(entry["file"])

    def modules(self) -> Dict[str, dict]:
        """The trunk's record, then each task's, by module name ("trunk" or the task)."""
        return {"trunk": self.manifest["trunk"], **self.manifest["tasks"]}

    def variant(self, module: str, precision: str = "fp32") -> dict:
        """The file record of a module ("trunk" or a task) at `precision`: the module's own
        record for fp32, else its entry in `variants` (written by `kfdeploy quantize`)."""
        record = self.manifest["trunk"] if module == "trunk" else self.task(module)
        if precision == "fp32":
            return record
        if precision not in VARIANT_PRECISIONS:
            raise KfError(f"unknown precision {precision!r}; choose one of fp32, {', '.join(VARIANT_PRECISIONS)}")
        variant = record.get("variants", {}).get(precision)
        if variant is None:
            which = "the trunk" if module == "trunk" else f"task {module!r}"
            only = "" if module == "trunk" else f" --tasks {module}"
            raise KfError(f"bundle {self.root} has no {precision} variant of {which}; make it with "
                          f"`kfdeploy quantize {self.root} --{precision}{only}`")
        return variant

    def precisions(self) -> List[str]:
        """The precisions every module of the bundle has: fp32, and each variant all of them carry."""
        modules = self.modules().values()
        return ["fp32", *(p for p in VARIANT_PRECISIONS if all(p in m.get("variants", {}) for m in modules))]

    def graph(self, module: str, precision: str = "fp32"):
        """The parsed ONNX graph of one module ("trunk" or a task), self-contained or refused.

        A tensor stored as external data would be read from a path the graph names, outside
        any checksum: the format forbids it, so it is refused here, before any session.
        """
        import onnx

        record = self.variant(module, precision)
        path = self.file(record["file"])
        data = path.read_bytes()
        # The bytes parsed are the bytes checked: the file may have changed since open().
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise self._checksum_mismatch(record["file"])
        try:
            model = onnx.load_model_from_string(data)
            not_utf8 = _not_utf8(model)
        except Exception as exc:  # protobuf raises its own DecodeError, not a common base
            raise KfError(f"{record['file']} in bundle {self.root} is not a readable ONNX graph ({exc}); re-export the bundle") from None
        if not_utf8:
            raise KfError(f"{record['file']} in bundle {self.root} is not a readable ONNX graph (text in its {not_utf8} "
                          "is not UTF-8); re-export the bundle")
        external = next((t.name for t in _model_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL), None)
        if external is not None:
            raise KfError(f"{record['file']} in bundle {self.root} keeps tensor {quote(external)} in an external file, which "
                          "bundles do not allow (it would be read outside the checksums); re-export the bundle")
        problem = operator_problem(model)
        if problem:
            raise KfError(f"{record['file']} in bundle {self.root} ({module_title(module)}) {problem}; refusing it before any "
                          "session — re-export the bundle with kfdeploy")
        problem = self._interface_problem(module, model.graph)
        if problem:
            raise KfError(f"{record['file']} in bundle {self.root} {problem}; re-export the bundle")
        return model

    def _interface_problem(self, module: str, graph) -> Optional[str]:
        """Why a module's graph does not take and give what the manifest says (and what
        composing and calling it rely on), or None. Dimensions are compared where the graph
        fixes them, and the batch dimension must not be fixed."""
        channels_height_width = self.manifest["input"]["shape"][1:]
        width = self.manifest["trunk"]["output"]["width"]
        if module == "trunk":
            expected = {"image": ["batch", *channels_height_width]}
            out = width
        else:
            expected = {"image": ["batch", *channels_height_width], "common": ["batch", width]}
            out = self.task(module)["classes"]
        inputs = {value.name: value for value in graph.input}
        if sorted(inputs) != sorted(expected) or len(graph.output) != 1:
            return (f"must take the inputs {', '.join(expected)} and give one output (it takes "
                    f"{listing(inputs)} and gives {len(graph.output)})")
        for value, dims in [*((inputs[name], dims) for name, dims in expected.items()), (graph.output[0], ["batch", out])]:
            tensor = value.type.tensor_type
            if tensor.elem_type != 1:  # FLOAT: every variant keeps float32 inputs and outputs
                return f"must take and give float32 tensors ({quote(value.name)} is not one)"
            wanted = f"(batch, {', '.join(map(str, dims[1:]))})"
            if not tensor.HasField("shape"):
                return f"has {quote(value.name)} of unknown rank where the manifest says {wanted}"
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            # The batch must stay free: the manifest promises input.batch's whole range
            if len(shape) != len(dims) or shape[0] is not None or any(
                    got is not None and got != want for got, want in zip(shape[1:], dims[1:])):
                shown = ", ".join("?" if d is None else str(d) for d in shape)
                return f"has {quote(value.name)} of shape ({shown}) where the manifest says {wanted}"
        return None

    @property
    def tasks(self) -> List[str]:
        return list(self.manifest["tasks"])

    def task(self, name: str) -> dict:
        if name not in self.manifest["tasks"]:
            raise KfError(f"unknown task {quote(name)} in bundle {self.root}; available: {listing(self.tasks)}")
        return self.manifest["tasks"][name]

    @property
    def channels(self) -> int:
        return self.manifest["input"]["shape"][1]

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width) of the images the graphs take."""
        return tuple(self.manifest["input"]["shape"][2:])

    def normalization(self) -> Tuple[List[float], List[float]]:
        """Per-channel (mean, std) the graphs apply to 0-1 pixels; identity for version 1
        bundles, whose graphs take the pixels as they are."""
        spec = self.manifest["input"].get("normalization")
        if spec is None:
            return [0.0] * self.channels, [1.0] * self.channels
        return list(spec["mean"]), list(spec["std"])

    def pixel_types(self) -> List[str]:
        return list(self.manifest["input"].get("pixel_types", PIXEL_TYPES))

    @property
    def examples(self) -> List[dict]:
        """The example images' records (file, checksum, true labels where known); none before version 2."""
        return list(self.manifest.get("examples", []))

    def example(self, index: int):
        """Example `index` decoded (uint8, (H, W) grey or (H, W, 3) RGB) and its true labels.

        As graph(): the bytes decoded are the bytes checked, and decoding goes through
        kfdeploy.images (pixel cap, no decompression bombs). Needs Pillow.
        """
        from ..images import decode_image

        record = self.examples[index]
        data = self.file(record["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise self._checksum_mismatch(record["file"])
        return decode_image(data, record["file"]), dict(record.get("labels", {}))

    def input_shapes(self, module: str) -> Dict[str, Tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of each input of a module ("trunk" or a task), from the batch range:
        what a TensorRT optimization profile needs."""
        spec = self.manifest["input"]
        batch = spec["batch"]
        inputs = {"image": tuple(spec["shape"][1:])}
        if module != "trunk":
            inputs["common"] = (self.manifest["trunk"]["output"]["width"],)
        return {name: tuple((batch[k], *dims) for k in ("min", "opt", "max")) for name, dims in inputs.items()}


def _not_utf8(message) -> Optional[str]:
    """The first string field of a protobuf message, or of a message in it, whose bytes are not
    UTF-8, or None. ONNX's proto2 messages parse such bytes anyway and Python's protobuf hands
    them out as bytes where a name should be text: the composer and ONNX Runtime then fail
    on them with UnicodeDecodeError."""
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        items = (value,) if isinstance(value, (Message, str, bytes)) else value  # else a repeated field
        if field.type == field.TYPE_MESSAGE:
            found = next(filter(None, map(_not_utf8, items)), None)
            if found:
                return found
        elif field.type == field.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            return field.full_name
    return None


def _model_tensors(model) -> Iterator:
    """Every tensor a model stores: its graph's, and those in the bodies of its local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph) -> Iterator:
    """Every tensor a graph stores: initializers, and attribute tensors of nodes and subgraphs."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _graph_tensors(subgraph)


# -- what a graph may hold --------------------------------------------------------------
#
# The operator types (default ONNX domain) that kfdeploy's exports and `kfdeploy quantize`
# emit, collected from the graphs themselves: SimpleConv, resnet18, resnet50,
# mobilenetv2_050, efficientnet_b0, convnext_atto and vit_tiny_patch16_224 modules, exported
# at opsets 17, 18 and 20 (the profiles'), each also as int8 (QDQ) and fp16 variants.
# BatchNormalization is the one addition: export leaves it where no Conv precedes it
# (pre-activation nets, see export.fold_batch_norm). Anything else, control flow (If, Loop,
# Scan) and other domains included, a reader refuses before ONNX Runtime sees it: a graph
# can only do what these operators do. The composition adds Softmax (fuse.py).
OPERATORS = frozenset({
    "Add", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "DequantizeLinear", "Div", "Erf", "Expand",
    "Gather", "Gelu", "Gemm", "LayerNormalization", "MatMul", "MaxPool", "Mul", "QuantizeLinear", "Range",
    "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Squeeze", "Sub", "Transpose",
    "Unsqueeze",
})
# Of those, Expand and Range take the size of their output from a tensor's values; where
# those values are constants of the graph, a count beyond this is refused (1 GiB of
# float32; an export's are the size of a feature map). Computed sizes are ONNX Runtime's
# to refuse at run time, which the runtime reports as a KfError.
MAX_CONSTANT_ELEMENTS = 1 << 28


def operator_problem(model) -> Optional[str]:
    """Why a module graph holds what no kfdeploy export does (an operator outside OPERATORS,
    an output sized absurdly by its constants, padding wider than a kernel), or None."""
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}

    def values(names) -> Optional[list]:
        """The constants' values, flattened, or None where one is computed (or malformed: a
        session refuses that)."""
        try:
            return [numpy_helper.to_array(constants[name]).reshape(-1).tolist() for name in names]
        except (KeyError, ValueError, TypeError):
            return None

    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op not in OPERATORS:
            return f"uses the operator {quote(op)} (node {quote(node.name)}), which this kfdeploy never exports"
        count = None
        if op == "Expand" and len(node.input) == 2 and (shape := values(node.input[1:])):
            count = math.prod(abs(d) for d in shape[0] if isinstance(d, int))  # int64, or a session refuses it
        elif op == "Range" and (scalars := values(node.input)) and [len(v) for v in scalars] == [1, 1, 1]:
            (start,), (limit,), (delta,) = scalars
            count = (limit - start) / delta if delta else math.inf
        if count is not None and count > MAX_CONSTANT_ELEMENTS:
            return (f"has a node {quote(node.name)} whose constants make {op} give {count:.3g} elements, more than "
                    f"{MAX_CONSTANT_ELEMENTS} (no exported network comes near)")
        if op in ("Conv", "MaxPool"):
            attributes = {a.name: list(a.ints) for a in node.attribute}
            kernel, pads = attributes.get("kernel_shape", []), attributes.get("pads", [])
            if any(pads) and not (len(pads) == 2 * len(kernel) and all(p < k for p, k in zip(pads, kernel * 2))):
                return (f"has a {op} node {quote(node.name)} padded by {quote(str(pads))} around a kernel of "
                        f"{quote(str(kernel))}: exports pad less than the kernel")
    return None


# -- what a manifest must hold ----------------------------------------------------------
#
# The schema: one small dataclass per JSON object of the format (export/BUNDLE_FORMAT.md).
# A field's annotation is its JSON type: str, int (never a bool), float (any JSON number,
# never a bool), bool, Optional[X] (X or null), List[X], Dict[str, X], Literal[...], a
# nested dataclass, or plain dict/Any where readers look no deeper; Annotated[X, Rule(...)]
# adds what a type cannot say. A field without a default must be present, one with a
# default may be absent (and when present must match its annotation); an `invariant` ties
# fields of one object together. Fields not named here are ignored, as the format says.
# The classes only describe: `_validate` checks a parsed manifest against them and readers
# keep the plain dict. A field a later format version adds comes in with a default, so
# manifests written before it still read.

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Rule:
    """What a value must be beyond its type: `problem` returns None when it is, else a
    detail for the message ("" for none)."""

    expected: str
    problem: Callable[[Any], Optional[str]]


def _rule(expected: str, ok: Callable[[Any], bool]) -> Rule:
    return Rule(expected, lambda value: None if ok(value) else "")


Sha256 = Annotated[str, _rule("64 lowercase hex digits (a SHA-256)", lambda v: _HEX64.fullmatch(v) is not None)]
TaskName = Annotated[str, _rule(f"a task name ({TASK_NAME_RULE})", is_task_name)]
ModuleName = Annotated[str, _rule("\"trunk\" or a task name", lambda v: v == "trunk" or is_task_name(v))]
InsidePath = Annotated[str, Rule("a relative path inside the bundle", lambda v: _escape_reason(v))]
Positive = Annotated[int, _rule("at least 1", lambda v: v >= 1)]
Size = Annotated[int, _rule("at least 0", lambda v: v >= 0)]
Shape = Annotated[list, _rule('["batch", C, H, W] with C, H and W positive integers', lambda v: (
    len(v) == 4 and v[0] == "batch" and all(type(d) is int and d >= 1 for d in v[1:])))]
Range = Annotated[List[float], _rule("[low, high] with low < high", lambda v: len(v) == 2 and v[0] < v[1])]
Precision = Literal["fp32", "fp16"]
# Reduced-precision variants of a module's graph (kfdeploy/bundling/quantize.py writes them).
VariantPrecision = Literal["int8", "fp16"]
VARIANT_PRECISIONS = ("int8", "fp16")
# Accuracies and agreements: shares of images, which readers print as such (NaN fails too)
Share = Annotated[float, _rule("a number from 0 to 1", lambda v: 0 <= v <= 1)]
# What readers (runtime, `kfdeploy run`, demo) take as pixels: uint8 0-255, divided by 255,
# and floats in input.range, cast to float32. The graphs themselves take float32 only.
PixelType = Literal["uint8", "float"]
PIXEL_TYPES = ("uint8", "float")


@dataclass(kw_only=True)
class FileRecord:
    file: InsidePath
    sha256: Sha256
    bytes: Size


@dataclass(kw_only=True)
class Batch:
    min: Positive
    opt: Positive
    max: Positive

    @staticmethod
    def invariant(batch: dict) -> Optional[Tuple[str, str]]:
        if not batch["min"] <= batch["opt"] <= batch["max"]:
            return "", f"must have min <= opt <= max, got {batch['min']}, {batch['opt']}, {batch['max']}"
        return None


@dataclass(kw_only=True)
class Parity:
    max_abs_err: float
    max_rel_err: float
    images: Size = None


@dataclass(kw_only=True)
class TaskParity(Parity):
    argmax_agreement: Share


@dataclass(kw_only=True)
class Output:
    name: str
    width: Positive


@dataclass(kw_only=True)
class Variant(FileRecord):
    """A module's graph at reduced precision: same inputs and outputs (names, float32), other
    arithmetic inside. `fallback` "fp32": the module's own fp32 file stands in (--allow-mixed)."""

    precision: VariantPrecision
    fallback: Optional[Literal["fp32"]] = None
    method: dict = None  # how it was made: tool, calibration method, image count, seed, data
    heldout_accuracy: Optional[Share] = None  # tasks: composed at this precision, held-out images
    fp32_heldout_accuracy: Optional[Share] = None  # the fp32 composition on the same images
    agreement: Optional[Share] = None  # tasks: argmax agreement with the fp32 composition
    images: Size = None  # how many held-out images those three were measured on


def _variants_invariant(record: dict) -> Optional[Tuple[str, str]]:
    for precision, variant in record.get("variants", {}).items():
        if variant["precision"] != precision:
            return f"variants.{precision}.precision", f"must be {json.dumps(precision)}, got {_describe(variant['precision'])}"
        if variant.get("fallback") == "fp32" and (variant["file"], variant["sha256"]) != (record["file"], record["sha256"]):
            return f"variants.{precision}.file", "must be the module's own file and sha256 when fallback is \"fp32\""
    return None


@dataclass(kw_only=True)
class Trunk(FileRecord):
    inputs: List[str] = None
    output: Output
    fingerprint: Sha256
    weights: FileRecord
    parity: Parity
    variants: Dict[VariantPrecision, Variant] = None

    invariant = staticmethod(_variants_invariant)


@dataclass(kw_only=True)
class Task(FileRecord):
    inputs: List[str] = None
    output: str = None
    classes: Positive
    labels: List[str]
    trunk_fingerprint: Sha256
    heldout_accuracy: Optional[Share]
    parity: TaskParity
    weights: FileRecord
    variants: Dict[VariantPrecision, Variant] = None

    @staticmethod
    def invariant(task: dict) -> Optional[Tuple[str, str]]:
        if len(task["labels"]) != task["classes"]:
            return "labels", f"must hold one label per class ({task['classes']}), got {len(task['labels'])}"
        return _variants_invariant(task)


@dataclass(kw_only=True)
class Device:
    gpu: Optional[str] = None
    compute_capability: Optional[str] = None
    tensorrt: Optional[str] = None
    cuda: Optional[str] = None


@dataclass(kw_only=True)
class Engine(FileRecord):
    module: ModuleName  # Manifest.invariant checks that it is one of this bundle's
    builder: Literal["tensorrt", "torch-tensorrt"]
    precision: Precision
    device: Device
    batch: Batch = None


@dataclass(kw_only=True)
class Normalization:
    """(pixel - mean) / std per channel, on pixels in input.range, applied inside every graph."""

    mean: List[float]
    std: List[float]
    in_graph: Literal[True]

    @staticmethod
    def invariant(normalization: dict) -> Optional[Tuple[str, str]]:
        if any(s <= 0 for s in normalization["std"]):
            return "std", f"must be positive, got {_describe(normalization['std'])}"
        return None


@dataclass(kw_only=True)
class InputSpec:
    name: Literal["image"]
    shape: Shape
    dtype: Literal["float32"]
    layout: Literal["NCHW"]
    range: Range
    uint8: str
    batch: Batch
    # From format version 2 on (Manifest.invariant requires them there).
    normalization: Normalization = None
    pixel_types: List[PixelType] = None

    @staticmethod
    def invariant(spec: dict) -> Optional[Tuple[str, str]]:
        channels = spec["shape"][1]
        for key in ("mean", "std"):
            values = spec.get("normalization", {}).get(key, [0] * channels)
            if len(values) != channels:
                return f"normalization.{key}", f"must hold one value per channel ({channels}), got {len(values)}"
        if not spec.get("pixel_types", PIXEL_TYPES):
            return "pixel_types", "must name at least one pixel type"
        return None


@dataclass(kw_only=True)
class Producer:
    kfdeploy: str = None
    torch: str = None
    onnx: str = None
    onnxruntime: str = None
    opset: int = None


@dataclass(kw_only=True)
class Profile:
    name: str = None
    description: str = None
    opset: int = None
    precision: Precision = None
    batch_min: Positive = None
    batch_opt: Positive = None
    batch_max: Positive = None


@dataclass(kw_only=True)
class Source:
    run: str = None
    teacher_run: Optional[str] = None
    data: str = None
    teacher_parameters: Optional[Size] = None


@dataclass(kw_only=True)
class ParityTolerance:
    max_abs_err: float = None
    max_rel_err: float = None
    argmax_agreement: Share = None


@dataclass(kw_only=True)
class Example(FileRecord):
    """An image stored in the bundle (examples/<n>.png, at the input's size and channels)."""

    labels: Dict[TaskName, str] = None  # its true label per task, where known


@dataclass(kw_only=True)
class Manifest:
    format: Literal["kfdeploy-bundle"]
    format_version: Positive
    created: str = None
    producer: Producer
    profile: Profile = None
    source: Source = None
    input: InputSpec
    model: dict = None  # FactorConfig.from_dict reads it (export.torch_modules)
    parity_tolerance: ParityTolerance = None
    trunk: Trunk
    tasks: Dict[TaskName, Task]
    engines: List[Engine] = None
    examples: List[Example] = None

    @staticmethod
    def invariant(manifest: dict) -> Optional[Tuple[str, str]]:
        if manifest["format_version"] >= 2:
            for key in ("normalization", "pixel_types"):
                if key not in manifest["input"]:
                    return f"input.{key}", "is missing (format version 2 requires it)"
        for i, engine in enumerate(manifest.get("engines", [])):
            if engine["module"] != "trunk" and engine["module"] not in manifest["tasks"]:
                return f"engines[{i}].module", f"must be 'trunk' or a task of this bundle, got {_describe(engine['module'])}"
        for i, example in enumerate(manifest.get("examples", [])):
            for task, label in example.get("labels", {}).items():
                if task not in manifest["tasks"]:
                    return f"examples[{i}].labels", f"must name tasks of this bundle, got {quote(task)}"
                if label not in manifest["tasks"][task]["labels"]:
                    return f"examples[{i}].labels[{json.dumps(task)}]", f"must be one of the task's labels, got {quote(label)}"
        return None


class _Invalid(Exception):
    """A manifest that does not fit the schema: a field path and what is wrong with it.
    `wrong_type` is the path when the value there has the wrong JSON type."""

    def __init__(self, message: str, wrong_type: Optional[str] = None):
        super().__init__(message)
        self.wrong_type = wrong_type


def _wrong_type(where: str, hint: Any, value: Any) -> _Invalid:
    return _Invalid(f"{where} must be {_expected(hint)}, got {_describe(value)}", wrong_type=where)


def _describe(value: Any) -> str:
    """A value as the message shows it: its JSON type, and the value where it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the {'integer' if isinstance(value, int) else 'number'} {text if len(text) <= 24 else text[:20] + '...'}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, list):
        # Arrays of arrays are not shown: one nested as deep as the parser allows would take
        # json.dumps past Python's recursion limit
        text = "" if any(isinstance(item, (list, dict)) for item in value) else json.dumps(value)
        return text if 0 < len(text) <= 40 else f"an array of {len(value)} items"
    return "an object"


def _expected(hint: Any) -> str:
    """How a message names the type `hint` stands for."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _expected(args[0])
    if origin is Union:
        return " or ".join(_expected(arg) for arg in args)
    if origin is Literal:
        return " or ".join(json.dumps(arg) for arg in args)
    if hint is type(None):
        return "null"
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}
    return names.get(origin or hint, "an object")


@functools.cache
def _hints(cls: type) -> Dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _validate(value: Any, hint: Any, where: str) -> None:
    """Raise _Invalid at the first place where `value` does not fit `hint`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        _validate(value, args[0], where)
        for rule in args[1:]:
            detail = rule.problem(value)
            if detail is not None:
                raise _Invalid(f"{where} must be {rule.expected}, got {_describe(value)}{f' ({detail})' if detail else ''}")
        return
    if origin is Union:
        if value is None and type(None) in args:
            return
        choices = [arg for arg in args if arg is not type(None)]
        if len(choices) == 1:  # Optional[X]: X's own message, unless the type is wrong
            try:
                return _validate(value, choices[0], where)
            except _Invalid as exc:
                raise _wrong_type(where, hint, value) if exc.wrong_type == where else exc
        for arg in choices:
            try:
                return _validate(value, arg, where)
            except _Invalid:
                pass
        raise _wrong_type(where, hint, value)
    if origin is Literal:
        if not any(type(value) is type(arg) and value == arg for arg in args):
            raise _wrong_type(where, hint, value)
        return
    base = origin or hint
    json_type = dict if dataclasses.is_dataclass(base) else {float: (int, float), Any: object}.get(base, base)
    if not isinstance(value, json_type) or (isinstance(value, bool) and json_type not in (bool, object)):
        raise _wrong_type(where, hint, value)
    if base is float and isinstance(value, int) and abs(value) > sys.float_info.max:
        raise _Invalid(f"{where} must be a number a float can hold, got {_describe(value)}")
    if hint in (float, Any, dict):  # a number, or a part the schema does not describe
        _refuse_non_finite(value, where)
    if base is str and unprintable(value):
        raise _Invalid(f"{where} must be text without control characters or lone surrogates, got {_describe(value)}")
    if origin is list:
        for i, item in enumerate(value):
            _validate(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        for key, item in value.items():
            _validate(key, args[0], f"the key {quote(key)} of {where}")
            _validate(item, args[1], _item_path(where, key))
    elif dataclasses.is_dataclass(base):
        hints = _hints(base)
        for f in dataclasses.fields(base):
            path = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                _validate(value[f.name], hints[f.name], path)
            elif f.default is dataclasses.MISSING:
                raise _Invalid(f"{path} is missing")
        for key in value.keys() - hints.keys():  # readers ignore them; inspect --json prints them
            _refuse_non_finite(value[key], _key_path(where, key))
        invariant = getattr(base, "invariant", None)
        problem = invariant(value) if invariant else None
        if problem:
            field_path, text = problem
            path = ".".join(p for p in (where, field_path) if p)
            raise _Invalid(f"{path} {text}")


def _item_path(where: str, key: str) -> str:
    """The path of an entry of the map at `where`, as messages write it: tasks["shape"]."""
    return f"{where}[{json.dumps(key) if len(key) <= 40 else quote(key)}]"


def _key_path(where: str, key: str) -> str:
    """The path of a field of the object at `where`: model.trunk, or an entry's where the
    key is no identifier."""
    if key.isidentifier() and len(key) <= 40:
        return f"{where}.{key}" if where else key
    return _item_path(where, key)


def _refuse_non_finite(value: Any, where: str) -> None:
    """Raise _Invalid at a NaN or infinity anywhere in `value`. Python's json reads NaN,
    Infinity and numbers beyond a float's range (1e999) as such; JSON has none of them, and
    other readers of the manifest would fail or read something else."""
    stack = [(value, where)]
    while stack:  # not recursive: a parsed manifest may nest as deep as the parser allows
        item, at = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise _Invalid(f"{at} must be a finite number (JSON has no NaN or Infinity), got {_describe(item)}")
        if isinstance(item, dict):
            stack.extend((v, _key_path(at, k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(item))))


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: List[Tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: an object as a dict, refusing a key given twice, which Python
    reads as the last value and other parsers as the first."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return found


def read_manifest(root: Path) -> dict:
    """manifest.json of the bundle at `root`, parsed and checked against the schema above;
    anything that does not fit is a KfError naming the field."""
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise KfError(f"{root} is not a kfdeploy bundle (no {MANIFEST}); make one with `kfdeploy export RUN --out {root}`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise KfError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; this is not a kfdeploy manifest")
    damaged = "the bundle is damaged — re-export it"
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise KfError(f"{path} gives the key {quote(exc.args[0])} twice in one object (JSON readers disagree on "
                      f"which one counts); {damaged}") from None
    except ValueError as exc:  # bad JSON or UTF-8, and integers too long to convert
        raise KfError(f"{path} is not valid JSON ({exc}); {damaged}") from None
    except RecursionError:
        raise KfError(f"{path} nests its JSON deeper than Python can parse; {damaged}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KfError(f"{path} is not a kfdeploy bundle manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise KfError(f"{path}: format_version must be an integer of at least 1, got {_describe(version)}; {damaged}")
    if version > FORMAT_VERSION:
        raise KfError(
            f"bundle {root} has format version {version}, newer than this kfdeploy reads "
            f"(up to {FORMAT_VERSION}); upgrade kfdeploy (pip install -U kfdeploy)"
        )
    try:
        _validate(manifest, Manifest, "")
    except _Invalid as exc:
        raise KfError(f"{path}: {exc}; {damaged}") from None
    return manifest


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a bundle archive into the new, empty folder `target`.

    Every header is read and checked before anything is written: members that could escape
    `target` (absolute, '..', links, devices), the same file twice, and more than
    MAX_ARCHIVE_MEMBERS members or MAX_ARCHIVE_BYTES unpacked (a decompression bomb would
    fill the temporary folder) are refused. Then this function writes the folders and
    regular files itself, with the user's ownership and default permissions, instead of
    tarfile.extractall: nothing rests on tarfile's filter="data", which Pythons before
    3.11.4 lack; where that filter exists, it runs on every member as a second guard.
    """
    data_filter = getattr(tarfile, "data_filter", None)

    def refuse(problem: str) -> KfError:
        return KfError(f"archive {archive} {problem}; refusing to extract it")

    try:
        with tarfile.open(archive, "r:gz") as tar:
            files, folders, unpacked = {}, set(), 0
            for count, member in enumerate(tar, 1):  # headers one at a time: a bomb stops at the limit
                if count > MAX_ARCHIVE_MEMBERS:
                    raise refuse(f"has more than {MAX_ARCHIVE_MEMBERS} members, more than any bundle")
                if member.name in (".", "./"):
                    continue
                name = member.name.removeprefix("./")
                reason = _escape_reason(name)
                if reason is None and not (member.isfile() or member.isdir()):
                    reason = "it is a link or special file, not a regular file or folder"
                if reason:
                    raise refuse(f"has the member {quote(member.name, 200)}, which is not a path inside a bundle ({reason})")
                if member.isfile() and PurePosixPath(name) in files:
                    raise refuse(f"has the file {quote(member.name, 200)} twice (which one is the bundle's?)")
                if data_filter is not None:
                    data_filter(member, str(target))
                if member.isdir():
                    folders.add(PurePosixPath(name))
                    continue
                unpacked += member.size
                if unpacked > MAX_ARCHIVE_BYTES:
                    raise refuse(f"unpacks to more than {MAX_ARCHIVE_BYTES} bytes, more than any bundle (if it "
                                 "really is one, extract it yourself and open the folder)")
                files[PurePosixPath(name)] = member
            for folder in sorted(folders):
                target.joinpath(*folder.parts).mkdir(parents=True, exist_ok=True)
            for name, member in files.items():
                path = target.joinpath(*name.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(path, "xb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise KfError(f"{archive} is not a readable .tar.gz bundle archive ({exc}); re-create it with `kfdeploy export --archive`") from None


def write_archive(bundle_dir: Path, archive: Path) -> None:
    """Pack a bundle folder into a .tar.gz whose members are all relative, regular files."""
    with atomic_write(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(bundle_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=path.relative_to(bundle_dir).as_posix(), recursive=False)

