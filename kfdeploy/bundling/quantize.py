"""Reduced-precision variants of a bundle's modules: `kfdeploy quantize BUNDLE --int8|--fp16`.

Each module (the trunk, each task) gets a graph of its own at the new precision, beside its
fp32 graph; the manifest records it as a *variant* of the module (file record, how it was
made, and per task the held-out accuracy and argmax agreement with fp32 of the composition
at that precision). `kfdeploy.load(bundle, tasks, precision="int8")` composes the variants
exactly as it composes fp32 graphs, so a variant keeps the module's interface: inputs
`image` (and `common`) and output `common`/`logits`, same names, float32.

- INT8: ONNX Runtime static quantization, QDQ format (what TensorRT's explicit
  quantization reads too), per-channel s8 weights and u8 activations (s8 activations were
  slower than fp32 on the VNNI CPU measured), calibrated on images of the
  run's training stream or a folder (seeded). Tasks are calibrated on the fp32 trunk's
  `common`: what the task sees at fp32, and independent of the trunk's own rounding.
- FP16: onnxruntime.transformers.float16 with keep_io_types (a Cast at each input and
  output), for GPU providers; a CPU runs fp16 graphs slowly or not at all.

Quantization never loses a task silently: a task whose held-out accuracy drops by more than
`max_drop` (or, without labels, whose argmax disagrees with fp32 more often: the bound on
what it can lose) fails the command with the numbers, unless `allow_mixed`, which keeps
that task's fp32 graph as its variant (recorded as `fallback: "fp32"`).

The bundle changes the way `export --into` changes it: a staging copy gets the new files
and manifest, is checked by the reader, and is swapped into place in one rename.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import KfError
from ..sessions import quiet_options
from .bundle import MANIFEST, VARIANT_PRECISIONS, Bundle, operator_problem, read_manifest
from .fuse import Composer

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_IMAGES = 512
DEFAULT_MAX_DROP = 0.01  # one point of held-out accuracy
EVAL_IMAGES = 2048  # as export's heldout_accuracy
_BATCH = 64
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def variant_file(module: str, precision: str) -> str:
    return f"variants/{precision}/trunk.onnx" if module == "trunk" else f"variants/{precision}/tasks/{module}.onnx"


# -- images --------------------------------------------------------------------------------

def _run_data(bundle: Bundle, seed: int):
    """The bundle's run data, opened again: (kind, source with batch()/heldout()), or None."""
    source = bundle.manifest.get("source", {})
    if source.get("data") == "sprites":
        from ..training.data import NEW_TASKS, TASK_NAMES, SpritesSource

        return SpritesSource(seed=seed, tasks=[t for t in bundle.tasks if t in TASK_NAMES or t in NEW_TASKS])
    run = source.get("run")
    if not run or not Path(run, "run.json").is_file():
        return None
    from ..training.pipeline import open_run_data
    from ..training.runs import read_run

    try:
        return open_run_data(read_run(Path(run), "factorized", ""), seed=seed).source
    except KfError:
        return None


def _as_input(images, bundle: Bundle) -> np.ndarray:
    from ..training.pipeline import resize_images

    return np.ascontiguousarray(resize_images(images, bundle.image_size[0]).numpy(), dtype=np.float32)


def calibration_images(bundle: Bundle, count: int, seed: int, folder: Optional[Path] = None) -> tuple[np.ndarray, str]:
    """`count` images for calibration, reproducible from `seed`, and where they came from.

    From `folder` (image files, drawn in a seeded order and fitted to the bundle's channels
    and size), else from the run's training stream: never the held-out images that the
    variants are judged on."""
    if folder is not None:
        from ..images import fit_image, read_image

        folder = Path(folder)
        if not folder.is_dir():
            raise KfError(f"--calibration {folder} is not a folder of images")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise KfError(f"--calibration {folder} holds no image files ({', '.join(_IMAGE_SUFFIXES)})")
        chosen = [files[i] for i in np.random.default_rng(seed).permutation(len(files))[:count]]
        images = np.stack([fit_image(read_image(p), bundle.channels, bundle.image_size)[0] for p in chosen])
        return images.astype(np.float32) / 255.0, f"folder {folder.resolve()} ({len(chosen)} of {len(files)} files, seed {seed})"
    source = _run_data(bundle, seed)
    if source is None:
        raise KfError(f"cannot open the data of the run bundle {bundle.root} was exported from "
                      f"({bundle.manifest.get('source', {}).get('run')}); name calibration images with --calibration FOLDER")
    batches, step = [], 0
    while sum(len(b) for b in batches) < count:
        batches.append(_as_input(source.batch(step, min(_BATCH * 4, count), 0)[0], bundle))
        step += 1
    data = bundle.manifest.get("source", {}).get("data", "the run's data")
    return np.concatenate(batches)[:count], f"{data} training stream ({count} images, seed {seed})"


