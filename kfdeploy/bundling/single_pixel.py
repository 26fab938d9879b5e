"""Where a network's last map is a single pixel, its tail runs as matrix products.

At 32x32 the ResNets and MobileNetV2 reach a 1x1 map before their global pooling (total
stride 32). There the pooling averages one value per channel, and a 1x1 convolution on one
pixel is a matrix product over its channels. ONNX Runtime's NCHWc kernels run such a
convolution far below its matrix multiply's rate (ONNX Runtime's profiler, in a probe: a
MobileNetV2 x0.5's last convolution, 160 -> 1280 channels, at a fraction of what its Gemm
reaches), and the mean over one pixel costs a kernel launch of its own. Rewritten here: the
pooling goes (a Reshape where it drops the spatial axes), and a 1x1 convolution on a
one-pixel map whose output goes, through activations only, into the flattening of each
image's features becomes a Reshape to (N, channels) and a Gemm. benchmarks/paper_config.py
measured what it buys: five MobileNetV2 x0.5 tasks on a ResNet-18 trunk went from 1.39x to
1.52x the ResNet-50 teacher's speed at batch 64 (docs/benchmarks/paper-config.md).

The same products and sums, in another kernel: the answers move by rounding only. Only
these patterns are touched, so a merge of task graphs (kfdeploy/bundling/merge.py) still
sees channel-local operations up to the flattening, and its per-task Gemms after it.
Convolutions on one-pixel maps inside a network (between depthwise ones) stay: there the
layout changes around a Gemm cost more than it saves.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .merge import value_shapes

_POOLS = {"ReduceMean", "GlobalAveragePool", "GlobalMaxPool", "ReduceMax"}
_ACTIVATIONS = {"Relu", "Clip"}  # elementwise: as right on (N, C) as on (N, C, 1, 1)


def single_pixel_tail(model) -> int:
    """Rewrite the graph of `model` (an onnx.ModelProto) as the module says; how many nodes
    were rewritten. Initializers it leaves unread stay: the caller drops them."""
    # Inferred once: dropping a pooling, or making it a Reshape, leaves every tensor that
    # remains with its shape
    shapes = value_shapes(model)
    return _pools_of_one_pixel(model, shapes) + _convolutions_into_features(model, shapes)


def _one_pixel(shape: Optional[list]) -> bool:
    return bool(shape) and len(shape) == 4 and shape[2:] == [1, 1]


def _pools_of_one_pixel(model, shapes: Dict[str, list]) -> int:
    """A global pooling of a 1x1 map: gone where it keeps the spatial axes (its readers read
    its input), a Reshape where it drops them."""
    from onnx import helper

    graph = model.graph
    outputs = {value.name for value in graph.output}
    dropped, reshaped = [], 0
    for index, node in enumerate(graph.node):
        if node.op_type not in _POOLS or not _one_pixel(shapes.get(node.input[0])) or node.output[0] in outputs:
            continue
        if node.op_type.startswith("Reduce") and not _reduces_spatial_axes(model, node):
            continue
        out = shapes.get(node.output[0])
        if out == shapes[node.input[0]]:
            dropped.append(node)
        elif out and len(out) == 2 and isinstance(out[1], int):
            size = _shape_constant(graph, node.name or node.output[0], out[1])
            graph.node[index].CopyFrom(helper.make_node("Reshape", [node.input[0], size], [node.output[0]], name=node.name))
            reshaped += 1
    for pool in dropped:
        for reader in graph.node:
            reader.input[:] = [pool.input[0] if name == pool.output[0] else name for name in reader.input]
        graph.node.remove(pool)
        for value in [v for v in graph.value_info if v.name == pool.output[0]]:
            graph.value_info.remove(value)
    return len(dropped) + reshaped


def _shape_constant(graph, prefix: str, features: int) -> str:
    """An initializer holding (-1, features), the shape a Reshape to (N, features) takes; its name.
    Reshape, not Flatten: bundle readers take only the operators exports were seen to emit."""
    from onnx import numpy_helper

    name = f"{prefix}.features"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, features], dtype=np.int64), name))
    return name


def _reduces_spatial_axes(model, node) -> bool:
    from onnx import helper

    axes = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _integers(model, node.input[1])
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def _integers(model, name: str) -> Optional[List[int]]:
    from onnx import numpy_helper

    tensor = next((init for init in model.graph.initializer if init.name == name), None)
    return None if tensor is None else [int(v) for v in numpy_helper.to_array(tensor).ravel()]


def _convolutions_into_features(model, shapes: Dict[str, list]) -> int:
    """A 1x1 convolution on a 1x1 map whose output reaches, through activations only, the
    flattening of each image's features: a Reshape to (N, C_in), then a Gemm with its
    (C_out, C_in) weights."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.input[1] not in initializers or not _one_pixel(shapes.get(node.input[0])):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if (attributes.get("group", 1) != 1 or weight.shape[2:] != (1, 1) or any(attributes.get("pads", [0])) or
                attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or
                not _one_pixel(shapes.get(node.output[0]))):
            continue
        chain = _activations_into_flattening(node.output[0], consumers, outputs, shapes)
        if chain is not None:
            found.append((index, node, weight, chain))
    for index, node, weight, chain in reversed(found):  # from the end: inserting shifts what follows
        prefix = node.name or node.output[0]
        matrix = numpy_helper.from_array(np.ascontiguousarray(weight.reshape(weight.shape[0], -1)), f"{prefix}.matrix")
        graph.initializer.append(matrix)
        flat = f"{prefix}.flat"
        flatten = helper.make_node("Reshape", [node.input[0], _shape_constant(graph, prefix, weight.shape[1])], [flat],
                                   name=f"{prefix}.flatten")
        # The tensors on the way are (N, C) now: their declared 4-D shapes go
        stale = {node.output[0], *chain}
        graph.node[index].CopyFrom(helper.make_node("Gemm", [flat, matrix.name, *node.input[2:3]], [node.output[0]],
                                                    name=prefix, transB=1))
        graph.node.insert(index, flatten)
        for value in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(value)
    return len(found)


def _activations_into_flattening(name: str, consumers: Dict[str, list], outputs: set, shapes: Dict[str, list]) -> Optional[List[str]]:
    """The tensors from `name` through activations to a flattening into (N, features) that
    reads it (a Flatten at axis 1, or a Reshape to two dimensions), or None where the path
    branches, leaves the graph or meets anything else."""
    chain = []
    while True:
        readers = consumers.get(name, [])
        if name in outputs or len(readers) != 1:
            return None
        reader = readers[0]
        if reader.op_type in _ACTIVATIONS and reader.input[0] == name:
            chain.append(reader.output[0])
            name = reader.output[0]
            continue
        flattening = reader.op_type == "Flatten" and all(a.i == 1 for a in reader.attribute if a.name == "axis")
        flattening |= reader.op_type == "Reshape" and len(shapes.get(reader.output[0]) or []) == 2
        return chain if flattening and reader.input[0] == name else None
