"""A Triton Inference Server model repository from a bundle: one model per module, an
ensemble per task set.

    kfdeploy triton-repo bundles/sprites --out repo/ [--tasks ...] [--ensemble shape,scale ...]
    tritonserver --model-repository repo/

Layout (model names start with `--model-name`, default "kfdeploy"):

    repo/kfdeploy.trunk/       config.pbtxt  kfdeploy.json  1/model.onnx      image -> common
    repo/kfdeploy.task.shape/  config.pbtxt  kfdeploy.json  labels.txt  1/model.onnx   (image, common) -> logits
    repo/kfdeploy/             config.pbtxt  kfdeploy.json  shape.labels.txt ...  1/   ensemble: image -> every task
    repo/kfdeploy.shape.scale/ ...                                                    ensemble of one task set

Modules keep their bundle files byte for byte (checked against the manifest's sha256 as
they are copied, and recorded again in `kfdeploy.json`), so a repository can be traced back
to the bundle it came from. Why an ensemble per task set rather than one ensemble asked for
a subset of its outputs: Triton's issue tracker reports that a request for a subset of an
ensemble's outputs can fail ("unexpected deadlock ... at least one output is not set",
server#7482, client#763); an ensemble whose outputs are all produced is the safe layout,
and each evaluates only the steps its outputs need.

Backends:
- `onnxruntime`: platform `onnxruntime_onnx`, the bundle's graphs;
- `tensorrt`: platform `tensorrt_plan`, the bundle's engines built for one device (this
  machine's, or `engine_device`, a signature slug as `kfdeploy inspect` shows them);
- `python`: each module as a Python-backend model that runs its ONNX graph with ONNX
  Runtime (`model.py`), for Triton builds that have only the Python backend (PyTriton's).

Nothing here imports torch or onnxruntime: writing a repository needs the base install.
Each model folder is built beside the repository and renamed into it, so a Triton polling
the repository never sees half a model; a model folder that would not change is left as it
is (its files keep their times, so polling does not reload it).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import __version__
from ..bundling.bundle import Bundle
from ..errors import KfError
from . import REPOSITORY_QUEUE_DELAY_US

BACKENDS = ("onnxruntime", "tensorrt", "python")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.onnx"}
INFO_FILE = "kfdeploy.json"
# ONNX TensorProto element types -> Triton data types (the ones a bundle's graphs can have)
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class Enum(str):
    """A protobuf enum value: written bare in text format (TYPE_FP32, KIND_CPU)."""


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format for a message given as a dict: str -> quoted, int/bool -> bare,
    Enum -> bare, dict -> nested message, list of scalars -> [a, b], list of dicts ->
    repeated message, ("map", {k: v}) -> map entries."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, tuple) and value[0] == "map":
            for k, v in value[1].items():
                entry = to_pbtxt({"key": k, "value": v}, indent + 1)
                lines.append(f"{pad}{key} {{\n{entry}\n{pad}}}")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}\n{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(item, indent + 2)}\n{pad}  }}" for item in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid protobuf text string for these names


@dataclass
class RepoModel:
    """One model folder of the repository: its config, its files and its kfdeploy.json."""

    name: str
    config: dict
    info: dict
    files: Dict[str, bytes] = field(default_factory=dict)  # relative path -> content

    def contents(self) -> Dict[str, bytes]:
        return {
            "config.pbtxt": (to_pbtxt(self.config) + "\n").encode(),
            INFO_FILE: (json.dumps(self.info, indent=2) + "\n").encode(),
            **self.files,
        }


def _tensor(value_info, batched: bool) -> dict:
    """A Triton input/output from an ONNX graph's input/output (batch dimension dropped)."""
    tensor_type = value_info.type.tensor_type
    if tensor_type.elem_type not in _TRITON_TYPES:
        raise KfError(f"tensor {value_info.name!r} has ONNX element type {tensor_type.elem_type}, which this "
                      "repository writer does not map to a Triton data type")
    dims = [d.dim_value if d.dim_value > 0 else -1 for d in tensor_type.shape.dim]
    return {"name": value_info.name, "data_type": Enum(_TRITON_TYPES[tensor_type.elem_type]),
            "dims": dims[1:] if batched else dims}