def heldout_images(bundle: Bundle, tasks: Sequence[str], count: int = EVAL_IMAGES):
    """Held-out images and per-task labels of the run's data, or (None, {}) when it cannot be opened."""
    source = _run_data(bundle, 0)
    if source is None:
        return None, {}
    images, labels = source.heldout(count)
    return _as_input(images, bundle), {t: labels[t].numpy() for t in tasks if t in labels}


# -- making variants -------------------------------------------------------------------------

class _Feeds:
    """An onnxruntime.quantization CalibrationDataReader over fixed batches of feeds."""

    def __init__(self, feeds: List[Dict[str, np.ndarray]]):
        self._feeds = feeds
        self._next = iter(feeds)

    def get_next(self):
        return next(self._next, None)

    def rewind(self):
        self._next = iter(self._feeds)


def _int8(model, feeds: List[Dict[str, np.ndarray]], method: str, work: Path):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared, quantized = work / "model.onnx", work / "prepared.onnx", work / "int8.onnx"
    onnx.save_model(model, source)
    # Shape inference and constant folding first, as ONNX Runtime recommends: quantization
    # needs each tensor's shape, and folded graphs have fewer activations to calibrate.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    quantize_static(str(prepared), str(quantized), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate)
    return onnx.load_model(quantized)


def _fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: a Cast at each input and output, so the interface stays float32.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _sort_nodes(converted.graph)  # the converter appends the input Casts last; ONNX wants them first
    return converted


def _sort_nodes(graph) -> None:
    """Put a graph's nodes in an order where each node follows the producers of its inputs."""
    nodes = list(graph.node)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        left = [n for n in pending if not all(name in ready for name in n.input)]
        placed = [n for n in pending if all(name in ready for name in n.input)]
        if not placed:
            raise KfError("the fp16 graph has a cycle or an input no node produces; report this")
        for node in placed:
            ready.update(node.output)
        ordered += placed
        pending = left
    del graph.node[:]
    graph.node.extend(ordered)


def _check_interface(model, reference, module: str) -> None:
    """A variant must compose like the module: same inputs and outputs, same element types,
    the default operator domain only (the quantizer imports every domain it knows; the
    unused imports go, so the composition's header, taken from the trunk, fits every module)."""
    import onnx

    kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model, full_check=True)

    def io(m):
        return ([(v.name, v.type.tensor_type.elem_type) for v in m.graph.input],
                [(v.name, v.type.tensor_type.elem_type) for v in m.graph.output])

    if io(model) != io(reference):
        raise KfError(f"the {module} variant changed the module's inputs or outputs ({io(model)} against "
                      f"{io(reference)}); it would not compose — report this")
    problem = operator_problem(model)  # the default domain's operators our exports emit, nothing else
    if problem:
        raise KfError(f"the {module} variant {problem}, so readers would refuse it (OPERATORS in "
                      "kfdeploy/bundling/bundle.py) — report this")


def _run_composed(composer: Composer, tasks: Sequence[str], images: np.ndarray, threads: int = 0) -> Dict[str, np.ndarray]:
    """Logits per task of the composition of `tasks`, batch by batch."""
    import onnx
    import onnxruntime as ort

    model = composer.compose(list(tasks))
    onnx.checker.check_model(onnx.load_model_from_string(model), full_check=True)
    options = quiet_options()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    out = [session.run(list(tasks), {"image": images[i:i + _BATCH]}) for i in range(0, len(images), _BATCH)]
    return {t: np.concatenate([o[k] for o in out]) for k, t in enumerate(tasks)}


