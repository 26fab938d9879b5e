"""Answer one batch whose rows ask for different tasks: the trunk once for every row, each
task module only on the rows that asked for it, in one ONNX Runtime session.

    router = Router("bundles/sprites", tasks=["shape", "scale", "pos_x"])
    answers = router.run_requests([(images_a, ["shape"], False), (images_b, ["scale", "pos_x"], False)])
    # [{"shape": (Na, 3)}, {"scale": (Nb, 6), "pos_x": (Nb, 32)}]: probabilities (True: logits);
    # a request that cannot be answered gets the KfError saying why, the others their scores

This is what a server needs when its dynamic batch gathers requests that each name their
own tasks. The plain way is to group the rows by task set and run each group's composition:
the trunk then runs once per group. The routed composition instead takes the image batch
and, per task, the indices of the rows that want it (input `<task>:rows`, int64), gathers
those rows of the image and of the trunk's `common` output, and runs the task module on
them; its outputs (`<task>`, `<task>:probs`) hold one row per index, in index order. One
session keeps the runtime's rule (one graph, one thread pool: see kfdeploy/runtime.py), and
a task no row asks for costs nothing on the CPU (ONNX Runtime runs its nodes on 0 rows).
Other execution providers are given one padding row instead (TensorRT's optimization
profiles start at batch 1): untested here, where no GPU is lent to CPU machines.

The router serves a set of tasks that `add_task`/`remove_task` change while batches run:
the new composition is built in the calling thread and swapped in whole, and a batch runs on
the snapshot it started with, as `Assembly` does. Validation is `Assembly.prepare`'s, per
request: a bad request is answered with its own error and runs nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..bundling.bundle import Bundle
from ..bundling.fuse import probs_output
from ..errors import KfError
from ..runtime import TaskSelection, load
from ..sessions import run_failure, run_failures

ROWS_SUFFIX = ":rows"
Request = Tuple[np.ndarray, Optional[Sequence[str]], bool]  # images, tasks (None: all served), logits
Answer = Union[Dict[str, np.ndarray], KfError]  # scores per task, or why the request was refused


def rows_input(task: str) -> str:
    return task + ROWS_SUFFIX


def compose_routed(graphs: Dict[str, object], tasks: Sequence[str]):
    """One ModelProto: the trunk on every row of `image`; each task in `tasks` on the rows
    `<task>:rows` lists (gathered from the image and from `common`).

    `graphs` maps "trunk" and each task to its ModelProto (`Bundle.graph`); names inside are
    prefixed with their module (`trunk/...`, `<task>/...`), as kfdeploy/bundling/fuse.py does, so
    ONNX Runtime's profiler attributes time the same way.
    """
    from onnx import TensorProto, compose, helper

    if not tasks:
        raise KfError("a routed composition needs at least one task")

    def prefixed(model, prefix: str, shared: Dict[str, str]):
        graph = compose.add_prefix(model, prefix).graph
        rename = {prefix + name: new for name, new in shared.items()}
        for node in graph.node:
            node.input[:] = [rename.get(name, name) for name in node.input]
            node.output[:] = [rename.get(name, name) for name in node.output]
        return graph

    trunk = graphs["trunk"]
    image = trunk.graph.input[0]
    common = "common"
    trunk_graph = prefixed(trunk, "trunk/", {image.name: image.name, trunk.graph.output[0].name: common})
    nodes, initializers = list(trunk_graph.node), list(trunk_graph.initializer)
    value_info, inputs, outputs = list(trunk_graph.value_info), [image], []
    for task in tasks:
        module = graphs[task]
        task_image, task_common, count = f"{task}/rows/image", f"{task}/rows/common", f"{task}_rows"
        module_inputs = [i.name for i in module.graph.input]
        logits = module.graph.output[0]
        graph = prefixed(module, f"{task}/", {module_inputs[0]: task_image, module_inputs[1]: task_common, logits.name: task})
        # The module's shapes name its batch dimension as the trunk's does ("batch"); here it
        # has the task's own row count, and ONNX Runtime plans buffers by those names.
        for info in graph.value_info:
            for dim in info.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = count
        inputs.append(helper.make_tensor_value_info(rows_input(task), TensorProto.INT64, [count]))
        nodes += [helper.make_node("Gather", [image.name, rows_input(task)], [task_image], name=f"{task}/rows/gather_image", axis=0),
                  helper.make_node("Gather", [common, rows_input(task)], [task_common], name=f"{task}/rows/gather_common", axis=0)]
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        nodes.append(helper.make_node("Softmax", [task], [probs_output(task)], name=f"{task}/probs", axis=1))
        tensor_type = logits.type.tensor_type
        classes = [d.dim_param or d.dim_value for d in tensor_type.shape.dim][1:]
        outputs += [helper.make_tensor_value_info(name, tensor_type.elem_type, [count, *classes])
                    for name in (task, probs_output(task))]
    routed = helper.make_model(
        helper.make_graph(nodes, "kfdeploy_routed_" + "_".join(tasks), inputs, outputs, initializers, value_info=value_info),
        opset_imports=trunk.opset_import, producer_name="kfdeploy",
    )
    routed.ir_version = trunk.ir_version
    return routed


class Routed:
    """A routed composition of a set of tasks and its session."""

    def __init__(self, tasks: Tuple[str, ...], model: bytes, session, pad_empty: bool):
        self.tasks = tasks
        self.model = model
        self.session = session
        self.pad_empty = pad_empty
        self._failures = run_failures()

    def run(self, x: np.ndarray, rows: Dict[str, np.ndarray], outputs: Sequence[str]) -> Dict[str, np.ndarray]:
        """`rows[task]`: the row indices each task runs on (every task of the composition; an
        empty array for none). Returns the requested outputs, one row per index."""
        feeds = {"image": x}
        for task in self.tasks:
            index = rows.get(task)
            if index is None or len(index) == 0:
                index = np.zeros(1 if self.pad_empty else 0, np.int64)
            feeds[rows_input(task)] = index
        try:
            values = self.session.run(list(outputs), feeds)
        except self._failures as exc:  # the graphs are the bundle's, untrusted: one line, naming the module
            raise run_failure(exc, ["trunk", *self.tasks]) from None
        return dict(zip(outputs, values))


class ServedTasks(TaskSelection):
    """A served set of tasks on an assembly with no task of its own (`self.model`), which
    brings the checks: a task is refused, or read from the bundle's folder if added there
    since, exactly as `kfdeploy.load` would. The Router and kfdeploy serve's Server."""

    _set_name = "served"

    @property
    def bundle(self) -> Bundle:
        """The assembly's bundle: re-read from its folder when a task added there since is asked for."""
        return self.model.bundle

    def labels(self, task: str) -> List[str]:
        return self.bundle.task(task)["labels"]

    def check_task(self, name: str) -> None:
        self.model.check_task(name)  # unknown tasks and foreign trunks are refused here; added ones read