def _checked_bytes(bundle: Bundle, record: dict) -> bytes:
    data = bundle.file(record["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise KfError(f"checksum mismatch for {record['file']} in bundle {bundle.root}: the file is corrupted or "
                      "was modified after export; re-export the bundle or restore the file")
    return data


def parse_ensembles(specs: Sequence[str], tasks: Sequence[str], prefix: str) -> List[Tuple[str, List[str]]]:
    """`[NAME=]TASK,TASK` -> (name, tasks); a spec without a name is called PREFIX.TASK.TASK."""
    ensembles = []
    for spec in specs:
        name, _, listed = spec.rpartition("=")
        chosen = list(dict.fromkeys(t.strip() for t in listed.split(",") if t.strip()))
        if not chosen:
            raise KfError(f"--ensemble {spec!r} names no task; give TASK,TASK or NAME=TASK,TASK")
        missing = [t for t in chosen if t not in tasks]
        if missing:
            raise KfError(f"--ensemble {spec!r} names {missing[0]!r}, which is not among the repository's tasks "
                          f"({', '.join(tasks)}); add it to --tasks")
        ensembles.append((name or ".".join([prefix, *chosen]), chosen))
    return ensembles


class RepositoryWriter:
    """Builds the models of a repository for one bundle; `write(out)` puts them in place."""

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", prefix: str = "kfdeploy",
                 kind: Optional[str] = None, instances: int = 1, max_queue_delay_us: int = REPOSITORY_QUEUE_DELAY_US,
                 engine_device: Optional[str] = None):
        if backend not in BACKENDS:
            raise KfError(f"unknown backend {backend!r} for a Triton repository; choose one of {', '.join(BACKENDS)}")
        if not _MODEL_NAME.fullmatch(prefix):
            raise KfError(f"model name {prefix!r} may hold only letters, digits, '_', '.' and '-'")
        if instances < 1:
            raise KfError(f"--instances must be at least 1, got {instances}")
        if max_queue_delay_us < 0:
            raise KfError(f"--max-queue-delay-us must be 0 or more, got {max_queue_delay_us}")
        self.bundle = bundle
        self.backend = backend
        self.prefix = prefix
        self.kind = Enum(f"KIND_{(kind or ('gpu' if backend == 'tensorrt' else 'cpu')).upper()}")
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise KfError(f"--kind must be cpu or gpu, got {kind!r}")
        if backend == "tensorrt" and self.kind != "KIND_GPU":
            raise KfError("TensorRT engines run on a GPU: --kind gpu (the default for --backend tensorrt)")
        self.instances = instances
        self.max_queue_delay_us = max_queue_delay_us
        self.engines = self._engines(engine_device) if backend == "tensorrt" else None
        self._graphs: Dict[str, object] = {}

    # -- what goes in ---------------------------------------------------------------------
    def _engines(self, device: Optional[str]) -> Dict[str, dict]:
        """The bundle's TensorRT engines for one device, by module; every module must have one."""
        from ..bundling import tensorrt as trt_backend

        if device is None:
            try:
                trt_backend.require_tensorrt()
                device = trt_backend.signature_slug(trt_backend.device_signature())
            except KfError as exc:
                raise KfError(f"{exc}; or name the device whose engines to use with --engine-device "
                              "(a signature as `kfdeploy inspect` lists it)") from None
        engines = {e["module"]: e for e in self.bundle.manifest.get("engines", [])
                   if e["builder"] == "tensorrt" and trt_backend.signature_slug(e["device"]) == device}
        if not engines:
            known = sorted({trt_backend.signature_slug(e["device"]) for e in self.bundle.manifest.get("engines", [])})
            raise KfError(f"bundle {self.bundle.root} has no TensorRT engines for device {device}"
                          + (f" (it has engines for {', '.join(known)})" if known else "")
                          + "; build them on that device with `kfdeploy build-engines`")
        return engines

    def _graph(self, module: str):
        if module not in self._graphs:
            self._graphs[module] = self.bundle.graph(module)  # checksum of the parsed bytes checked
        return self._graphs[module]

    def module_name(self, module: str) -> str:
        return f"{self.prefix}.trunk" if module == "trunk" else f"{self.prefix}.task.{module}"

    def _batch_max(self, module: str) -> int:
        if self.backend == "tensorrt" and self.engines[module].get("batch"):
            return self.engines[module]["batch"]["max"]
        return self.bundle.manifest["input"]["batch"]["max"]

    # -- models ---------------------------------------------------------------------------
    def module(self, module: str) -> RepoModel:
        """The model of one module ("trunk" or a task): config, model file, labels, kfdeploy.json."""
        if self.backend == "tensorrt" and module not in self.engines:
            raise KfError(f"bundle {self.bundle.root} has no TensorRT engine for {module!r} on this device; "
                          "build it with `kfdeploy build-engines` on the device")
        record = self.bundle.manifest["trunk"] if module == "trunk" else self.bundle.task(module)
        graph = self._graph(module).graph
        name = self.module_name(module)
        filename = MODEL_FILES[self.backend]
        source = self.engines[module] if self.backend == "tensorrt" else record
        data = _checked_bytes(self.bundle, source)
        config = {"name": name}
        if self.backend == "python":
            config["backend"] = "python"
        else:
            config["platform"] = PLATFORMS[self.backend]
            config["default_model_filename"] = filename
        config["max_batch_size"] = self._batch_max(module)
        config["input"] = [_tensor(t, batched=True) for t in graph.input]
        outputs = [_tensor(t, batched=True) for t in graph.output]
        files = {f"1/{filename}": data}
        if module != "trunk":
            outputs[0]["label_filename"] = "labels.txt"  # Triton's classification extension: class_count=k
            files["labels.txt"] = ("\n".join(record["labels"]) + "\n").encode()
        config["output"] = outputs
        config["dynamic_batching"] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
        config["instance_group"] = [{"count": self.instances, "kind": self.kind}]
        if self.backend == "python":
            config["parameters"] = ("map", {"model_file": {"string_value": filename},
                                            "sha256": {"string_value": record["sha256"]}})
            files["1/model.py"] = python_model_source().encode()
        info = {
            "kfdeploy": __version__, "bundle": str(self.bundle.root), "module": module, "backend": self.backend,
            "file": f"1/{filename}", "sha256": source["sha256"], "bytes": len(data), "bundle_file": source["file"],
            "trunk_fingerprint": self.bundle.manifest["trunk"]["fingerprint"] if module == "trunk" else record["trunk_fingerprint"],
        }
        if self.backend == "tensorrt":
            info["engine"] = {k: source[k] for k in ("device", "precision", "builder") if k in source}
        if module != "trunk":
            info["labels"] = record["labels"]
        return RepoModel(name, config, info, files)

    def ensemble(self, name: str, tasks: Sequence[str]) -> RepoModel:
        """image -> trunk -> common -> each task; outputs named after the tasks (logits)."""
        if not _MODEL_NAME.fullmatch(name):
            raise KfError(f"ensemble name {name!r} may hold only letters, digits, '_', '.' and '-'")
        trunk = self._graph("trunk").graph
        image, common = trunk.input[0], trunk.output[0]
        steps = [{"model_name": self.module_name("trunk"), "model_version": -1,
                  "input_map": ("map", {image.name: image.name}),
                  "output_map": ("map", {common.name: common.name})}]
        outputs, files = [], {}
        for task in tasks:
            graph = self._graph(task).graph
            inputs = {t.name: (image.name if t.name == image.name else common.name) for t in graph.input}
            steps.append({"model_name": self.module_name(task), "model_version": -1,
                          "input_map": ("map", inputs),
                          "output_map": ("map", {graph.output[0].name: task})})
            output = _tensor(graph.output[0], batched=True)
            output["name"] = task
            output["label_filename"] = f"{task}.labels.txt"
            outputs.append(output)
            files[f"{task}.labels.txt"] = ("\n".join(self.bundle.task(task)["labels"]) + "\n").encode()
        config = {
            "name": name, "platform": "ensemble",
            "max_batch_size": min(self._batch_max(m) for m in ["trunk", *tasks]),
            "input": [_tensor(image, batched=True)], "output": outputs,
            "ensemble_scheduling": {"step": steps},
        }
        info = {"kfdeploy": __version__, "bundle": str(self.bundle.root), "ensemble": list(tasks),
                "steps": [s["model_name"] for s in steps], "outputs": "logits (scores are softmax(logits))",
                "trunk_fingerprint": self.bundle.manifest["trunk"]["fingerprint"],
                "labels": {t: self.bundle.task(t)["labels"] for t in tasks}}
        files["1/.keep"] = b""  # Triton wants a version folder, even an empty one, for an ensemble
        return RepoModel(name, config, info, files)

    def models(self, tasks: Sequence[str], ensembles: Sequence[Tuple[str, Sequence[str]]]) -> List[RepoModel]:
        for task in tasks:
            self.bundle.task(task)  # unknown names fail here, listing the available ones
        models = [self.module("trunk"), *(self.module(t) for t in tasks)]
        models += [self.ensemble(name, chosen) for name, chosen in ensembles]
        names = [m.name for m in models]
        clash = next((n for n in names if names.count(n) > 1), None)
        if clash:
            raise KfError(f"two models of the repository would be called {clash!r}; name the ensembles "
                          "yourself: --ensemble NAME=TASK,TASK")
        return models


