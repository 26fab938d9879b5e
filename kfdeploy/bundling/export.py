"""Export a factorized run into a bundle: one ONNX graph for the trunk, one per task.

The trunk maps image -> common feature; a task module maps (image, common) -> logits.
Every graph takes pixels in [0, 1] and applies the run's per-channel normalization itself
(a Sub and a Div at its input; none for the identity of sprites runs), so every consumer,
ONNX Runtime on its own included, feeds the same plain pixels. Every graph has a dynamic batch dimension and nothing else dynamic (what TensorRT wants),
is checked by onnx.checker with full shape inference, and is compared with its PyTorch
module before the bundle is written. The bundle appears atomically: a crash or Ctrl-C
leaves the previous bundle or none, never half of one.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib.resources
import io
import logging
import os
import shutil
import math
import threading
import tomllib
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import KfError
from ..names import TASK_NAME_RULE, is_task_name, module_title, printable
from ..sessions import quiet_options, run_failure, run_failures
from ..training.models import FactorConfig, FactorNet, TaskModule
from ..training.runs import apply_weights, check_weights_fit, check_writable, load_factor_run, load_weights, save_tensors_atomic, write_json_atomic
from ..training.train import weights_digest
from .bundle import (FORMAT, FORMAT_VERSION, MANIFEST, PIXEL_TYPES, Bundle, operator_problem, read_manifest, sha256_file,
                     write_archive)
from .single_pixel import single_pixel_tail

# export/*.toml, installed inside the package as kfdeploy.profiles (setup.cfg): read from
# there, an installed kfdeploy finds them without the source tree.
PROFILES = importlib.resources.files("kfdeploy.profiles")
PARITY_IMAGES = 256
PARITY_MAX_ABS_ERR = 1e-4
# Or this, relative to the module's largest output: float32 error grows with the size of
# the values and the depth of the net, so a deep net's large logits (tens) may differ by
# more than 1e-4 while agreeing to ~6 digits. export/BUNDLE_FORMAT.md states the rule.
PARITY_MAX_REL_ERR = 1e-5
PARITY_MIN_ARGMAX_AGREEMENT = 0.999
ACCURACY_IMAGES = 2048
EXAMPLE_IMAGES = 6  # held-out images stored in a bundle (examples/<n>.png) for demos and smoke tests
EXAMPLES_DIR = "examples"


@dataclass(frozen=True)
class ExportProfile:
    name: str
    description: str = ""
    opset: int = 20
    precision: str = "fp32"  # for engines built from the bundle; ONNX files are always fp32
    batch_min: int = 1
    batch_opt: int = 64
    batch_max: int = 256


def bundle_profile(bundle: Bundle) -> ExportProfile:
    """The profile a bundle was exported with (its manifest's `profile`; fields this kfdeploy
    does not know are left out, missing ones take their defaults)."""
    recorded = bundle.manifest.get("profile") or {}
    known = {f.name for f in fields(ExportProfile)}
    return ExportProfile(**{k: v for k, v in recorded.items() if k in known and k != "name" and v is not None},
                         name=str(recorded.get("name") or "cpu-fp32"))


def available_profiles() -> List[str]:
    return sorted(p.name.removesuffix(".toml") for p in PROFILES.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> ExportProfile:
    """A profile by name (export/NAME.toml) or by path to a TOML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES / f"{name_or_path}.toml"
    if not path.is_file():
        raise KfError(f"unknown export profile {name_or_path!r}; available: {', '.join(available_profiles())} (or a path to a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
        batch = data.pop("batch", {})
        profile = ExportProfile(
            name=data.pop("name", Path(path.name).stem),
            batch_min=batch.get("min", 1), batch_opt=batch.get("opt", 64), batch_max=batch.get("max", 256), **data,
        )
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise KfError(f"export profile {path} is invalid ({exc}); see export/cpu-fp32.toml for the fields") from None
    if not 1 <= profile.batch_min <= profile.batch_opt <= profile.batch_max:
        raise KfError(f"export profile {path}: batch needs 1 <= min <= opt <= max")
    if profile.precision not in ("fp32", "fp16"):
        raise KfError(f"export profile {path}: precision must be fp32 or fp16, not {profile.precision!r}")
    return profile


Normalization = Tuple[List[float], List[float]]  # per-channel (mean, std)


def identity_normalization(channels: int) -> Normalization:
    return [0.0] * channels, [1.0] * channels


class Normalize(nn.Module):
    """(image - mean) / std per channel: the first thing every graph does, so a bundle takes
    0-1 pixels whatever its network was trained on. The identity adds no operation."""

    def __init__(self, normalization: Normalization):
        super().__init__()
        mean, std = normalization
        self.identity = all(m == 0 for m in mean) and all(s == 1 for s in std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Div, not a multiply by 1/std: the graph and this module round the same way.
        return image if self.identity else (image - self.mean) / self.std


class TrunkGraph(nn.Module):
    """What trunk.onnx computes: 0-1 image -> common feature."""

    def __init__(self, model: FactorNet, normalization: Optional[Normalization] = None):
        super().__init__()
        self.model = model
        self.normalize = Normalize(normalization or identity_normalization(model.config.trunk.in_channels))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.normalize(image))


class TaskGraph(nn.Module):
    """What tasks/<task>.onnx computes: (0-1 image, common) -> logits.

    A task answers head(common + mu(feature)), linear in both common and feature, so it runs
    as one matrix product on [common, feature] with weights [W_head, W_head W_mu] and bias
    b_head + W_head b_mu, folded in float64: mu's d x width matrix (512 x 1280 for a
    MobileNetV2 x0.5 under a ResNet-18, half the task's file and a 2.6 MB read per call at
    batch 1) is gone, for a classes x width one. The weights are a snapshot of the task's:
    build this after training."""

    def __init__(self, task: TaskModule, normalize: Normalize):
        super().__init__()
        self.task = task
        self.normalize = normalize
        mu_weight, mu_bias, self.code_input = task.code_layer()
        with torch.no_grad():
            head = task.head.weight.double()
            weight = torch.cat([head, head @ mu_weight.double()], dim=1)
            bias = task.head.bias.double() + head @ mu_bias.double()
        self.register_buffer("weight", weight.to(task.head.weight.dtype), persistent=False)
        self.register_buffer("bias", bias.to(task.head.bias.dtype), persistent=False)

    def forward(self, image: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
        feature = self.code_input(self.normalize(image))
        return nn.functional.linear(torch.cat([common, feature], dim=1), self.weight, self.bias)


def graph_modules(model: FactorNet, normalization: Optional[Normalization] = None) -> Dict[str, nn.Module]:
    """The PyTorch modules the graphs are exported from, by module name ("trunk", each task):
    they take 0-1 pixels and normalize them as the graphs do. The torch backend runs these."""
    trunk = TrunkGraph(model, normalization)
    return {"trunk": trunk, **{task: TaskGraph(module, trunk.normalize) for task, module in model.tasks.items()}}


def run_normalization(info: dict, config: FactorConfig, run_dir: Path) -> Normalization:
    """The normalization a run trained with: run.json's `input` (mean, std per channel), the
    identity where it has none (sprites runs, runs made before it was recorded)."""
    channels, size = config.trunk.in_channels, config.trunk.image_size
    spec = info.get("input")
    if spec is None:
        return identity_normalization(channels)
    where = f"{Path(run_dir) / 'run.json'}: input"

    def numbers(key: str) -> List[float]:
        values = spec.get(key) if isinstance(spec, dict) else None
        if (not isinstance(values, list) or len(values) != channels
                or not all(type(v) in (int, float) and math.isfinite(v) for v in values)):
            raise KfError(f"{where}.{key} must be {channels} finite number(s), one per channel of the model, "
                          f"got {values!r}; re-create the run")
        return [float(v) for v in values]

    mean, std = numbers("mean"), numbers("std")
    if any(s <= 0 for s in std):
        raise KfError(f"{where}.std must be positive, got {std}; re-create the run")
    for key, expected in (("channels", channels), ("image_size", size)):
        if key in spec and spec[key] != expected:
            raise KfError(f"{where}.{key} is {spec[key]!r} but the model takes {expected}; re-create the run")
    return mean, std


@contextlib.contextmanager
def _activations_out_of_place(module: nn.Module):
    """Activations (timm's ReLU6, ReLU...) switched to out-of-place while exporting: the same
    values, but torch.export decomposes an in-place hardtanh_ through the symbolic-shape
    clamp reference at ~0.14 s a call, which made a MobileNetV2 module's export take twice as long."""
    switched = [m for m in module.modules() if getattr(m, "inplace", None) is True]
    for m in switched:
        m.inplace = False
    try:
        yield
    finally:
        for m in switched:
            m.inplace = True


_REGISTRY_LOCK = threading.Lock()
_registries: Dict[str, object] = {}  # torch.onnx's torchlib registry by opset, built once per process


@contextlib.contextmanager
def _torchlib_registry_reused():
    """torch.onnx builds its registry of ATen -> ONNX functions afresh on every export, parsing
    the source of ~2,000 onnxscript functions (1.2 s of a SimpleConv module's 3.7 s export here;
    a bundle is six exports, a test run hundreds). While kfdeploy's own export runs, the
    registry is built once per opset and handed out again: nothing mutates it but a
    custom_translation_table, which kfdeploy never passes, and exports made by others in this
    process (at any other time) get torch's own fresh one. A torch without this private hook
    exports as before."""
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return

    def reused(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))  # the opset, as torch.onnx passes it
        if key not in _registries:
            _registries[key] = build(cls, *args, **kwargs)
        return _registries[key]

    with _REGISTRY_LOCK:
        _registration.ONNXRegistry.from_torchlib = classmethod(reused)
        try:
            yield
        finally:
            _registration.ONNXRegistry.from_torchlib = original


def _quiet_export(module: nn.Module, args: tuple, path: Path, input_names: List[str], output_names: List[str], profile: ExportProfile) -> None:
    """torch.onnx.export with the batch dimension dynamic and its chatter kept out of the user's terminal."""
    batch = torch.export.Dim("batch", min=profile.batch_min, max=profile.batch_max)
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _activations_out_of_place(module), \
                _torchlib_registry_reused():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(), args, str(path), dynamo=True, external_data=False,
                input_names=input_names, output_names=output_names, opset_version=profile.opset,
                dynamic_shapes=[{0: batch} for _ in input_names], verbose=False,
            )
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    import onnx

    model = onnx.load(str(path))
    fold_batch_norm(model)
    single_pixel_tail(model)
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name not in used]:  # what the rewrites left unread
        graph.initializer.remove(initializer)
    for node in graph.node:
        # torch.onnx's provenance per node: stack traces with this machine's source paths
        # (7% of a MobileNet task's file), not for shipping
        del node.metadata_props[:]
    onnx.save(model, str(path))


