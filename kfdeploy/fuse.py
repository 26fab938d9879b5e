"""Compose a bundle's trunk and chosen task graphs into one ONNX graph.

The runtime runs this composition as one session (the trunk once, every selected task in
the same run, no hand-offs between sessions), and `save_fused` writes the very same graph
to a file for targets that want one. Its input is `image`; per task it has two outputs:
`<task>` (logits) and `<task>:probs` (softmax probabilities; ':' cannot occur in a task
name, so the names never collide). Every node and internal tensor carries its module's
name as a prefix (`trunk/...`, `<task>/...`), which is how ONNX Runtime's profiler
attributes time to modules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .errors import KfError

PROBS_SUFFIX = ":probs"


def probs_output(task: str) -> str:
    return task + PROBS_SUFFIX


def _prefixed(module, prefix: str, shared: Mapping[str, str]):
    """The module's graph with every name prefixed, except `shared` ones, renamed as mapped."""
    from onnx import compose

    graph = compose.add_prefix(module, prefix).graph
    rename = {prefix + name: new for name, new in shared.items()}
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
    return graph


def compose(graphs: Mapping[str, object], tasks: Sequence[str]):
    """One ModelProto computing the trunk once and every task in `tasks` from it.

    `graphs` maps "trunk" and each task to its parsed module graph (onnx.ModelProto, as
    `Bundle.graph` returns it); the inputs are not modified.
    """
    from onnx import helper

    if not tasks:
        raise KfError("a composition needs at least one task")
    trunk = graphs["trunk"]
    image = trunk.graph.input[0]
    common = trunk.graph.output[0].name
    trunk_graph = _prefixed(trunk, "trunk/", {image.name: image.name, common: common})
    nodes, initializers = list(trunk_graph.node), list(trunk_graph.initializer)
    value_info, outputs = list(trunk_graph.value_info), []
    for task in tasks:
        module = graphs[task]
        logits = module.graph.output[0]
        graph = _prefixed(module, f"{task}/", {image.name: image.name, "common": common, logits.name: task})
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        nodes.append(helper.make_node("Softmax", [task], [probs_output(task)], name=f"{task}/probs", axis=1))
        tensor_type = logits.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        outputs += [helper.make_tensor_value_info(name, tensor_type.elem_type, dims) for name in (task, probs_output(task))]
    composed = helper.make_model(
        helper.make_graph(nodes, "kfdeploy_" + "_".join(tasks), [image], outputs, initializers, value_info=value_info),
        opset_imports=trunk.opset_import, producer_name="kfdeploy",
    )
    composed.ir_version = trunk.ir_version
    return composed


def fuse_bundle(bundle, tasks: Sequence[str], path: Path) -> Path:
    """Write the composition of `tasks` to `path` (atomically), checked by onnx.checker."""
    import onnx

    if not tasks:
        raise KfError("save_fused needs at least one task")
    graphs = {module: bundle.graph(module) for module in ["trunk", *tasks]}
    fused = compose(graphs, tasks)
    onnx.checker.check_model(fused, full_check=True)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(fused, str(tmp))
    tmp.replace(path)
    return path