def python_model_source() -> str:
    """model.py of a Python-backend module: its ONNX graph on ONNX Runtime, one run per batch."""
    return '''"""A kfdeploy module on Triton's Python backend: runs 1/model.onnx with ONNX Runtime.

Written by `kfdeploy triton-repo --backend python`. The graph's sha256 is checked against
the one the bundle recorded before the session is made.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / parameters["model_file"]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != parameters["sha256"]:
            raise pb_utils.TritonModelException(f"checksum mismatch for {path}: not the file the bundle exported")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("threads", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        feeds = {name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests] for name in self.inputs}
        sizes = [len(x) for x in feeds[self.inputs[0]]]
        results = self.session.run(self.outputs, {name: np.concatenate(parts) for name, parts in feeds.items()})
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, value[start:start + size]) for name, value in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def _same(folder: Path, contents: Dict[str, bytes]) -> bool:
    """Whether `folder` holds exactly these files with these bytes."""
    if not folder.is_dir():
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return present == set(contents) and all((folder / rel).read_bytes() == data for rel, data in contents.items())


def write_models(models: Sequence[RepoModel], out: Path) -> Dict[str, str]:
    """Put each model folder into the repository `out` (created if needed): built in a staging
    folder beside the repository, then renamed into it, replacing an older folder of that
    name. Returns model name -> "written" | "unchanged"."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KfError(f"{out} exists and is not a folder; give --out a folder for the model repository")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KfError(f"cannot create the model repository {out} ({exc.strerror})") from None
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    done = {}
    try:
        for model in models:
            contents = model.contents()
            target = out / model.name
            if _same(target, contents):
                done[model.name] = "unchanged"
                continue
            folder = staging / model.name
            for relative, data in contents.items():
                path = folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if target.exists():
                old = staging / f"{model.name}.old"
                os.rename(target, old)  # the one moment the model is absent: between two renames
            os.rename(folder, target)
            done[model.name] = "written"
    except OSError as exc:
        raise KfError(f"cannot write the model repository {out} ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def write_repository(bundle, out: Path, tasks: Optional[Sequence[str]] = None, ensembles: Sequence[str] = (),
                     backend: str = "onnxruntime", prefix: str = "kfdeploy", kind: Optional[str] = None,
                     instances: int = 1, max_queue_delay_us: int = REPOSITORY_QUEUE_DELAY_US,
                     engine_device: Optional[str] = None) -> Dict[str, str]:
    """Write (or update) a Triton model repository at `out` for `bundle` (a folder, archive or
    Bundle): the trunk, `tasks` (default all) and the ensembles named in `ensembles`
    (`[NAME=]TASK,TASK`; none given: one ensemble called `prefix` over all of `tasks`)."""
    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    chosen = list(dict.fromkeys(tasks)) if tasks else opened.tasks
    writer = RepositoryWriter(opened, backend=backend, prefix=prefix, kind=kind, instances=instances,
                              max_queue_delay_us=max_queue_delay_us, engine_device=engine_device)
    specs = list(ensembles) or [f"{prefix}={','.join(chosen)}"]
    models = writer.models(chosen, parse_ensembles(specs, chosen, prefix))
    return write_models(models, Path(out))