def quantize_bundle(path: Path | str, precision: str = "int8", tasks: Optional[Sequence[str]] = None,
                    calibration: Optional[Path] = None, images: int = DEFAULT_IMAGES, method: str = "minmax",
                    seed: int = 0, max_drop: float = DEFAULT_MAX_DROP, allow_mixed: bool = False,
                    progress: Callable[[str], None] = print) -> Dict[str, dict]:
    """Make `precision` variants of the trunk and `tasks` (default: all) of the bundle folder at
    `path` and record them in its manifest; returns the variant records by module.

    With `tasks`, the trunk's existing variant is kept when there is one (a task added to the
    bundle later gets its variant without touching the others); without, every module is made
    again. Raises KfError, changing nothing, when a task loses more than `max_drop` of
    held-out accuracy and `allow_mixed` is false.
    """
    import onnxruntime

    path = Path(path)
    if precision not in VARIANT_PRECISIONS:
        raise KfError(f"unknown precision {precision!r}; choose one of {', '.join(VARIANT_PRECISIONS)}")
    if method not in METHODS:
        raise KfError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if images < 1:
        raise KfError(f"--images must be at least 1, got {images}")
    if path.is_file():
        raise KfError(f"{path} is an archive; quantize works on a bundle folder (export it without --archive, "
                      "or extract it), then archive it again")
    bundle = Bundle.open(path)
    selected = list(tasks) if tasks else bundle.tasks
    for task in selected:
        bundle.task(task)
    trunk_variant = bundle.manifest["trunk"].get("variants", {}).get(precision)
    remake_trunk = not tasks or trunk_variant is None or trunk_variant.get("fallback") is not None

    graphs = {m: bundle.graph(m) for m in ["trunk", *bundle.tasks]}
    variants: Dict[str, object] = {}
    how: dict = {}
    if precision == "int8":
        calib, origin = calibration_images(bundle, images, seed, calibration)
        how = {"tool": f"onnxruntime.quantization {onnxruntime.__version__}", "format": "QDQ", "activations": "uint8",
               "weights": "int8 per channel", "calibration": method, "images": len(calib), "seed": seed, "data": origin}
        batches = [calib[i:i + _BATCH] for i in range(0, len(calib), _BATCH)]
        with tempfile.TemporaryDirectory(prefix="kfdeploy-quantize-") as work:
            if remake_trunk:
                progress(f"int8: calibrating the trunk on {len(calib)} images ({method}, {origin})")
                variants["trunk"] = _int8(graphs["trunk"], [{"image": b} for b in batches], method, Path(work))
            import onnxruntime as ort

            trunk32 = ort.InferenceSession(graphs["trunk"].SerializeToString(), providers=["CPUExecutionProvider"])
            feeds = [{"image": b, "common": trunk32.run(None, {"image": b})[0]} for b in batches]
            for task in selected:
                progress(f"int8: calibrating task {task}")
                variants[task] = _int8(graphs[task], feeds, method, Path(work))
    else:
        how = {"tool": f"onnxruntime.transformers.float16 {onnxruntime.__version__}", "keep_io_types": True}
        for module in (["trunk"] if remake_trunk else []) + selected:
            progress(f"fp16: converting {module}")
            variants[module] = _fp16(graphs[module])
    for module, model in variants.items():
        _check_interface(model, graphs[module], module)
    trunk = variants["trunk"] if remake_trunk else bundle.graph("trunk", precision)

    # Judge the variants as they will run: composed, trunk and tasks at this precision.
    heldout, labels = heldout_images(bundle, selected)
    judged_on = "held-out images"
    if heldout is None:
        heldout, judged_on = (calib if precision == "int8" else None), "calibration images (no held-out data)"
        if heldout is None:
            raise KfError("cannot open the run's held-out data to judge the fp16 variants")
    fp32 = _run_composed(Composer(graphs.__getitem__), selected, heldout)
    mixed: set = set()

    def judge() -> Dict[str, dict]:
        graph_of = {**graphs, "trunk": trunk, **{m: g for m, g in variants.items() if m not in mixed}}
        low = _run_composed(Composer(graph_of.__getitem__), selected, heldout)
        result = {}
        for task in selected:
            agreement = float((low[task].argmax(1) == fp32[task].argmax(1)).mean())
            accuracy = reference = None
            if task in labels:
                accuracy = float((low[task].argmax(1) == labels[task]).mean())
                reference = float((fp32[task].argmax(1) == labels[task]).mean())
            # Without labels, disagreement bounds what accuracy can be lost.
            drop = (reference - accuracy) if accuracy is not None else 1.0 - agreement
            result[task] = {"heldout_accuracy": accuracy, "fp32_heldout_accuracy": reference, "agreement": agreement,
                            "drop": drop}
        return result

    numbers = judge()
    for task, n in numbers.items():
        accuracy = "n/a" if n["heldout_accuracy"] is None else f"{n['heldout_accuracy']:.4f} (fp32 {n['fp32_heldout_accuracy']:.4f})"
        progress(f"{precision}: {task:<12} accuracy {accuracy}, agreement with fp32 {n['agreement']:.4f} on {len(heldout)} {judged_on}")
    lost = {t: n for t, n in numbers.items() if n["drop"] > max_drop}
    if lost and not allow_mixed:
        detail = "; ".join(f"{t}: {n['fp32_heldout_accuracy'] if n['fp32_heldout_accuracy'] is not None else 'n/a'} -> "
                           f"{n['heldout_accuracy'] if n['heldout_accuracy'] is not None else 'n/a'}, agreement {n['agreement']:.4f}"
                           for t, n in lost.items())
        raise KfError(f"{precision} loses more than {max_drop * 100:g} point(s) of held-out accuracy on {', '.join(lost)} "
                      f"({detail}); the bundle is unchanged. Try --method entropy or percentile, more --images, or "
                      "--allow-mixed to keep those tasks at fp32")
    if lost:
        mixed = set(lost)
        progress(f"{precision}: keeping {', '.join(sorted(mixed))} at fp32 (--allow-mixed)")
        numbers = judge()

    return _write(bundle, precision, variants, mixed, selected, how, numbers, len(heldout))


