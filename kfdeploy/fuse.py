"""Fuse a bundle's trunk and chosen tasks into one ONNX graph, for targets that want one file.

The fused graph takes `image` and returns one output per task (its logits), named after
the task. It computes exactly what the assembly computes: the trunk once, its `common`
shared by every task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .bundle import Bundle
from .errors import KfError


def fuse_bundle(bundle: Bundle, tasks: Sequence[str], path: Path) -> Path:
    import onnx
    from onnx import compose, helper

    if not tasks:
        raise KfError("save_fused needs at least one task")
    trunk = onnx.load(str(bundle.file(bundle.manifest["trunk"]["file"])))
    graph = trunk.graph
    nodes, initializers, outputs = list(graph.node), list(graph.initializer), []
    value_info = list(graph.value_info)
    for task in tasks:
        module = onnx.load(str(bundle.file(bundle.task(task)["file"])))
        # Prefix every name so the task graphs cannot collide, then wire the task's own
        # inputs back to the shared image and the trunk's common feature.
        prefix = f"{task}/"
        module = compose.add_prefix(module, prefix)
        shared = {f"{prefix}image": "image", f"{prefix}common": "common", f"{prefix}logits": task}
        for node in module.graph.node:
            node.input[:] = [shared.get(name, name) for name in node.input]
            node.output[:] = [shared.get(name, name) for name in node.output]
        nodes += module.graph.node
        initializers += module.graph.initializer
        value_info += module.graph.value_info
        logits = module.graph.output[0]
        outputs.append(helper.make_tensor_value_info(task, logits.type.tensor_type.elem_type,
                                                     [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]))
    fused_graph = helper.make_graph(nodes, "kfdeploy_fused", list(graph.input), outputs, initializers, value_info=value_info)
    fused = helper.make_model(fused_graph, opset_imports=trunk.opset_import, producer_name="kfdeploy")
    fused.ir_version = trunk.ir_version
    onnx.checker.check_model(fused, full_check=True)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(fused, str(tmp))
    tmp.replace(path)
    return path
