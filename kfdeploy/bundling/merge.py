"""Merge same-architecture task graphs into one grouped graph: horizontal fusion at composition.

k task modules of one architecture read the same image, so their convolutional bodies can
run as one network. The first convolution reads the image once with k times the output
channels; every later convolution has k times the groups (a depthwise one stays depthwise);
per-channel operations (activations, residual additions, pooling, BatchNorm) run over all
k x C channels at once. What every task computes alike from the shared inputs (the
normalization at the start of each exported graph) is computed once. Once the features are
flat (after pooling), the merged tensor is split and each task's own linear layers (mu, its
head) run on its part: there the work is small, and each task's own Gemm keeps its answers
bit for bit what its own graph gives (a batched MatMul rounds differently: one unit in the
last place, 7.6e-6 on logits near 100).

Task i's channels are block i of every merged tensor, and ONNX Runtime's NCHWc kernels run
a grouped convolution group by group with the code that runs a single one: on ONNX Runtime
1.32 (AVX2, NCHWc blocks of 8 channels) the merged graph answered bit for bit as the task
graphs did. Where a group's channels are not a multiple of the block (8 channels on an
AVX-512 CPU, whose blocks are 16), that convolution runs outside NCHWc and may round
differently. Only operations known to be channel-local are merged; a convolutional body
holding anything else raises `Unmergeable`, and the caller composes those tasks one by one.

The merged graph is built from the modules' own graphs when a composition needs it (their
weights' bytes joined), so a bundle keeps one file per task. Imports numpy and onnx only.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_INTEGER_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # onnx.TensorProto's (u)int8 .. (u)int64
_UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus",
          "Neg", "Abs", "Sqrt", "Exp", "Log", "Erf", "Identity", "Gelu", "Mish"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "LpPool"}
_REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2"}

SHARED, STACKED, PER_TASK, CONST = "shared", "stacked", "per task", "const"


class Unmergeable(Exception):
    """Why a group of task graphs cannot run merged."""


def architecture(model) -> str:
    """A digest of a task graph's structure. Graphs with equal digests are isomorphic node for
    node (operators, attributes, wiring, weight shapes, integer constants such as shapes and
    axes), except for the weights of the node that gives the output: their shape follows the
    task's class count."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: (index, slot) for index, node in enumerate(graph.node) for slot, out in enumerate(node.output)}
    initializers = {init.name: init for init in graph.initializer}
    head = producer.get(graph.output[0].name, (None,))[0]
    parts = [sorted((op.domain, op.version) for op in model.opset_import), [value.name for value in graph.input],
             len(graph.output), producer.get(graph.output[0].name)]
    for index, node in enumerate(graph.node):
        refs = []
        for name in node.input:
            tensor = initializers.get(name)
            if name in producer:
                refs.append(producer[name])
            elif tensor is None:
                refs.append(name)  # a graph input, or '' for an optional one left out
            elif index == head:
                refs.append((tensor.data_type, len(tensor.dims)))
            else:
                structure = numpy_helper.to_array(tensor).tobytes() if tensor.data_type in _INTEGER_TYPES else b""
                refs.append((tensor.data_type, tuple(tensor.dims), structure))
        # A Constant's value is data, like an initializer's: the merge compares them where it must
        attributes = [] if node.op_type == "Constant" else sorted(a.SerializeToString() for a in node.attribute)
        parts.append((node.domain, node.op_type, refs, len(node.output), attributes))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def value_shapes(model) -> Dict[str, list]:
    """Every tensor's shape in a graph (ints; a name or None where not fixed), by name.

    Inferred on a skeleton of the graph where float weights stand in by their type: inferring
    on the whole graph copies every weight (0.11 s for a MobileNetV2 x0.5 task module).
    """
    from onnx import helper, shape_inference

    graph = model.graph
    structure = [init for init in graph.initializer if init.data_type in _INTEGER_TYPES]  # read by inference
    stand_ins = [helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                 for init in graph.initializer if init.data_type not in _INTEGER_TYPES]
    skeleton = helper.make_model(helper.make_graph(graph.node, "skeleton", [*graph.input, *stand_ins], graph.output,
                                                   initializer=structure),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = shape_inference.infer_shapes(skeleton).graph
    shapes = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return shapes


def merge_graphs(models: Sequence, prefix: str, outputs: Sequence[str], shapes: Dict[str, list]) -> Tuple[list, list]:
    """The nodes and initializers of one graph that computes every model's output.

    `models`: task graphs of one `architecture` that read the same inputs (by name); `shapes`:
    `value_shapes` of the first. Model i's output is named `outputs[i]`; every other tensor and
    node name starts with `prefix`. Raises Unmergeable where a graph holds an operation not
    known to be channel-local, or the graphs differ where they must not.
    """
    first = [node.op_type for node in models[0].graph.node]
    if any([node.op_type for node in model.graph.node] != first for model in models[1:]):
        raise Unmergeable("the task graphs are not isomorphic")
    return _Merger(models, prefix, outputs, shapes).merge()


class _Value:
    """A tensor of the task graphs as the merged graph holds it (`kind`):

    shared:   one tensor, the same for every task (the image, its normalization);
    stacked:  the tasks' tensors concatenated along axis 1 (channels), task i's `widths[i]` wide;
    per task: each task's own tensor (`names`), from where the graphs run one by one;
    const:    each task's constant (`tensors`: initializers, Constant values), placed where used.
    """

    __slots__ = ("kind", "name", "widths", "tensors", "names", "_arrays")

    def __init__(self, kind: str, name: str = "", widths: Tuple[int, ...] = (), tensors: Sequence = (),
                 names: Sequence[str] = ()):
        self.kind, self.name, self.widths, self.tensors, self.names = kind, name, tuple(widths), list(tensors), list(names)
        self._arrays = None

    @property
    def arrays(self) -> List[np.ndarray]:
        if self._arrays is None:
            from onnx import numpy_helper

            self._arrays = [numpy_helper.to_array(tensor) for tensor in self.tensors]
        return self._arrays

    def same_for_all(self) -> bool:
        first = self.tensors[0]
        if all(t.HasField("raw_data") for t in self.tensors):
            return all(t.data_type == first.data_type and t.dims == first.dims and t.raw_data == first.raw_data
                       for t in self.tensors[1:])
        return all(a.dtype == self.arrays[0].dtype and np.array_equal(a, self.arrays[0]) for a in self.arrays[1:])


class _Merger:
    """One walk over the first graph's nodes, the other graphs' nodes beside it (isomorphic:
    node i is node i everywhere), writing the merged graph's nodes as it goes."""

    def __init__(self, models: Sequence, prefix: str, outputs: Sequence[str], shapes: Dict[str, list]):
        self.models, self.prefix, self.outputs, self.shapes = list(models), prefix, list(outputs), shapes
        self.k = len(self.models)
        self.nodes: list = []
        self.initializers: list = []
        self.values = {value.name: _Value(SHARED, value.name) for value in self.models[0].graph.input}
        self._initializers = [{init.name: init for init in model.graph.initializer} for model in self.models]
        self.output = self.models[0].graph.output[0].name
        self._count = 0
        self._placed: Dict[str, str] = {}  # a constant alike for every task -> its one initializer
        self._parts: Dict[str, List[str]] = {}  # a stacked tensor -> each task's part of it
        self._own: Dict[Tuple[str, int], str] = {}  # (a constant, a task) -> that task's initializer

    def merge(self) -> Tuple[list, list]:
        from onnx import helper

        graph = self.models[0].graph
        for index, node in enumerate(graph.node):
            nodes = [model.graph.node[index] for model in self.models]
            if node.op_type == "Constant":
                tensors = [_constant_tensor(n) for n in nodes]
                self.values[node.output[0]] = _Value(CONST, self.prefix + node.output[0], tensors=tensors)
                continue
            inputs = [self.value(nodes, slot) if name else None for slot, name in enumerate(node.input)]
            if any(v is not None and (v.kind == PER_TASK or (v.kind == STACKED and len(self.shape(name)) <= 2))
                   for v, name in zip(inputs, node.input)):
                # From flat features on little work is left: each task runs its own nodes (its own
                # Gemm answers bit for bit as its graph does)
                self.one_by_one(nodes, inputs)
                continue
            if any(n.attribute != node.attribute for n in nodes[1:]):
                raise Unmergeable(f"{node.op_type} node {node.name!r} has other attributes in another task")
            if len(node.output) != 1:
                raise Unmergeable(f"{node.op_type} node {node.name!r} has {len(node.output)} outputs")
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            self.values[node.output[0]] = self.rule(node, inputs, attributes)
        self.hand_back(self.values[graph.output[0].name])
        return self.nodes, self.initializers

    def rule(self, node, inputs: List[Optional[_Value]], attributes: dict) -> _Value:
        """The output of one node of the task graphs, as the merged graph computes it."""
        if node.domain not in ("", "ai.onnx"):
            raise Unmergeable(f"{node.domain}.{node.op_type} is not known to be channel-local")
        if all(v is None or v.kind == SHARED or (v.kind == CONST and v.same_for_all()) for v in inputs):
            return self.once(node, inputs, attributes)
        if all(v is None or v.kind == CONST for v in inputs):
            raise Unmergeable(f"{node.op_type} of constants that differ between the tasks")
        op = node.op_type
        if op == "Conv":
            return self.conv(node, inputs, attributes)
        if op == "BatchNormalization":
            return self.batch_norm(inputs, attributes)
        if op in _UNARY:
            return self.unary(node, inputs, attributes)
        if op in _BINARY:
            return self.binary(node, inputs, attributes)
        if op in _POOLS:
            return self.pool(node, inputs, attributes)
        if op in _REDUCES:
            return self.reduce(node, inputs, attributes)
        if op in ("Flatten", "Reshape"):
            return self.flatten(node, inputs, attributes)
        raise Unmergeable(f"{op} is not known to be channel-local")

    def one_by_one(self, nodes, inputs: List[Optional[_Value]]) -> None:
        """Each task's own copy of its node, reading its own part of every merged input."""
        from onnx import helper

        outputs = [[self.outputs[task] if name == self.output else f"{self.prefix}{task}/{name}" for name in nodes[0].output]
                   for task in range(self.k)]
        for task, node in enumerate(nodes):
            names = ["" if v is None else v.name if v.kind == SHARED else v.names[task] if v.kind == PER_TASK
                     else self.parts(v)[task] if v.kind == STACKED else self.own(v, task) for v in inputs]
            self.add(node.op_type, names, outputs[task], domain=node.domain,
                     **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        for slot, name in enumerate(nodes[0].output):
            self.values[name] = _Value(PER_TASK, names=[outputs[task][slot] for task in range(self.k)])

    # -- names, constants, tensors --------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def add(self, op: str, inputs: Sequence[str], outputs: Optional[Sequence[str]] = None, **attributes) -> str:
        """Append a node; its (first) output's name."""
        from onnx import helper

        outputs = list(outputs) if outputs is not None else [self.fresh(op.lower())]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=self.fresh(op), **attributes))
        return outputs[0]

    def constant(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def placed(self, value: _Value, why: str) -> str:
        """A constant that must be alike for every task, as one initializer."""
        if not value.same_for_all():
            raise Unmergeable(f"{why} differs between the tasks")
        if value.name not in self._placed:
            self._placed[value.name] = self.copy(value.tensors[0], self.fresh("shared"))
        return self._placed[value.name]

    def own(self, value: _Value, task: int) -> str:
        """Task `task`'s own constant, as an initializer."""
        if (value.name, task) not in self._own:
            self._own[value.name, task] = self.copy(value.tensors[task], f"{value.name}/{task}")
        return self._own[value.name, task]

    def copy(self, tensor, name: str) -> str:
        """An initializer of the merged graph holding `tensor`'s value, named `name`."""
        copied = type(tensor)()
        copied.CopyFrom(tensor)
        copied.name = name
        self.initializers.append(copied)
        return name

    def parts(self, value: _Value) -> List[str]:
        """A stacked tensor's parts, each task's own."""
        if value.name not in self._parts:
            names = [f"{value.name}/{task}" for task in range(self.k)]
            self.add("Split", [value.name, self.constant(np.array(value.widths), "widths")], names, axis=1)
            self._parts[value.name] = names
        return self._parts[value.name]

    def joined(self, value: _Value, hint: str) -> str:
        """The tasks' constants concatenated along axis 0 (a Conv's weights, a bias), as one
        initializer: their bytes joined where they are stored raw, as exporters store weights."""
        from onnx import TensorProto

        tensors = value.tensors
        if all(t.HasField("raw_data") and t.data_type == tensors[0].data_type and t.dims[1:] == tensors[0].dims[1:]
               for t in tensors):
            joined = TensorProto(name=self.fresh(hint), data_type=tensors[0].data_type,
                                 dims=[sum(t.dims[0] for t in tensors), *tensors[0].dims[1:]],
                                 raw_data=b"".join(t.raw_data for t in tensors))
            self.initializers.append(joined)
            return joined.name
        return self.constant(np.concatenate(value.arrays), hint)

    def value(self, nodes, slot: int) -> _Value:
        """Input `slot` of the tasks' node `nodes`, across the tasks."""
        name = nodes[0].input[slot]
        if name in self.values:
            return self.values[name]
        if name in self._initializers[0]:
            return _Value(CONST, self.prefix + name,
                          tensors=[inits[n.input[slot]] for inits, n in zip(self._initializers, nodes)])
        raise Unmergeable(f"{nodes[0].op_type} node {nodes[0].name!r} reads {name!r}, which no graph of the merge makes")

    def shape(self, name: str) -> list:
        shape = self.shapes.get(name)
        if shape is None:
            raise Unmergeable(f"shape inference gave no shape for {name!r}")
        return shape

    def copies(self, value: _Value, name: str) -> _Value:
        """A shared tensor as a stacked one: a copy for each task."""
        return _Value(STACKED, self.add("Concat", [value.name] * self.k, axis=1), widths=(self.shape(name)[1],) * self.k)

    # -- the rules: each gives its node's output, or raises Unmergeable ---------------------
    def once(self, node, inputs, attributes) -> _Value:
        """A node that reads only shared tensors and constants alike: computed once, for all."""
        names = ["" if v is None else self.placed(v, f"an input of {node.op_type}") if v.kind == CONST else v.name
                 for v in inputs]
        return _Value(SHARED, self.add(node.op_type, names, [self.prefix + node.output[0]], **attributes))

    def conv(self, node, inputs, attributes) -> _Value:
        x, weight, bias = (inputs + [None])[:3]
        if weight.kind != CONST or (bias is not None and bias.kind != CONST):
            raise Unmergeable("a Conv whose weights are computed")
        group = attributes.get("group", 1)
        if x.kind == SHARED and group != 1:
            x = self.copies(x, node.input[0])
        names = [x.name, self.joined(weight, "weight")] + ([self.joined(bias, "bias")] if bias is not None else [])
        # On the shared image, one convolution with every task's filters; on stacked input,
        # each task's groups read its own channels
        merged = self.add("Conv", names, **{**attributes, "group": group if x.kind == SHARED else group * self.k})
        return _Value(STACKED, merged, widths=(weight.tensors[0].dims[0],) * self.k)

    def batch_norm(self, inputs, attributes) -> _Value:
        x, *parameters = inputs
        if x.kind != STACKED or any(p.kind != CONST for p in parameters) or attributes.get("training_mode", 0):
            raise Unmergeable("a BatchNormalization that is not per channel")
        names = [x.name, *(self.joined(p, "batchnorm") for p in parameters)]
        return _Value(STACKED, self.add("BatchNormalization", names, **attributes), widths=x.widths)

    def unary(self, node, inputs, attributes) -> _Value:
        x, *bounds = inputs  # Clip's min and max
        if x.kind != STACKED or any(v is not None and v.kind != CONST for v in bounds):
            raise Unmergeable(f"{node.op_type} on an input it cannot follow")
        names = [x.name] + ["" if v is None else self.placed(v, f"an input of {node.op_type}") for v in bounds]
        return _Value(x.kind, self.add(node.op_type, names, **attributes), widths=x.widths)

    def binary(self, node, inputs, attributes) -> _Value:
        rank = len(self.shape(node.output[0]))
        # A shared tensor beside a stacked one: a copy of it for each task
        inputs = [self.copies(v, name) if v.kind == SHARED else v for v, name in zip(inputs, node.input)]
        for v, name in zip(inputs, node.input):
            if v.kind == STACKED and (len(self.shape(name)) != rank or self.shape(name)[1] != self.shape(node.output[0])[1]):
                raise Unmergeable(f"{node.op_type} broadcasting across channels")
        names = [self.operand(v, rank) for v in inputs]
        widths = next(v.widths for v in inputs if v.kind == STACKED)
        return _Value(STACKED, self.add(node.op_type, names, **attributes), widths=widths)

    def operand(self, value: _Value, rank: int) -> str:
        """A binary operation's input, a constant laid out along the merged channels."""
        if value.kind != CONST:
            return value.name
        arrays = [a.reshape((1,) * (rank - a.ndim) + a.shape) for a in value.arrays]
        if arrays[0].shape[1] == 1:  # broadcast over the channels: must be alike for every task
            return self.placed(value, "a constant broadcast over the channels")
        return self.constant(np.concatenate(arrays, axis=1), "constant")  # per channel: each task's own block

    def pool(self, node, inputs, attributes) -> _Value:
        (x,) = inputs
        if x.kind != STACKED:
            raise Unmergeable(f"{node.op_type} on an input it cannot follow")
        return _Value(STACKED, self.add(node.op_type, [x.name], **attributes), widths=x.widths)

    def reduce(self, node, inputs, attributes) -> _Value:
        x, *axes = inputs
        rank = len(self.shape(node.input[0]))
        axes = axes[0] if axes else None
        if axes is not None and axes.kind != CONST:
            raise Unmergeable(f"{node.op_type} over axes computed at run time")
        over = axes.arrays[0].tolist() if axes is not None else attributes.get("axes")
        if x.kind != STACKED or not over or {a % rank for a in over} & {0, 1}:
            raise Unmergeable(f"{node.op_type} across the channels or the batch")
        names = [x.name] + ([self.placed(axes, f"{node.op_type}'s axes")] if axes is not None else [])
        return _Value(STACKED, self.add(node.op_type, names, **attributes), widths=x.widths)

    def flatten(self, node, inputs, attributes) -> _Value:
        """Flatten from axis 1, or a Reshape that does the same: (N, C, H, W) -> (N, C*H*W)."""
        x = inputs[0]
        shape, out = self.shape(node.input[0]), self.shape(node.output[0])
        features = shape[1:]
        per_image = len(out) == 2 and all(isinstance(d, int) for d in [*features, out[1]]) and out[1] == int(np.prod(features))
        if x.kind != STACKED or not per_image or attributes.get("axis", 1) != 1:
            raise Unmergeable(f"a {node.op_type} other than flattening each image's features")
        # Channel-major: task i's (C, H, W) block stays one contiguous block of C*H*W
        positions = int(np.prod(features[1:]))
        return _Value(STACKED, self.add("Flatten", [x.name], axis=1), widths=tuple(w * positions for w in x.widths))

    def hand_back(self, value: _Value) -> None:
        """Each task's output under its own name (a task's own last node is already named so)."""
        if value.kind != PER_TASK:
            sources = self.parts(value) if value.kind == STACKED else [value.name] * self.k
            for source, name in zip(sources, self.outputs):
                self.add("Identity", [source], [name])


def _constant_tensor(node):
    """A Constant node's value as a TensorProto (the `value` attribute; others made into one)."""
    from onnx import helper, numpy_helper

    attribute = node.attribute[0]
    if attribute.name == "value":
        return attribute.t
    return numpy_helper.from_array(np.array(helper.get_attribute_value(attribute)))