def fold_batch_norm(model) -> int:
    """Fold every BatchNormalization that follows a Conv into the Conv's weights, in the
    graph of `model` (an onnx.ModelProto); how many.

    The exporter's optimizer folds them today (torch 2.13/2.14); this keeps deployed graphs
    free of inference-time BatchNorm whatever the exporter does. A BatchNorm without a
    Conv of its own before it (pre-activation nets) stays: ONNX Runtime and TensorRT run it.
    The initializers it leaves unread stay: the caller drops them.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    uses: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    folded = []
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producers.get(bn.input[0])
        params = list(bn.input[1:5])
        conv_bias = conv.input[2] if conv is not None and len(conv.input) > 2 and conv.input[2] else None
        if (conv is None or conv.op_type != "Conv" or uses.get(conv.output[0]) != 1 or conv.output[0] in outputs
                or any(bn.output[1:]) or not all(p in initializers for p in params + [conv.input[1]])
                or (conv_bias is not None and conv_bias not in initializers)):
            continue
        scale, shift, mean, var = (numpy_helper.to_array(initializers[p]).astype(np.float64) for p in params)
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        weight = numpy_helper.to_array(initializers[conv.input[1]])
        bias = numpy_helper.to_array(initializers[conv_bias]).astype(np.float64) if conv_bias else np.zeros(len(weight))
        factor = scale / np.sqrt(var + epsilon)
        new_weight = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype)
        new_bias = ((bias - mean) * factor + shift).astype(weight.dtype)
        # New names: the old initializers may feed other nodes too.
        names = (f"{conv.name or conv.output[0]}.bn_folded.weight", f"{conv.name or conv.output[0]}.bn_folded.bias")
        graph.initializer.extend([numpy_helper.from_array(new_weight, names[0]), numpy_helper.from_array(new_bias, names[1])])
        conv.input[1] = names[0]
        if conv_bias:
            conv.input[2] = names[1]
        else:
            conv.input.append(names[1])
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    return len(folded)


def check_graph(model, name: str) -> None:
    """onnx.checker (full) on a parsed graph (an onnx.ModelProto) that `name` names in messages,
    and the operators a reader takes (bundle.OPERATORS): a graph export writes must read."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise KfError(f"{name} fails onnx.checker: {str(exc).splitlines()[0]}") from None
    problem = operator_problem(model)
    if problem:
        raise KfError(f"{name} {problem}: readers take only the operators kfdeploy's exports were seen to emit "
                      "(OPERATORS in kfdeploy/bundling/bundle.py), so this architecture cannot be exported yet — report it")