class Router(ServedTasks):
    """A bundle's trunk and a served set of tasks, answering batches of requests that each
    name their own tasks (see the module's docstring)."""

    def __init__(self, bundle, tasks: Optional[Sequence[str]] = None, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, verify: bool = True, log=None):
        # An assembly with no task builds no session: it brings the checks (checksums, trunk
        # fingerprints), the providers and threads, and the input validation.
        self.model = load(bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify), tasks=[],
                          providers=providers, threads=threads, log=log)
        self._graphs: Dict[str, object] = {}
        self._init_selection()
        chosen = list(dict.fromkeys(tasks)) if tasks is not None else self.bundle.tasks
        for task in chosen:
            self.check_task(task)
        with self._mutation:
            self._switch(tuple(chosen))

    def _runner_for(self, tasks: Tuple[str, ...]) -> Routed:
        from ..runtime import ort_session_for

        ordered = [t for t in self.bundle.tasks if t in tasks]  # bundle order: one graph per set
        for module in ["trunk", *ordered]:
            if module not in self._graphs:
                self._graphs[module] = self.bundle.graph(module)  # parsed once, checksum of the bytes checked
        model = compose_routed(self._graphs, ordered).SerializeToString()
        providers = self.model.providers_for(frozenset(ordered))
        session = ort_session_for(model, providers, self.model.threads)
        return Routed(tuple(ordered), model, session, pad_empty=self.model.providers[0] != "CPUExecutionProvider")

    # -- answering ----------------------------------------------------------------------
    def run_requests(self, requests: Sequence[Request]) -> List[Answer]:
        """Answer each request (images, tasks or None for all served, logits) with its tasks'
        scores. A request that cannot be answered gets, in its place, the KfError that says
        why, and the others are answered all the same: a server batches strangers' requests
        together, and one client's NaN must not fail the rest."""
        served, routed = self._state  # a snapshot: add/remove elsewhere cannot disturb this batch
        answers: List[Answer] = [None] * len(requests)
        good = []  # (index, images as the graph takes them, tasks, logits)
        for index, (images, tasks, logits) in enumerate(requests):
            try:
                chosen = tuple(served) if tasks is None else tuple(dict.fromkeys(tasks))
                unserved = [t for t in chosen if t not in served]
                if unserved:
                    known = "is not served" if unserved[0] in self.bundle.manifest["tasks"] else "is not a task of this bundle"
                    raise KfError(f"task {unserved[0]!r} {known}; served: {', '.join(served) or 'none'}")
                if not isinstance(logits, (bool, np.bool_)):
                    raise KfError(f"logits must be true or false, got {logits!r}")
                good.append((index, self.model.prepare(images), chosen, logits))
            except KfError as exc:
                answers[index] = exc
        if routed is None or sum(len(x) for _, x, _, _ in good) == 0:
            for index, x, tasks, _ in good:
                answers[index] = {t: np.zeros((len(x), self.bundle.task(t)["classes"]), np.float32) for t in tasks}
            return answers
        x = good[0][1] if len(good) == 1 else np.concatenate([x for _, x, _, _ in good])
        rows: Dict[str, list] = {t: [] for t in routed.tasks}
        start = 0
        for _, images, tasks, _ in good:
            for task in tasks:
                rows[task].append(np.arange(start, start + len(images), dtype=np.int64))
            start += len(images)
        rows_of = {t: (np.concatenate(parts) if parts else np.zeros(0, np.int64)) for t, parts in rows.items()}
        outputs = sorted({(t if logits else probs_output(t)) for _, _, tasks, logits in good for t in tasks})
        values = routed.run(x, rows_of, outputs)
        # each task's output holds its rows in request order: hand each request its slice
        taken = dict.fromkeys(routed.tasks, 0)
        for index, images, tasks, logits in good:
            answer = answers[index] = {}
            for task in tasks:
                answer[task] = values[task if logits else probs_output(task)][taken[task]:taken[task] + len(images)]
                taken[task] += len(images)
        return answers

    def run(self, images, tasks: Optional[Sequence[str]] = None, logits: bool = False) -> Dict[str, np.ndarray]:
        """One request: like `Assembly.run` (raises the KfError of a request it cannot answer)."""
        (answer,) = self.run_requests([(images, tasks, logits)])
        if isinstance(answer, KfError):
            raise answer
        return answer

    __call__ = run
