"""A static check of an ONNX graph against what TensorRT 10's ONNX parser accepts.

Runs anywhere (onnx only, no TensorRT, no GPU), so a bundle can be checked before it is
carried to the device that builds engines. It catches what makes the parser refuse a
graph or what makes our engines unbuildable: unsupported operators, an opset outside the
parser's range, dynamic dimensions other than the batch, and element types TensorRT has
no tensors for. Passing it does not prove a build succeeds (operators have restrictions
on attributes and on which inputs must be constants); it removes the common failures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

# Source: onnx/onnx-tensorrt, docs/operators.md, the TensorRT 10.15 revision ("TensorRT
# 10.15 supports operators in the inclusive range of opset 9 to opset 24"): every operator
# of the default domain marked Y in its support matrix. Older 10.x parsers take a subset:
# 10.0 took opsets 9-20 and lacked, e.g., the window functions (10.4), STFT (10.5),
# RMSNormalization, RotaryEmbedding and TensorScatter (10.15). Our profiles export at
# opset <= 20 with none of those.
TRT_SUPPORTED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan",
    "Atanh", "Attention", "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast",
    "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
    "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow", "HardSigmoid",
    "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max",
    "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus",
    "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RMSNormalization",
    "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin",
    "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu",
    "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})
TRT_OPSET_RANGE = (9, 24)  # same source and revision

# Same source: TensorRT takes DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4, INT32, INT64,
# INT8, INT4, UINT8 and BOOL. DOUBLE is only cast down to float32 (clamping at FLT_MAX),
# so we count it as refused. INT8, INT4, FP8 and FP4 exist only as quantized weights
# (behind Q/DQ nodes) and UINT8 only at the network's inputs and outputs.
_IO_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "UINT8", "BOOL"})
_WEIGHT_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL",
                           "INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TrtIssue:
    where: str  # e.g. "node /conv/Conv (Conv)" or "input image dim 2"
    problem: str


def check_file(path: Path | str) -> List[TrtIssue]:
    """check_model on a graph file; tensors it keeps in external files are not read (the
    check needs their types, not their values). Bundles go through Bundle.graph instead."""
    import onnx

    return check_model(onnx.load(str(path), load_external_data=False))


def check_model(model) -> List[TrtIssue]:
    """What in `model` (an onnx.ModelProto) TensorRT's ONNX parser would refuse, as far as a static look tells."""
    import onnx
    import onnx.inliner

    # The parser imports local functions by expanding them, so check the expanded graph:
    # the call itself (a node in the function's own domain) is not an operator.
    model = onnx.inliner.inline_local_functions(model)
    return [*_check_opset(model), *_check_nodes(model.graph), *_check_io(model.graph), *_check_initializers(model.graph)]


def _check_opset(model) -> Iterator[TrtIssue]:
    low, high = TRT_OPSET_RANGE
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        yield TrtIssue("model", f"imports no ONNX (default-domain) opset; export with an opset in {low}-{high}")
    for version in versions:
        if not low <= version <= high:
            yield TrtIssue("model", f"opset {version} is outside the {low}-{high} that TensorRT's ONNX parser takes; "
                                    f"export with opset_version in {low}-{high} (the export profile's `opset`)")


def _check_nodes(graph) -> Iterator[TrtIssue]:
    for node, where in _walk(graph):
        if node.domain not in _DEFAULT_DOMAINS:
            yield TrtIssue(where, f"operator {node.op_type} of custom domain {node.domain!r} is parsed only if a "
                                  "TensorRT plugin of that name is registered on the device; express it in standard ONNX "
                                  "operators, or ship and load the plugin")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            yield TrtIssue(where, f"operator {node.op_type} is not supported by TensorRT's ONNX parser; "
                                  "rewrite that part of the model with supported operators before export")


def _walk(graph, scope: str = "") -> Iterator[Tuple[object, str]]:
    """Every node of `graph` with where it is, descending into If/Loop/Scan bodies."""
    import onnx

    for index, node in enumerate(graph.node):
        op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        where = f"node {node.name or f'#{index}'} ({op}){scope}"
        yield node, where
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                yield from _walk(body, f" in {attribute.name} of {where}")


def _check_io(graph) -> Iterator[TrtIssue]:
    import onnx

    # Old exporters list initializers among the inputs too; those are weights, not inputs.
    weights = {t.name for t in graph.initializer}
    values = [("input", v) for v in graph.input if v.name not in weights] + [("output", v) for v in graph.output]
    for kind, value in values:
        where = f"{kind} {value.name}"
        if not value.type.HasField("tensor_type"):
            yield TrtIssue(where, "is not a tensor (sequence, map or optional); TensorRT engines take and return tensors only")
            continue
        tensor = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if type_name not in _IO_TYPES:
            yield TrtIssue(where, _type_problem(type_name, "a network's inputs and outputs", _IO_TYPES))
        if not tensor.HasField("shape"):
            yield TrtIssue(where, "has no shape (unknown rank); export with static shapes except the batch dimension")
            continue
        for axis, dim in enumerate(tensor.shape.dim):
            if axis > 0 and not dim.HasField("dim_value"):
                name = f" ({dim.dim_param!r})" if dim.dim_param else ""
                yield TrtIssue(f"{where} dim {axis}", f"is dynamic{name}; our engines have one optimization profile "
                                                      "over the batch only, so export with every dimension but the "
                                                      "first static")


def _check_initializers(graph) -> Iterator[TrtIssue]:
    import onnx

    for tensor in graph.initializer:
        type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
        if type_name not in _WEIGHT_TYPES:
            yield TrtIssue(f"initializer {tensor.name}", _type_problem(type_name, "weights", _WEIGHT_TYPES))


def _type_problem(type_name: str, role: str, allowed: frozenset) -> str:
    if type_name == "DOUBLE":
        return ("has element type DOUBLE: TensorRT has no float64 and casts it down to FLOAT (clamping at "
                "+-FLT_MAX), so the engine would not compute what the graph says; make it FLOAT before export")
    return f"has element type {type_name}, which TensorRT does not take for {role} ({', '.join(sorted(allowed))})"
