"""Compose a bundle's trunk and chosen task graphs into one ONNX graph.

The runtime runs this composition as one session (the trunk once, every selected task in
the same run, no hand-offs between sessions), and `save_fused` writes the very same graph
to a file for targets that want one. Its input is `image`; per task it has two outputs:
`<task>` (logits) and `<task>:probs` (softmax probabilities; ':' cannot occur in a task
name, so the names never collide). Every node and internal tensor carries its module's
name as a prefix (`trunk/...`, `<task>/...`), which is how ONNX Runtime's profiler
attributes time to modules.

Task modules of one architecture are merged into one grouped subgraph
(kfdeploy/bundling/merge.py): one network with k times the channels instead of k networks
one after another, which ONNX Runtime runs in fewer, larger kernels. Its nodes carry the
group's tasks joined by '+' as their prefix (`shape+scale/...`), so the profiler reports
the group as one module; tasks whose graphs cannot be merged run one by one, as before.

Composing happens at every add_task/remove_task, so it must cost little next to creating
the session. Each module is prefixed and serialized once, as a fragment of a
GraphProto; a composition is those fragments joined as bytes. Protocol buffers merge a
message field that occurs several times, appending repeated fields in order, so the
joined bytes parse as one graph holding every fragment's nodes, initializers and shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import KfError
from .merge import Unmergeable, architecture, merge_graphs, value_shapes

PROBS_SUFFIX = ":probs"
_MODEL_GRAPH_FIELD = 7  # ModelProto.graph


def probs_output(task: str) -> str:
    return task + PROBS_SUFFIX


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _graph_field(graph_bytes: bytes) -> bytes:
    """ModelProto field 7 (graph), length-delimited, holding `graph_bytes`."""
    return _varint(_MODEL_GRAPH_FIELD << 3 | 2) + _varint(len(graph_bytes)) + graph_bytes


class Composer:
    """Composes a bundle's module graphs; `graph_of(module)` gives a module's ModelProto
    (`Bundle.graph`). Modules are parsed, prefixed and serialized once, on first use.
    `graph_of` may be replaced (the runtime points it at its bundle re-read from disk):
    the modules read before stay as they were read.

    With `merge`, selected tasks of one architecture are merged (see the module's doc); a
    group that cannot be merged is said once through `log`, and its architecture runs one
    task at a time from then on (`unmergeable`: architecture -> why)."""

    def __init__(self, graph_of: Callable[[str], object], merge: bool = True,
                 log: Optional[Callable[[str], None]] = None):
        self.graph_of = graph_of
        self.merge = merge
        self._log = log or (lambda line: None)
        self._fragments: Dict[str, bytes] = {}
        self._outputs: Dict[str, object] = {}  # task -> its logits' TypeProto
        self._header = None  # (ir_version, opset imports, image input) of the trunk
        self._graphs: Dict[str, object] = {}  # task -> its graph as read, for merging
        self._architectures: Dict[str, str] = {}  # task -> merge.architecture of its graph
        self._shapes: Dict[str, dict] = {}  # module -> its tensors' shapes (merge.value_shapes)
        self.unmergeable: Dict[str, str] = {}

    def _graph(self, module: str):
        """A module's graph, read; on first reading, what composing needs of it is noted (its
        tensors' shapes, the trunk's header, a task's output type and architecture), and a
        task's graph is kept for merging."""
        model = self._graphs.get(module)
        if model is None:
            model = self.graph_of(module)
            self._shapes[module] = value_shapes(model)
            if module == "trunk":
                # By name, never by position: a bundle's reader has checked that the trunk takes
                # `image` and a task `image` and `common`, in whichever order, each giving one output
                image = next(value for value in model.graph.input if value.name == "image")
                self._header = (model.ir_version, list(model.opset_import), image)
            else:
                self._outputs[module] = model.graph.output[0].type
                if self.merge:
                    self._graphs[module], self._architectures[module] = model, architecture(model)
        return model

    def _fragment(self, module: str) -> bytes:
        if module not in self._fragments:
            import onnx
            from onnx import compose

            model = self._graph(module)
            if module == "trunk":
                shared = {"image": "image", model.graph.output[0].name: "common"}
            else:
                shared = {"image": "image", "common": "common", model.graph.output[0].name: module}
            prefix = f"{module}/"
            graph = compose.add_prefix(model, prefix).graph
            rename = {prefix + name: new for name, new in shared.items()}
            for node in graph.node:
                node.input[:] = [rename.get(name, name) for name in node.input]
                node.output[:] = [rename.get(name, name) for name in node.output]
            part = onnx.GraphProto(node=graph.node, initializer=graph.initializer, value_info=graph.value_info,
                                   sparse_initializer=graph.sparse_initializer)
            self._fragments[module] = part.SerializeToString()
        return self._fragments[module]

    def _merged_fragment(self, group: Sequence[str]) -> bytes:
        import onnx

        nodes, initializers = merge_graphs([self._graphs[task] for task in group], "+".join(group) + "/", group,
                                           self._shapes[group[0]])
        return onnx.GraphProto(node=nodes, initializer=initializers).SerializeToString()

    def _groups(self, tasks: Sequence[str], merge: bool = True) -> List[Tuple[str, ...]]:
        """`tasks` as their composition runs them: the tasks of one architecture as one group,
        in the order of its first task (merged where it has more than one); or one by one
        (without `self.merge`, or `merge`)."""
        if not (self.merge and merge):
            return [(task,) for task in tasks]
        groups: Dict[str, List[str]] = {}
        for task in tasks:
            self._graph(task)
            key = self._architectures[task]
            groups.setdefault(key if key not in self.unmergeable else task, []).append(task)
        return [tuple(group) for group in groups.values()]

    def _units(self, tasks: Sequence[str], merge: bool) -> List[Tuple[Tuple[str, ...], bytes]]:
        """Each group of `tasks` (`_groups`) with its fragment; a group that turns out not to
        merge is split into its tasks, and its architecture noted as unmergeable."""
        units = []
        for group in self._groups(tasks, merge):
            if len(group) > 1:
                try:
                    units.append((group, self._merged_fragment(group)))
                    continue
                except Unmergeable as exc:
                    self.unmergeable[self._architectures[group[0]]] = str(exc)
                    self._log(f"tasks {', '.join(group)} share an architecture but run one by one: "
                              f"their graphs cannot be merged ({exc})")
            units += [((task,), self._fragment(task)) for task in group]
        return units

    def _largest(self, module: str) -> int:
        """The largest tensor per image of one module's graph, in bytes (as float32)."""
        if module not in self._shapes:
            self._fragment(module)
        # Tensors with a batch dimension (not fixed), not the weights standing in for inference
        sizes = [np.prod(shape[1:], dtype=np.int64) for shape in self._shapes[module].values()
                 if shape and not isinstance(shape[0], int) and all(isinstance(d, int) for d in shape[1:])]
        return int(max(sizes, default=0)) * 4

    def image_bytes(self, tasks: Sequence[str], merge: bool = True) -> int:
        """The largest tensor per image in the composition of `tasks` (`merge` as `compose`
        takes it), in bytes (as float32): a merged group's tensors hold each of its tasks' channels."""
        return max([self._largest("trunk"), *(len(group) * self._largest(group[0]) for group in self._groups(tasks, merge))])

    def merged_bytes(self, tasks: Sequence[str]) -> int:
        """The largest tensor per image of the merged groups in the composition of `tasks`, in
        bytes (as float32); 0 where it merges none (known once composed: a group may turn out
        not to merge)."""
        return max([len(group) * self._largest(group[0]) for group in self._groups(tasks) if len(group) > 1], default=0)

    def compose(self, tasks: Sequence[str], merge: bool = True) -> bytes:
        """The serialized ModelProto computing the trunk once and every task in `tasks` from it,
        tasks of one architecture merged unless `merge` (or the composer's own) is False."""
        import onnx
        from onnx import helper

        if not tasks:
            raise KfError("a composition needs at least one task")
        trunk = self._fragment("trunk")
        units = self._units(tasks, merge)
        parts = [trunk, *(fragment for _, fragment in units)]
        unit_of = {task: "+".join(unit) for unit, _ in units for task in unit}
        ir_version, opsets, image = self._header
        outputs, softmaxes = [], []
        for task in tasks:
            softmaxes.append(helper.make_node("Softmax", [task], [probs_output(task)], name=f"{unit_of[task]}/{probs_output(task)}",
                                              axis=1))
            outputs += [onnx.ValueInfoProto(name=name, type=self._outputs[task]) for name in (task, probs_output(task))]
        # Last, so the softmax nodes follow the logits they read: ONNX wants nodes in order.
        tail = onnx.GraphProto(name="kfdeploy_" + "_".join(tasks), input=[image], output=outputs, node=softmaxes)
        header = onnx.ModelProto(ir_version=ir_version, opset_import=opsets, producer_name="kfdeploy")
        return header.SerializeToString() + b"".join(_graph_field(part) for part in [*parts, tail.SerializeToString()])


def fuse_bundle(bundle, tasks: Sequence[str], path: Path, precision: str = "fp32", merge: bool = True) -> Path:
    """Write the composition of `tasks` to `path` (atomically), checked by onnx.checker;
    every module at `precision` (its fp32 graph, or the variant `kfdeploy quantize` made),
    tasks of one architecture merged unless `merge` is False."""
    import onnx

    from ..atomic import atomic_write

    if not tasks:
        raise KfError("save_fused needs at least one task")
    fused = onnx.load_model_from_string(Composer(lambda module: bundle.graph(module, precision), merge).compose(tasks))
    onnx.checker.check_model(fused, full_check=True)
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(fused.SerializeToString())
    return path