def ort_session(graph: Path | bytes):
    """A CPU session of a graph file, or of a serialized graph (bytes already checked)."""
    import onnxruntime as ort

    return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), quiet_options(),
                                providers=["CPUExecutionProvider"])


def run_module(session, feeds: Dict[str, np.ndarray], module: str, rows: int, width: int) -> np.ndarray:
    """The one output of a module's session, which must be `rows` x `width`: what ONNX Runtime
    raises running a bundle's graph, or an output of another shape, is a KfError naming `module`."""
    try:
        out = session.run(None, feeds)[0]
    except run_failures() as exc:
        raise run_failure(exc, [module]) from None
    if out.shape != (rows, width):
        raise KfError(f"{module_title(module)} gave an output of shape {out.shape} for {rows} image(s) where the manifest says "
                      f"{(rows, width)}: its graph does not compute what the bundle declares; re-export the bundle")
    return out


def compare(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """Max absolute error, and the same relative to the largest reference magnitude."""
    error = float(np.abs(reference - candidate).max()) if reference.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 1.0
    return {"max_abs_err": error, "max_rel_err": error / max(scale, 1e-12)}


def parity_images(config: FactorConfig, data: str, seed: int, count: int = PARITY_IMAGES) -> torch.Tensor:
    """Held-out sprites (from `seed` on) for sprites bundles; uniform noise images otherwise
    (a bundle does not carry its data: export compares on the run's held-out images instead)."""
    if data == "sprites":
        from ..training.data import SpritesSource, heldout_combinations
        from ..training.pipeline import resize_images

        images = SpritesSource().heldout(count, offset=seed % (len(heldout_combinations()) - count))[0]
        return resize_images(images, config.trunk.image_size)  # rendered at 64x64
    generator = torch.Generator().manual_seed(seed)
    shape = (count, config.trunk.in_channels, config.trunk.image_size, config.trunk.image_size)
    return torch.rand(shape, generator=generator)


@torch.no_grad()
def module_parity(model: FactorNet, trunk: Path | bytes, tasks: Dict[str, Path | bytes], images: torch.Tensor,
                  normalization: Optional[Normalization] = None) -> Dict[str, dict]:
    """Compare each ONNX module (a graph file or serialized graph) with its PyTorch module on the same 0-1 inputs.

    The PyTorch reference normalizes the images as the graphs must (graph_modules). Task
    modules get the PyTorch common feature so each module's error is its own; the argmax
    agreement is end to end (ONNX trunk feeding ONNX task vs PyTorch).
    """
    reference_modules = graph_modules(model, normalization)
    common = reference_modules["trunk"](images)
    rows = len(images)
    onnx_common = run_module(ort_session(trunk), {"image": images.numpy()}, "trunk", rows, common.shape[1])
    result = {"trunk": {**compare(common.numpy(), onnx_common), "images": len(images)}}
    for task, graph in tasks.items():
        session = ort_session(graph)
        reference = reference_modules[task](images, common).numpy()
        width = reference.shape[1]
        isolated = run_module(session, {"image": images.numpy(), "common": common.numpy()}, task, rows, width)
        end_to_end = run_module(session, {"image": images.numpy(), "common": onnx_common}, task, rows, width)
        agreement = float((end_to_end.argmax(1) == reference.argmax(1)).mean())
        result[task] = {**compare(reference, isolated), "argmax_agreement": agreement, "images": len(images)}
    return result


def _check_parity(parity: Dict[str, dict]) -> None:
    """Each module: max abs error <= 1e-4 or <= 1e-5 of its largest output; argmax agreement >= 0.999."""
    for module, p in parity.items():
        close = p["max_abs_err"] <= PARITY_MAX_ABS_ERR or p["max_rel_err"] <= PARITY_MAX_REL_ERR
        if not close or p.get("argmax_agreement", 1.0) < PARITY_MIN_ARGMAX_AGREEMENT:
            raise KfError(
                f"{module}: ONNX Runtime disagrees with PyTorch (max abs error {p['max_abs_err']:.2e}, relative "
                f"{p['max_rel_err']:.2e}, argmax agreement {p.get('argmax_agreement', 1.0):.4f}; tolerance "
                f"{PARITY_MAX_ABS_ERR:g} absolute or {PARITY_MAX_REL_ERR:g} relative, and {PARITY_MIN_ARGMAX_AGREEMENT}); "
                "the export is not trustworthy — report this with the run"
            )


def _heldout_accuracy(bundle_root: Path, trunk_file: str, task_files: Dict[str, str], heldout) -> Dict[str, Optional[float]]:
    """Accuracy of the exported modules (ONNX Runtime) on the run's held-out images
    (`heldout`: 0-1 images and labels, or None where the data cannot be opened: None each)."""
    if heldout is None:
        return {task: None for task in task_files}
    images, labels = heldout
    images = images.numpy()
    common = ort_session(bundle_root / trunk_file).run(None, {"image": images})[0]
    result = {}
    for task, file in task_files.items():
        logits = ort_session(bundle_root / file).run(None, {"image": images, "common": common})[0]
        result[task] = float((logits.argmax(1) == labels[task].numpy()).mean())
    return result


def _open_run_data(info: dict, progress, examples_given: bool = False):
    """The run's data opened again (kfdeploy.training.pipeline.OpenedData), or None, with a line saying
    why, where it cannot be (datasets passed from Python, a folder moved since training)."""
    missing = "held-out accuracy" if examples_given else "held-out accuracy and examples"
    if info.get("data") == "custom":
        progress(f"{missing}: none (the run trained on datasets passed from Python)")
        return None
    from ..training.pipeline import open_run_data

    try:
        return open_run_data(info)
    except KfError as exc:
        progress(f"{missing}: none ({exc})")
        return None


def _run_heldout(opened, tasks: Sequence[str]):
    """ACCURACY_IMAGES held-out images of the run's data (0-1 pixels at the model's size) with
    the labels of `tasks`, or None where there are none."""
    if opened is None:
        return None
    images, labels = opened.source.heldout(ACCURACY_IMAGES)
    return (images, {t: labels[t] for t in tasks}) if len(images) else None


def _dataset_heldout(dataset, tasks: Sequence[str]):
    """As _run_heldout, from a held-out dataset passed from Python."""
    batch = _batch_from_dataset(dataset, ACCURACY_IMAGES)
    if batch is None:
        raise KfError("heldout_data is empty: pass the held-out images the exported tasks are scored on")
    images, labels = batch
    missing = [t for t in tasks if t not in labels]
    if missing:
        raise KfError(f"heldout_data gives no label for task {missing[0]!r} in every item; "
                      f"its items must be (image, {{task: label}}) with every exported task")
    return images, {t: labels[t] for t in tasks}


def _teacher_parameters(teacher_run: Optional[str]) -> Optional[int]:
    """How big the monolithic network was, for comparison with the composed modules."""
    if not teacher_run or not (Path(teacher_run) / "model.safetensors").is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(Path(teacher_run) / "model.safetensors"), "np") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys() if "running_" not in k and "num_batches" not in k))


