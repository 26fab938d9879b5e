"""Compose a bundle's trunk and chosen task graphs into one ONNX graph.

The runtime runs this composition as one session (the trunk once, every selected task in
the same run, no hand-offs between sessions), and `save_fused` writes the very same graph
to a file for targets that want one. Its input is `image`; per task it has two outputs:
`<task>` (logits) and `<task>:probs` (softmax probabilities; ':' cannot occur in a task
name, so the names never collide). Every node and internal tensor carries its module's
name as a prefix (`trunk/...`, `<task>/...`), which is how ONNX Runtime's profiler
attributes time to modules.

Composing happens at every add_task/remove_task, so it must cost next to nothing next to
creating the session. Each module is prefixed and serialized once, as a fragment of a
GraphProto; a composition is those fragments joined as bytes. Protocol buffers merge a
message field that occurs several times, appending repeated fields in order, so the
joined bytes parse as one graph holding every fragment's nodes, initializers and shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Sequence

from ..errors import KfError

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
    the modules read before stay as they were read."""

    def __init__(self, graph_of: Callable[[str], object]):
        self.graph_of = graph_of
        self._fragments: Dict[str, bytes] = {}
        self._outputs: Dict[str, object] = {}  # task -> its logits' TypeProto
        self._header = None  # (ir_version, opset imports, image input) of the trunk

    def _fragment(self, module: str) -> bytes:
        if module not in self._fragments:
            import onnx
            from onnx import compose

            # By name, never by position: a bundle's reader has checked that the trunk takes
            # `image` and a task `image` and `common`, in whichever order, each giving one output
            model = self.graph_of(module)
            if module == "trunk":
                image = next(value for value in model.graph.input if value.name == "image")
                self._header = (model.ir_version, list(model.opset_import), image)
                shared = {"image": "image", model.graph.output[0].name: "common"}
            else:
                logits = model.graph.output[0]
                self._outputs[module] = logits.type
                shared = {"image": "image", "common": "common", logits.name: module}
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

    def compose(self, tasks: Sequence[str]) -> bytes:
        """The serialized ModelProto computing the trunk once and every task in `tasks` from it."""
        import onnx
        from onnx import helper

        if not tasks:
            raise KfError("a composition needs at least one task")
        parts = [self._fragment(module) for module in ["trunk", *tasks]]
        ir_version, opsets, image = self._header
        outputs, softmaxes = [], []
        for task in tasks:
            softmaxes.append(helper.make_node("Softmax", [task], [probs_output(task)], name=f"{task}/probs", axis=1))
            outputs += [onnx.ValueInfoProto(name=name, type=self._outputs[task]) for name in (task, probs_output(task))]
        # Last, so the softmax nodes follow the logits they read: ONNX wants nodes in order.
        tail = onnx.GraphProto(name="kfdeploy_" + "_".join(tasks), input=[image], output=outputs, node=softmaxes)
        header = onnx.ModelProto(ir_version=ir_version, opset_import=opsets, producer_name="kfdeploy")
        return header.SerializeToString() + b"".join(_graph_field(part) for part in [*parts, tail.SerializeToString()])


def fuse_bundle(bundle, tasks: Sequence[str], path: Path, precision: str = "fp32") -> Path:
    """Write the composition of `tasks` to `path` (atomically), checked by onnx.checker;
    every module at `precision` (its fp32 graph, or the variant `kfdeploy quantize` made)."""
    import onnx

    from ..atomic import atomic_write

    if not tasks:
        raise KfError("save_fused needs at least one task")
    fused = onnx.load_model_from_string(Composer(lambda module: bundle.graph(module, precision)).compose(tasks))
    onnx.checker.check_model(fused, full_check=True)
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(fused.SerializeToString())
    return path
