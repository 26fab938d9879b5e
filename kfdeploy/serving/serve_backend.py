"""The Python-backend model that `kfdeploy serve` runs inside Triton (see kfdeploy/serving/serve.py).

Triton's Python backend imports this from the model repository's `1/model.py`, which
kfdeploy writes as one import line: the code that runs is this installed package's, and
nothing from the bundle is executed. It runs in Triton's stub process, so it imports
`triton_python_backend_utils`, which exists only there.

The model config's parameters say what to serve: `bundle` (a folder), `tasks` (a JSON
list) and `threads` (ONNX Runtime's, empty for the default). Each dynamic batch goes to one
`Router.run_requests` call: the trunk once for every row, each task on the rows that asked
for it, and a request that cannot be answered (NaN, a task not served, ...) gets its own
error response while the requests batched with it are answered.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

from kfdeploy.serving.routing import Router


def _error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"kfdeploy: {message}"))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.outputs = {output["name"] for output in config["output"]}
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        # The stub's Python runs isolated with no locale set, so its filesystem encoding is
        # ASCII: a path with a 'ü' in it must reach open() as the bytes it is on disk
        bundle = os.fsdecode(parameters["bundle"].encode("utf-8"))
        self.router = Router(bundle, tasks=json.loads(parameters["tasks"]), threads=threads,
                             log=lambda line: print(line, file=sys.stderr, flush=True))  # into Triton's log

    def _parse(self, request):
        names = list(request.requested_output_names())
        raw = request.parameters()
        logits = json.loads(raw).get("logits", False) if raw else False
        # A request that names no output reaches here asking for every declared one (every
        # task of the bundle): it means every served task, as does naming them all
        tasks = None if not names or set(names) == self.outputs else names
        return pb_utils.get_input_tensor_by_name(request, "image").as_numpy(), tasks, logits

    def execute(self, requests):
        try:
            answers = self.router.run_requests([self._parse(r) for r in requests])
        except Exception as exc:  # noqa: BLE001 - a failure of the batch itself: every request is told
            return [_error(f"{type(exc).__name__}: {exc}") for _ in requests]
        return [_error(str(answer)) if isinstance(answer, Exception) else pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(task, np.ascontiguousarray(scores)) for task, scores in answer.items()])
                for answer in answers]