def heldout_examples(opened, config: FactorConfig, count: int = EXAMPLE_IMAGES):
    """`count` held-out images of the run's data (`opened`, kfdeploy.training.pipeline.OpenedData) for
    the bundle's examples, with their labels: (images (N, C, H, W) in [0, 1], {task: (N,)
    class indices}); None where there are none. Pass `heldout_data=` or `examples=` to
    export_bundle for datasets passed from Python, which kfdeploy cannot open again."""
    if opened is None:
        return None
    if opened.kind == "sprites":  # every sprite factor labelled, whatever tasks the run has
        from ..training.data import TASK_NAMES, SpritesSource
        from ..training.pipeline import resize_images

        images, labels = SpritesSource(tasks=list(TASK_NAMES)).heldout(count, offset=EXAMPLES_OFFSET)
        return resize_images(images, config.trunk.image_size), labels
    images, labels = opened.source.heldout(count, offset=0 if opened.kind == "folder" else EXAMPLES_OFFSET)
    return (images, labels) if len(images) else None


EXAMPLES_OFFSET = 1000  # past the first held-out sprites, which evaluation and parity use


def _batch_from_dataset(dataset, count: int = EXAMPLE_IMAGES):
    """The first `count` items of a dataset (image (C, H, W) in [0, 1], {task: int label}),
    batched as heldout_examples returns them, with the labels every item has."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        return None
    tasks = set.intersection(*(set(labels) for _, labels in items))
    images = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])
    return images, {t: torch.as_tensor([int(labels[t]) for _, labels in items]) for t in sorted(tasks)}


def _write_examples(staging: Path, examples, shape: tuple, task_labels: Dict[str, List[str]]) -> List[dict]:
    """examples/<n>.png for each image (uint8, rounded from [0, 1]) and its file record,
    with the true labels of the tasks `task_labels` names."""
    from ..extras import require

    Image = require("PIL.Image", None)
    images, labels = examples
    if tuple(images.shape[1:]) != tuple(shape) or shape[0] not in (1, 3):
        raise KfError(f"example images must be {'x'.join(map(str, shape))} (C x H x W, C 1 or 3) like the model's input, "
                      f"got {'x'.join(map(str, images.shape[1:]))}")
    (staging / EXAMPLES_DIR).mkdir(exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    records = []
    for i, image in enumerate(pixels):
        relative = f"{EXAMPLES_DIR}/{i}.png"
        Image.fromarray(image[0] if shape[0] == 1 else image.transpose(1, 2, 0)).save(staging / relative)
        truth = {t: task_labels[t][int(labels[t][i])] for t in task_labels if t in labels}
        records.append({**_file_record(staging, relative), "labels": truth})
    return records


def _file_record(root: Path, relative: str) -> dict:
    path = root / relative
    return {"file": relative, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _exchange(staging: Path, out: Path) -> None:
    """Put `staging` at `out` atomically, so readers see the old bundle or the new one."""
    if not out.exists():
        os.rename(staging, out)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, bytes(staging), at_fdcwd, bytes(out), rename_exchange) == 0:
        shutil.rmtree(staging)  # now holds the old bundle
        return
    # No atomic exchange on this platform: the window without a bundle is two renames long.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old)


def _remove_stale_staging(out: Path, kind: str = "staging") -> None:
    """Work folders (`.OUT.<kind>-<pid>`) of commands that were killed; a live command's pid is still running."""
    for stale in out.parent.glob(f".{out.name}.{kind}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def export_bundle(
    run_dir: Path,
    out: Path,
    tasks: Optional[Sequence[str]] = None,
    profile: Optional[ExportProfile] = None,
    into: bool = False,
    archive: bool = False,
    progress=print,
    examples=None,
    keep_examples: bool = False,
    opened_data=None,
    heldout_data=None,
) -> Path:
    """Export run_dir's factor modules into bundle `out` (or add them to it with `into`).

    Parity is checked and each task's accuracy measured on the run's held-out images, and a
    few of them become the bundle's examples, drawn from the run's data (sprites, colour
    sprites, an image folder). For datasets passed from Python, which kfdeploy cannot open
    again, pass your held-out set as `heldout_data`, a dataset of (image (C, H, W) in [0, 1],
    {task: int label}) items: up to ACCURACY_IMAGES of them are used the same way, the first
    EXAMPLE_IMAGES as examples. `examples`, a dataset alike, names other examples. `keep_examples`
    (with `into`) leaves the bundle's examples as they are. `profile` defaults to the
    bundle's own with `into` (graphs of one opset and batch range compose), else cpu-fp32.
    `opened_data`: the run's data as the caller already opened it (kfdeploy.training.pipeline.
    OpenedData with the exported tasks), so a folder is not decoded twice.
    """
    from ..training.pipeline import parse_tasks

    run_dir, out = Path(run_dir), Path(out)
    model, info = load_factor_run(run_dir)
    normalization = run_normalization(info, model.config, run_dir)
    tasks = parse_tasks(",".join(tasks) if tasks else None, list(model.task_classes), f"the factorized run {run_dir}")
    for task in tasks:
        if not is_task_name(task):
            raise KfError(f"task name {task!r} cannot name a task module; use {TASK_NAME_RULE}")
    fingerprint = weights_digest(model.trunk)
    existing = None
    if into:
        existing = Bundle.open(out)
        bundle_fingerprint = existing.manifest["trunk"]["fingerprint"]
        if bundle_fingerprint != fingerprint:
            raise KfError(
                f"the task modules of {run_dir} were trained with a different trunk (fingerprint "
                f"{fingerprint[:12]}) than the one in {out} ({bundle_fingerprint[:12]}); they cannot be "
                "combined — export them into a new bundle"
            )
        profile = profile or bundle_profile(existing)
        if tuple(existing.normalization()) != normalization:
            raise KfError(f"{run_dir} normalizes its pixels with mean {normalization[0]}, std {normalization[1]}, but the "
                          f"bundle {out} with mean {existing.normalization()[0]}, std {existing.normalization()[1]}; "
                          "export it into a new bundle")
    elif out.exists() and not (out / MANIFEST).is_file():
        raise KfError(f"{out} exists and is not a bundle; choose another --out (an existing bundle is replaced)")
    profile = profile or ExportProfile("cpu-fp32")
    check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if heldout_data is not None:
            opened, heldout = None, _dataset_heldout(heldout_data, tasks)
        else:
            opened = opened_data if opened_data is not None else _open_run_data(info, progress, examples is not None)
            heldout = _run_heldout(opened, tasks)
        samples = examples if examples is not None else heldout_data
        if samples is not None:
            found = _batch_from_dataset(samples)
        else:
            found = None if keep_examples and existing is not None else heldout_examples(opened, model.config)
        manifest = _build(model, info, run_dir, staging, tasks, profile, fingerprint, existing, progress, normalization,
                          found, heldout)
        write_json_atomic(staging / MANIFEST, manifest)
        try:  # what readers will check, before the bundle replaces anything
            read_manifest(staging)
        except KfError as exc:
            raise KfError(f"export made a manifest its own reader refuses ({exc}); nothing was replaced. This is a "
                          "kfdeploy bug: please report it with the command you ran") from None
        _exchange(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if archive:
        write_archive(out, out.with_name(out.name + ".tar.gz"))
    return out


def _printable_or_none(text: Optional[str]) -> Optional[str]:
    return None if text is None else printable(text)


def _build(model, info, run_dir, staging, tasks, profile, fingerprint, existing, progress, normalization, examples,
           heldout) -> dict:
    import onnx
    import onnxruntime

    config: FactorConfig = model.config
    data = info.get("data", "sprites")
    (staging / "tasks").mkdir(parents=True)
    (staging / "weights" / "tasks").mkdir(parents=True)
    size = config.trunk.image_size
    example = torch.zeros(2, config.trunk.in_channels, size, size)
    if existing is not None:
        manifest = dict(existing.manifest)
        manifest["tasks"] = dict(manifest["tasks"])
        manifest["input"] = _input_spec(manifest["input"]["shape"][1], size, normalization, manifest["input"]["batch"])
        manifest["format_version"] = FORMAT_VERSION  # a version 1 bundle's graphs are version 2's with identity
        # Hard links: the trunk and the other tasks stay the very same files.
        for entry in existing.entries():
            (staging / entry["file"]).parent.mkdir(parents=True, exist_ok=True)  # engines/, examples/
            os.link(existing.file(entry["file"]), staging / entry["file"])
        # A task being re-exported must get new files: writing through its link would
        # rewrite the live bundle's file before the swap.
        for task in tasks:
            stale = [f"tasks/{task}.onnx", f"weights/tasks/{task}.safetensors"]
            stale += [v["file"] for v in manifest["tasks"].get(task, {}).get("variants", {}).values()]
            for file in stale:  # a variant that fell back to the fp32 file is listed twice: missing_ok
                (staging / file).unlink(missing_ok=True)
        if examples is not None:  # new examples replace the old: unlink, never write through a link
            for record in manifest.get("examples", []):
                (staging / record["file"]).unlink(missing_ok=True)
        trunk_file = manifest["trunk"]["file"]
    modules = graph_modules(model, normalization)
    if existing is None:
        trunk_file = "trunk.onnx"
        progress(f"exporting trunk -> {trunk_file}")
        _quiet_export(modules["trunk"], (example,), staging / trunk_file, ["image"], ["common"], profile)
        save_tensors_atomic(staging / "weights" / "trunk.safetensors", model.trunk.state_dict())
    task_files = {}
    common = modules["trunk"](example).detach()
    for task in tasks:
        task_files[task] = f"tasks/{task}.onnx"
        progress(f"exporting task {task} -> {task_files[task]}")
        _quiet_export(modules[task], (example, common), staging / task_files[task], ["image", "common"], ["logits"], profile)
        save_tensors_atomic(staging / "weights" / "tasks" / f"{task}.safetensors", model.tasks[task].state_dict())
    for file in [trunk_file, *task_files.values()]:
        check_graph(onnx.load(str(staging / file)), file)
    # The run's own held-out images where it has them; noise where not (datasets from Python).
    images = heldout[0][:PARITY_IMAGES] if heldout is not None else parity_images(config, data, seed=0)
    progress(f"checking parity with PyTorch on {len(images)} {'held-out' if heldout is not None else 'noise'} images")
    task_graphs = {task: staging / file for task, file in task_files.items()}
    parity = module_parity(model, staging / trunk_file, task_graphs, images, normalization)
    _check_parity(parity)
    accuracy = _heldout_accuracy(staging, trunk_file, task_files, heldout)
    if existing is None:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "producer": {
                "kfdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "opset": profile.opset,
            },
            "profile": asdict(profile),
            # Paths as text a reader accepts (no control characters): they only inform
            "source": {"run": printable(str(run_dir.resolve())), "teacher_run": _printable_or_none(info.get("teacher_run")),
                       "data": printable(data), "teacher_parameters": _teacher_parameters(info.get("teacher_run"))},
            "input": _input_spec(config.trunk.in_channels, size, normalization,
                                 {"min": profile.batch_min, "opt": profile.batch_opt, "max": profile.batch_max}),
            "model": config.deployed_dict(),
            "parity_tolerance": {
                "max_abs_err": PARITY_MAX_ABS_ERR, "max_rel_err": PARITY_MAX_REL_ERR,
                "rule": "parity.max_abs_err <= max_abs_err or parity.max_rel_err <= max_rel_err", "argmax_agreement": PARITY_MIN_ARGMAX_AGREEMENT,
            },
            "trunk": {
                **_file_record(staging, trunk_file), "inputs": ["image"],
                "output": {"name": "common", "width": config.feature_dim}, "fingerprint": fingerprint,
                "weights": _file_record(staging, "weights/trunk.safetensors"), "parity": parity["trunk"],
            },
            "tasks": {},
            "engines": [],
        }
    for task in tasks:
        manifest["tasks"][task] = {
            **_file_record(staging, task_files[task]), "inputs": ["image", "common"], "output": "logits",
            "classes": config.task_classes[task], "labels": info["task_labels"][task],
            "trunk_fingerprint": fingerprint, "heldout_accuracy": accuracy[task], "parity": parity[task],
            "weights": _file_record(staging, f"weights/tasks/{task}.safetensors"),
        }
    # Engines were built for the old task set; a rebuilt task needs its engine rebuilt.
    manifest["engines"] = [e for e in manifest.get("engines", []) if e["module"] not in tasks]
    if examples is not None:
        shape = (config.trunk.in_channels, size, size)
        manifest["examples"] = _write_examples(staging, examples, shape, {t: r["labels"] for t, r in manifest["tasks"].items()})
    return manifest