def _write(bundle: Bundle, precision: str, variants: Dict[str, object], mixed: set, selected: List[str], how: dict,
           numbers: Dict[str, dict], count: int) -> Dict[str, dict]:
    """Add the variants to a staging copy of the bundle, check it as a reader would, swap it in."""
    from ..atomic import atomic_write
    from .export import _exchange, _file_record, _remove_stale_staging
    from ..training.runs import write_json_atomic

    out = bundle.root
    _remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    records: Dict[str, dict] = {}
    try:
        shutil.copytree(out, staging, symlinks=True)
        manifest = read_manifest(staging)
        for module, model in variants.items():
            record = manifest["trunk"] if module == "trunk" else manifest["tasks"][module]
            if module in mixed:
                (staging / variant_file(module, precision)).unlink(missing_ok=True)  # an earlier run's, now unlisted
                variant = {"file": record["file"], "sha256": record["sha256"], "bytes": record["bytes"],
                           "precision": precision, "fallback": "fp32"}
            else:
                relative = variant_file(module, precision)
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(staging / relative) as tmp:
                    tmp.write_bytes(model.SerializeToString())
                variant = {**_file_record(staging, relative), "precision": precision}
            variant["method"] = how
            if module != "trunk":
                n = numbers[module]
                variant.update(heldout_accuracy=n["heldout_accuracy"], fp32_heldout_accuracy=n["fp32_heldout_accuracy"],
                               agreement=n["agreement"], images=count)
            record.setdefault("variants", {})[precision] = variant
            records[module] = variant
        write_json_atomic(staging / MANIFEST, manifest)
        Bundle.open(staging)  # schema and every checksum, as any reader will check them
        _exchange(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return records