def _input_spec(channels: int, size: int, normalization: Normalization, batch: dict) -> dict:
    """The manifest's `input`: 0-1 float32 pixels in, normalization inside the graphs."""
    mean, std = normalization
    return {
        "name": "image", "shape": ["batch", channels, size, size], "dtype": "float32", "layout": "NCHW",
        "range": [0.0, 1.0], "uint8": "divide by 255", "pixel_types": list(PIXEL_TYPES),
        "normalization": {"mean": list(mean), "std": list(std), "in_graph": True}, "batch": batch,
    }


def torch_modules(bundle: Bundle, new_tasks: Optional[Dict[str, int]] = None) -> FactorNet:
    """The PyTorch factor network (trunk and the bundle's tasks) from the weights it carries;
    with `new_tasks` (name -> classes), its trunk and freshly initialised task modules of
    those instead (kfdeploy add-task).

    It takes normalized pixels, as in training; `graph_modules(model, bundle.normalization())`
    wraps it into what the graphs compute from 0-1 pixels (the torch backend runs those).
    """
    classes = new_tasks if new_tasks is not None else {t: bundle.task(t)["classes"] for t in bundle.tasks}
    weights = {"trunk": bundle.file(bundle.manifest["trunk"]["weights"]["file"])}
    if new_tasks is None:
        weights.update({task: bundle.file(bundle.task(task)["weights"]["file"]) for task in bundle.tasks})
    try:
        config = replace(FactorConfig.from_dict(bundle.manifest["model"]), task_classes=classes)
        with torch.device("meta"):  # shapes without storage: checked against the files first
            skeleton = FactorNet(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # the schema checks the object, not what it configures
        raise KfError(f"{bundle.root / MANIFEST}: model is not a factor network configuration this kfdeploy can "
                      f"build ({type(exc).__name__}: {exc}); re-export the bundle with this kfdeploy") from None
    def part(net: FactorNet, name: str) -> nn.Module:
        return net.trunk if name == "trunk" else net.tasks[name]

    described = {name: "trunk weights" if name == "trunk" else f"task {name} weights" for name in weights}
    for name, path in weights.items():
        check_weights_fit(part(skeleton, name), path, described[name])
    model = FactorNet(config)
    for name, path in weights.items():
        apply_weights(part(model, name), load_weights(path, described[name]), described[name])
    return model.eval()


def verify_bundle(path: Path, seed: Optional[int] = None, progress=print) -> Dict[str, dict]:
    """Checksums, onnx.checker, and ONNX Runtime vs PyTorch on fresh inputs; raises on any mismatch.

    Every graph is read once, through Bundle.graph (checksum of the bytes parsed, no external
    data), and the checker and the sessions get those very bytes, never the path again.
    """
    bundle = Bundle.open(path)
    progress(f"checksums: {sum(1 for _ in bundle.entries())} files match the manifest")
    graphs = {module: bundle.graph(module) for module in bundle.modules()}
    for module, graph in graphs.items():
        check_graph(graph, bundle.modules()[module]["file"])
    progress(f"onnx.checker (full): {len(graphs)} graphs pass")
    if bundle.examples:
        shape = (bundle.channels, *bundle.image_size)
        for i, record in enumerate(bundle.examples):
            image = bundle.example(i)[0]
            got = (1 if image.ndim == 2 else image.shape[2], *image.shape[:2])
            if got != shape:
                raise KfError(f"{record['file']} in bundle {bundle.root} is {'x'.join(map(str, got))} (C x H x W), "
                              f"not the input's {'x'.join(map(str, shape))}; re-export the bundle")
        progress(f"examples: {len(bundle.examples)} images at the input's size")
    model = torch_modules(bundle)
    seed = int.from_bytes(os.urandom(2), "little") if seed is None else seed
    images = parity_images(model.config, bundle.manifest.get("source", {}).get("data", "sprites"), seed=seed)
    serialized = {module: graph.SerializeToString() for module, graph in graphs.items()}
    parity = module_parity(model, serialized.pop("trunk"), serialized, images, bundle.normalization())
    _check_parity(parity)
    for module, p in parity.items():
        agreement = f", argmax agreement {p['argmax_agreement']:.4f}" if "argmax_agreement" in p else ""
        progress(f"parity {module:<12} max abs {p['max_abs_err']:.2e}, rel {p['max_rel_err']:.2e}{agreement}")
    return parity


def build_engines(path: Path, precision: str = "fp16", builders: Sequence[str] = ("tensorrt",), progress=print) -> List[dict]:
    """Build a TensorRT engine per module on this machine's GPU and record it in the manifest.

    Engine files are written first and the manifest last (atomically), so an interrupted
    build leaves unlisted files, never a manifest naming a missing engine.
    """
    from . import tensorrt as trt_backend

    bundle = Bundle.open(path)
    for builder in builders:
        (trt_backend.require_tensorrt if builder == "tensorrt" else trt_backend.require_torch_tensorrt)()
    signature = trt_backend.device_signature()
    slug = trt_backend.signature_slug(signature)
    (bundle.root / "engines").mkdir(exist_ok=True)
    graphs = graph_modules(torch_modules(bundle), bundle.normalization()) if "torch-tensorrt" in builders else None
    modules = {"trunk": bundle.manifest["trunk"]["file"], **{t: bundle.task(t)["file"] for t in bundle.tasks}}
    records = []
    for builder in builders:
        for module, onnx_file in modules.items():
            shapes = bundle.input_shapes(module)
            suffix = "plan" if builder == "tensorrt" else "ep"
            relative = f"engines/{module}.{slug}.{precision}.{suffix}"
            progress(f"{builder}: building {relative}")
            if builder == "tensorrt":
                trt_backend.build_engine(
                    bundle.file(onnx_file), bundle.root / relative, shapes, precision,
                    timing_cache_path=bundle.root / "engines" / f"timing.{slug}.cache",
                )
            else:
                trt_backend.build_torch_tensorrt(graphs[module], list(shapes.values()), precision, bundle.root / relative)
            records.append({
                "module": module, **_file_record(bundle.root, relative), "builder": builder,
                "precision": precision, "device": signature, "batch": bundle.manifest["input"]["batch"],
            })
    replaced = {(r["module"], r["builder"], r["precision"], slug) for r in records}
    manifest = dict(bundle.manifest)
    manifest["engines"] = [
        e for e in manifest.get("engines", [])
        if (e["module"], e["builder"], e["precision"], trt_backend.signature_slug(e["device"])) not in replaced
    ] + records
    write_json_atomic(bundle.root / MANIFEST, manifest)
    return records
