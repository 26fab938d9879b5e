"""The runtime: compose a bundle's shared trunk with the task modules an app selects.

    model = kfdeploy.load("bundles/sprites", tasks=["shape", "scale"])
    scores = model(images)          # {"shape": (N, 3) probabilities, "scale": (N, 6)}
    model.add_task("pos_x")         # the trunk stays loaded
    model.remove_task("scale")

One call runs the trunk once and feeds its output, with the image, to every selected
task. Tasks can be added and removed while other threads are calling the model, including
a task added to the bundle's folder since it was loaded (`kfdeploy add-task`): the folder
is read again, and kept if its trunk and input are the ones running. This
module imports neither torch nor anything that does (unless backend="torch"), so a
device with only numpy and onnxruntime can run it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .bundling.bundle import Bundle, read_manifest
from .bundling.fuse import Composer, probs_output
from .errors import KfError
from .extras import require
from .names import module_title
from .sessions import ort_message, quiet_options, run_failure, run_failures

BACKENDS = ("onnxruntime", "tensorrt", "torch")
_PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def physical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cuda_driver():
    """The CUDA driver library, initialised, or None where no driver answers (no torch, no toolkit)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        return cuda if cuda.cuInit(0) == 0 else None
    return None


def _gpu_visible() -> bool:
    """Whether a CUDA device is there, asked of the driver."""
    import ctypes

    cuda, count = _cuda_driver(), ctypes.c_int(0)
    return cuda is not None and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def gpu_name() -> str:
    """The first CUDA device's name and compute capability ("NVIDIA H100 80GB HBM3 sm90"), from the driver."""
    import ctypes

    cuda = _cuda_driver()
    device, major, minor, name = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0), ctypes.create_string_buffer(256)
    if cuda is None or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0 or cuda.cuDeviceGetName(name, 256, device) != 0:
        return "no-gpu"
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
    return f"{name.value.decode(errors='replace')} sm{major.value}{minor.value}"


def choose_providers(requested: Optional[Sequence[str]] = None) -> tuple[List[str], str]:
    """ONNX Runtime providers to use, and a line saying which and why."""
    ort = require("onnxruntime", "cpu")

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise KfError(f"ONNX Runtime provider(s) {', '.join(missing)} are not available here; available: {', '.join(available)}")
        return list(requested), f"onnxruntime: using {', '.join(requested)} (as requested)"
    gpu_providers = [p for p in _PROVIDER_PREFERENCE[:2] if p in available]
    if gpu_providers and _gpu_visible():
        chosen = gpu_providers + ["CPUExecutionProvider"]
        return chosen, f"onnxruntime: using {', '.join(chosen)} (a CUDA GPU is visible)"
    if gpu_providers:
        # onnxruntime-gpu without a GPU would log an error per session, then fall back anyway.
        return ["CPUExecutionProvider"], f"onnxruntime: using CPUExecutionProvider ({', '.join(gpu_providers)} installed, but no CUDA GPU is visible)"
    return ["CPUExecutionProvider"], "onnxruntime: using CPUExecutionProvider (no CUDA or TensorRT provider is installed)"


def engines_for_this_device(manifest: dict) -> tuple[Optional[Dict[str, dict]], str]:
    """The bundle's TensorRT engines built for this GPU, by module; or None and why not."""
    try:
        from .bundling import tensorrt as trt_backend

        trt_backend.require_tensorrt()
        slug = trt_backend.signature_slug(trt_backend.device_signature())
    except KfError as exc:
        return None, f"tensorrt backend unavailable ({exc})"
    mine = {e["module"]: e for e in manifest.get("engines", [])
            if e["builder"] == "tensorrt" and trt_backend.signature_slug(e["device"]) == slug}
    if "trunk" not in mine:
        return None, f"the bundle has no TensorRT engine for this device ({slug}); build them here with `kfdeploy build-engines`"
    return mine, ""


def io_device_for(providers: Sequence[str]) -> Optional[str]:
    """Where a call's inputs and outputs are bound: "cuda" when the first provider computes
    on an NVIDIA GPU; None keeps plain numpy runs (CPU)."""
    return "cuda" if providers[0] in _PROVIDER_PREFERENCE[:2] else None


# -- sessions -------------------------------------------------------------------------
# Set once this process turns out to run ONNX Runtime's global thread pool (the app called
# set_global_thread_pool_sizes): from then on sessions with pools of their own are refused.
_global_pool: List[bool] = []


def ort_session_for(model: bytes, providers: Sequence, threads: int, profile_prefix: Optional[str] = None):
    """An ONNX Runtime session over a serialized graph, configured the one way kfdeploy runs graphs."""
    import onnxruntime as ort

    options = quiet_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps the peak of every batch size a session has served (trunk + 5 tasks
    # grew to ~140 MB after batches of 1 and 64, against ~50 MB without it); batch 64 was
    # no slower without it.
    options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    # What ONNX Runtime raises for a graph it cannot run (an operator from a domain it does
    # not know, a malformed graph): the bundle's graphs are untrusted, so a one-line error
    refused = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument, ort_errors.InvalidProtobuf,
               ort_errors.NotImplemented)
    try:
        if not _global_pool:
            try:
                return ort.InferenceSession(model, options, providers=list(providers))
            except RuntimeError as exc:
                if "global thread pool" not in str(exc):
                    raise
                _global_pool.append(True)
        # The app made ONNX Runtime's global pool itself, so pools of our own are refused: join it.
        options.use_per_session_threads = False
        return ort.InferenceSession(model, options, providers=list(providers))
    except refused as exc:
        raise KfError(f"ONNX Runtime {ort.__version__} cannot run this bundle's graphs ({ort_message(exc)}); "
                      "re-export the bundle with this kfdeploy, or install the ONNX Runtime it was made for") from None


# On the CPU a batch runs in parts whose largest tensor stays within this. Without a memory
# arena (see ort_session_for) every tensor is malloc'd per run, and past a largest tensor of
# 6-8 MB glibc handed the run's memory back after each call and faulted it in again on the
# next: the paper configuration's five merged task modules at 32x32 (0.25 MB per image in
# their largest tensor) faulted in 10,000 pages per call at batch 64 and ran 1.5-2x slower
# than one by one; at 64x64 (1 MB per image) from parts of 8 images on. In parts of 5 MB
# (21 images at 32x32, 5 at 64x64) there were no faults, merged or not, on the AVX-512
# EPYC machine; on the first AVX2 VM parts of 16 MB had sufficed.
RUN_BYTES = 5 << 20

# On the CPU a call runs its merged task modules merged while their largest tensor stays
# within this, and one by one past it (see Assembly): merged, five MobileNetV2 x0.5 tasks
# ran 1.44x as fast as one by one at batch 1 and 0.84x at batch 64 on the AVX-512 EPYC
# machine, even at 16 images at 32x32 (4 MB) and between 4 and 8 at 64x64 (4-8 MB). On the
# AVX2 machines merged was about even with one by one at batch 64, so little is lost there.
MERGED_CALL_BYTES = 4 << 20


class Composition:
    """One ONNX Runtime session computing the trunk once and a set of tasks from it.

    With `io_device` ("cuda"), a call goes through IOBinding: the image is uploaded once
    and only the requested outputs come back. Untested on a GPU here (none is lent to this
    project's CPU machines); the tests run the same bound path with io_device="cpu".
    Otherwise a batch of more than `rows` images runs in parts of at most `rows`.

    A composition with merged task modules answers calls of more than `merged_rows` images
    with `one_by_one`, its twin composed with every task module on its own (Assembly
    builds it on the first such call).
    """

    def __init__(self, tasks: FrozenSet[str], model: bytes, session, io_device: Optional[str], rows: int = sys.maxsize,
                 merged_rows: int = sys.maxsize):
        self.tasks = tasks
        self.model = model  # serialized, for profiling sessions and the TensorRT EP
        self.session = session
        self.io_device = io_device
        self.rows = rows
        self.merged_rows = merged_rows
        self.one_by_one: Optional["Composition"] = None
        self._output_names: Dict[tuple, List[str]] = {}  # per (tasks, logits): a batch-1 call is ~0.2 ms
        self._failures = run_failures()

    def run(self, x: np.ndarray, tasks: Tuple[str, ...], logits: bool) -> Dict[str, np.ndarray]:
        names = self._output_names.get((tasks, logits))
        if names is None:
            names = [task if logits else probs_output(task) for task in tasks]
            if len(self._output_names) < 64:  # orders of subsets are many; the common calls come first
                self._output_names[tasks, logits] = names
        try:
            if self.io_device is None and len(x) > self.rows:
                runs = -(-len(x) // self.rows)
                size = -(-len(x) // runs)  # parts alike: 64 images in parts of 13 rows, not 4 of 14 and one of 8
                parts = [self.session.run(names, {"image": x[start:start + size]}) for start in range(0, len(x), size)]
                values = [np.concatenate(outputs) for outputs in zip(*parts)]
            elif self.io_device is None:
                values = self.session.run(names, {"image": x})
            else:
                binding = self.session.io_binding()  # one per call: bindings are not shared between threads
                binding.bind_cpu_input("image", x)
                for name in names:
                    binding.bind_output(name, "cpu")
                self.session.run_with_iobinding(binding)
                values = binding.copy_outputs_to_cpu()
        except self._failures as exc:  # the graphs are the bundle's, untrusted: one line, naming the module
            raise run_failure(exc, ["trunk", *sorted(self.tasks)]) from None
        return dict(zip(tasks, values))


class TorchModule:
    """The PyTorch reference for one module, from the weights the bundle carries."""

    def __init__(self, forward):
        import torch

        self._torch = torch
        self._forward = forward

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            return self._forward(*(self._torch.from_numpy(v) for v in feeds.values())).numpy()


class EngineModule:
    """A TensorRT engine behind the same `run(feeds) -> first output` as TorchModule."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.engine.run(dict(feeds))[self.engine.outputs[0]]


class ModuleChain:
    """Module by module (torch, native TensorRT engines): the trunk once, then each task.

    No CPU thread pools hand work to each other here: PyTorch runs its own ops, and
    TensorRT engines queue on one CUDA stream, so a chain costs what its modules cost.
    """

    def __init__(self, trunk, tasks: Mapping[str, object]):
        self.trunk = trunk
        self.tasks = dict(tasks)

    def run(self, x: np.ndarray, tasks: Sequence[str], logits: bool, timings: "Timings") -> Dict[str, np.ndarray]:
        """Also records each module's time in `timings`."""
        started = time.perf_counter()
        common = self.trunk.run({"image": x})
        timings.trunk_ms = (time.perf_counter() - started) * 1e3
        out = {}
        for task in tasks:
            started = time.perf_counter()
            out[task] = self.tasks[task].run({"image": x, "common": common})
            timings.tasks_ms[task] = (time.perf_counter() - started) * 1e3
        return out if logits else {task: _softmax(scores) for task, scores in out.items()}


@dataclass
class Timings:
    """Where a call's time went, in milliseconds: its wall time, and per module where known.

    A composed ONNX Runtime call runs as one graph, so its split comes from the profiler
    (`Assembly.profile`); module-by-module backends measure it on every call.
    """

    total_ms: float = 0.0
    trunk_ms: Optional[float] = None
    # Per task; from the profiler, tasks merged into one subgraph are one entry ("shape+scale")
    tasks_ms: Dict[str, float] = field(default_factory=dict)
    # Per operator type (Conv, QLinearConv, Gemm, ...), from the profiler only: where
    # precision and architecture choices show
    ops_ms: Dict[str, float] = field(default_factory=dict)

    def split(self) -> str:
        parts = ([f"trunk {self.trunk_ms:.2f} ms"] if self.trunk_ms is not None else []) + \
            [f"{task} {ms:.2f} ms" for task, ms in self.tasks_ms.items()]
        return f"{self.total_ms:.2f} ms" + (f" ({', '.join(parts)})" if parts else "")


def median_call(totals: Sequence[float]) -> int:
    """The index of the call whose total time is the median (the upper one of an even count).
    Its split is reported whole: medians of each module taken separately can add up to more
    than the median total."""
    return sorted(range(len(totals)), key=totals.__getitem__)[len(totals) // 2]


def profile_timings(trace: List[dict], modules: Sequence[str], warmup: int) -> Timings:
    """Per-module kernel time of the median run (`median_call`) from an ONNX Runtime profile
    (its JSON trace), and the median time per operator type over the runs.

    `modules`: "trunk" and the tasks. Node names carry their module as a prefix (`trunk/...`,
    `<task>/...`), as the composition names them; tasks merged into one grouped subgraph
    share theirs (`shape+scale/...`: one kernel computes them all), so such a group is one
    entry of `tasks_ms`, named so. The first `warmup` runs are left out.
    """
    tasks = [m for m in modules if m != "trunk"]
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    per_run = [{"trunk": 0.0} for _ in runs]
    per_op = [{} for _ in runs]
    units = set()
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        # ONNX Runtime names a node it fused from ours "fused <name>"; layout conversions
        # it inserts (ReorderOutput...) belong to no module and stay in the total only.
        module = event["name"].removeprefix("fused ").split("/", 1)[0]
        ours = module == "trunk" or all(task in tasks for task in module.split("+"))
        op = event.get("args", {}).get("op_name", "?")
        for index, (start, end) in enumerate(runs):
            if start <= event["ts"] <= end:
                if ours:
                    units.add(module)
                    per_run[index][module] = per_run[index].get(module, 0.0) + event["dur"] / 1e3
                per_op[index][op] = per_op[index].get(op, 0.0) + event["dur"] / 1e3
                break
    median = lambda values: float(np.median(values)) if len(values) else 0.0  # noqa: E731
    ops = {op for run in per_op for op in run}
    ops_ms = {op: median([run.get(op, 0.0) for run in per_op]) for op in ops}
    groups = sorted(units - {"trunk"}, key=lambda unit: tasks.index(unit.split("+")[0]))
    totals = [(end - start) / 1e3 for start, end in runs]
    chosen, total_ms = {"trunk": 0.0}, 0.0
    if runs:
        middle = median_call(totals)
        chosen, total_ms = per_run[middle], totals[middle]
    return Timings(
        total_ms=total_ms,
        trunk_ms=chosen["trunk"],
        tasks_ms={unit: chosen.get(unit, 0.0) for unit in groups},
        ops_ms=dict(sorted(ops_ms.items(), key=lambda item: -item[1])),
    )


class TaskSelection:
    """A selected set of tasks and what runs them, swapped as one pair.

    `add_task`/`remove_task` build the new runner (`_runner_for`) in the calling thread,
    one mutation at a time, while calls keep reading the current pair; one assignment swaps
    it in. Subclasses check a task (`check_task`) and say how messages name the set.
    """

    _set_name = "selected"

    def _init_selection(self) -> None:
        self._mutation = threading.Lock()  # one add/remove at a time; calls never take it
        self._state: Tuple[Tuple[str, ...], object] = ((), None)  # (tasks, what runs them), swapped whole
        self.last_switch_ms: Optional[float] = None

    def add_task(self, name: str) -> None:
        """Select one more task; calls in other threads go on meanwhile."""
        self.check_task(name)
        with self._mutation:
            selected, _ = self._state
            if name not in selected:
                self._switch(selected + (name,))

    def remove_task(self, name: str) -> None:
        with self._mutation:
            selected, _ = self._state
            if name not in selected:
                raise KfError(f"task {name!r} is not {self._set_name}; {self._set_name}: {', '.join(selected) or 'none'}")
            self._switch(tuple(t for t in selected if t != name))

    def _switch(self, tasks: Tuple[str, ...]) -> None:
        started = time.perf_counter()
        runner = self._runner_for(tasks) if tasks else None
        self._state = (tasks, runner)  # one assignment: a call sees the old pair or the new one
        self.last_switch_ms = (time.perf_counter() - started) * 1e3

    @property
    def tasks(self) -> List[str]:
        return list(self._state[0])


def _top_bits(low: float, high: float) -> Optional[int]:
    """Where 0 lies in [low, high]: the bits, read as uint32, of the largest float32 that
    compares at most `high` as `Assembly.prepare` compares it (numpy's rules: `high` rounds to
    float32); else None.

    Non-negative float32s order like their bits read as uint32, and every other float32 lies
    above the largest finite one there (the sign bit is the top bit; inf and NaN have an all-ones
    exponent). So a float32 array whose bits' max is at most this number holds only values in
    [0, high], which the min/max check would accept too: one integer pass instead of two float ones.
    """
    if not low <= 0.0 <= high:
        return None
    top = np.float32(high)
    if not top <= high:  # numpy compared in float64 (before NEP 50): take the float32 below
        top = np.nextafter(top, np.float32(-np.inf))
    return int(top.view(np.uint32))


def _reader(bundle: Bundle, precision: str):
    """A Composer's graph_of: each module's graph at `precision` from `bundle`."""
    return lambda module: bundle.graph(module, precision)


def _input_contract(bundle: Bundle) -> dict:
    """The manifest's input spec as readers take it (version 1's implied normalization and pixel types filled in)."""
    mean, std = bundle.normalization()
    return {**bundle.manifest["input"], "normalization": {"mean": mean, "std": std}, "pixel_types": bundle.pixel_types()}


def replacement_problem(old: Bundle, new: Bundle, precision: str = "fp32") -> Optional[str]:
    """Why `new` (a bundle's folder read again) cannot stand in for `old` in a running
    assembly, or None when it can: the same trunk (fingerprint and checksums), the same
    input spec, and every task `old` has still there with the same files; tasks may be added."""
    trunk, now = old.manifest["trunk"], new.manifest["trunk"]
    if now["fingerprint"] != trunk["fingerprint"]:
        return (f"its trunk is another one (fingerprint {now['fingerprint'][:12]}, this assembly runs "
                f"{trunk['fingerprint'][:12]})")
    for module in ["trunk", *old.tasks]:
        if module != "trunk" and module not in new.manifest["tasks"]:
            return f"task {module!r} is gone from it"
        before, after = old.modules()[module], new.modules()[module]
        changed = before["sha256"] != after["sha256"] or (
            precision in before.get("variants", {})
            and before["variants"][precision]["sha256"] != after.get("variants", {}).get(precision, {}).get("sha256"))
        if changed:
            which = "its trunk" if module == "trunk" else f"task {module!r}"
            return f"{which} has other files (checksums differ)"
    before, after = _input_contract(old), _input_contract(new)
    differing = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if differing:
        return f"its input spec differs ({', '.join('input.' + key for key in differing)})"
    return None


class Assembly(TaskSelection):
    """A trunk plus selected task modules of one bundle, callable like a model.

    With ONNX Runtime the selected modules run composed into one graph (see kfdeploy/bundling/fuse.py)
    as one session, tasks of one architecture merged into one grouped subgraph unless `merge`
    is False; on a CPU a call of more than `merge_max_batch` images runs them one by one
    (see `load`). `add_task`/`remove_task` build the new composition in the calling
    thread while other threads keep calling the current one, then swap it in; calls in
    flight finish on the graph they started with. The `cache_size` most recently used
    compositions are kept, so switching back to a task set seen before is instant; any
    other composition is released once no call uses it.
    """

    def __init__(self, bundle: Bundle, backend: str, tasks: Sequence[str], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, cache_size: int = 4, log=print, precision: str = "fp32",
                 merge: bool = True, merge_max_batch: Optional[int] = None):
        if backend not in BACKENDS:
            raise KfError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision != "fp32" and backend != "onnxruntime":
            raise KfError(f"precision {precision!r} runs on the onnxruntime backend only (the {backend} backend runs "
                          "fp32 modules or its own engines); use backend='onnxruntime'")
        if merge_max_batch is not None and (isinstance(merge_max_batch, bool) or not isinstance(merge_max_batch, int)
                                            or merge_max_batch < 1):
            raise KfError(f"merge_max_batch must be a whole number of images, at least 1, or None (the default bound), "
                          f"got {merge_max_batch!r}")
        self.merge_max_batch = merge_max_batch
        self.precision = precision
        self.bundle = bundle  # replaced, in one assignment, by the same folder re-read (_reread)
        self.threads = threads or physical_cores()
        self.cache_size = cache_size
        self._log = log
        self._local = threading.local()
        self._init_selection()
        self._cache_lock = threading.Lock()
        self._cache: "OrderedDict[FrozenSet[str], Composition]" = OrderedDict()
        self._pending: set = set()
        self._builder = None
        self._twin_lock = threading.Lock()
        self._rereading = threading.Lock()
        # Each module read once at this precision (all modules alike), checksum of the bytes checked.
        self._composer = Composer(_reader(bundle, precision), merge, log)
        bundle.variant("trunk", precision)  # a bundle without the precision is refused here, naming the command
        self._modules: Dict[str, object] = {}
        spec = self.manifest["input"]
        self._image_shape = tuple(spec["shape"][1:])
        lowest, highest = spec["range"]
        slack = 1e-3 * (highest - lowest)  # resampling may overshoot by a rounding error
        self._accepted = (lowest - slack, highest + slack)
        self._top_bits = _top_bits(*self._accepted)
        pixel_types = bundle.pixel_types()
        self._takes_uint8, self._takes_float = "uint8" in pixel_types, "float" in pixel_types
        self.backend = backend
        if backend == "tensorrt":
            self._engines, why_not = engines_for_this_device(self.manifest)
            if self._engines is None:
                log(f"warning: {why_not}; falling back to onnxruntime")
                self.backend = backend = "onnxruntime"
        if backend == "onnxruntime":
            self.providers, line = choose_providers(providers)
            log(line)
            self._io_device = io_device_for(self.providers)
        elif backend == "torch":
            from .bundling.export import graph_modules, torch_modules

            # What the graphs were exported from: 0-1 pixels in, the bundle's normalization inside.
            self._torch_modules = graph_modules(torch_modules(bundle), bundle.normalization())
            self.providers = ["torch"]
        else:
            self.providers = ["tensorrt"]
            log(f"tensorrt: using engines built for {self._engines['trunk']['device'].get('gpu')}")
        for task in tasks:
            self.check_task(task)
        if backend != "onnxruntime":
            self._modules["trunk"] = self._make_module("trunk")
        with self._mutation:
            self._switch(tuple(dict.fromkeys(tasks)))

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    # -- task selection ---------------------------------------------------------------
    def check_task(self, name: str) -> None:
        """Refuse, with the reason, a task this assembly cannot run: unknown to the bundle (its
        folder re-read first, for a task added there since), without a variant at this
        precision, or trained against another trunk."""
        if name not in self.manifest["tasks"]:
            self._reread(name)
        record = self.bundle.task(name)
        self.bundle.variant(name, self.precision)
        if record["trunk_fingerprint"] != self.manifest["trunk"]["fingerprint"]:
            raise KfError(
                f"task {name!r} was trained with another trunk (fingerprint {record['trunk_fingerprint'][:12]}, "
                f"bundle trunk {self.manifest['trunk']['fingerprint'][:12]}); it cannot be composed with this trunk"
            )

    def _reread(self, name: str) -> None:
        """Read the bundle's folder again for a task added to it since this assembly read it
        (`kfdeploy add-task`, `export --into`), and run from the new manifest if it can stand
        in for the old one (see `replacement_problem`). Calls in other threads go on: each
        module read before stays as it was read, and `self.bundle` changes in one assignment.
        An archive's extraction never changes: there, as for a name the folder lacks too,
        `Bundle.task` refuses it, listing the tasks there are."""
        with self._rereading:
            old = self.bundle
            if name in old.manifest["tasks"] or old.archive is not None:
                return  # another thread read it meanwhile, or nothing to read
            manifest = read_manifest(old.root)
            if name not in manifest["tasks"]:
                Bundle(old.root, manifest).task(name)  # raises: unknown, listing the folder's tasks (no need to verify them)
            new = Bundle.open(old.root, verify=old.verified)  # checked as the load checked it
            problem = replacement_problem(old, new, self.precision)
            if problem:
                raise KfError(f"bundle {old.root} changed on disk since this assembly loaded it: {problem}; "
                              f"to use task {name!r}, load it again with kfdeploy.load({str(old.root)!r})")
            if self.backend == "torch":
                from .bundling.export import graph_modules, torch_modules

                self._torch_modules = graph_modules(torch_modules(new), new.normalization())
            elif self.backend == "tensorrt":
                engines, _ = engines_for_this_device(new.manifest)
                self._engines = {**(engines or {}), **self._engines}  # the modules loaded keep theirs
            self._composer.graph_of = _reader(new, self.precision)
            self.bundle = new

    def _runner_for(self, tasks: Tuple[str, ...]):
        if self.backend == "onnxruntime":
            return self._composition(frozenset(tasks))
        return ModuleChain(self._modules["trunk"], {t: self._module(t) for t in tasks})

    def labels(self, task: str) -> List[str]:
        return self.bundle.task(task)["labels"]

    # -- module by module (torch, tensorrt) ---------------------------------------------
    def _module(self, name: str):
        if name not in self._modules:
            self._modules[name] = self._make_module(name)
        return self._modules[name]

    def _make_module(self, name: str):
        if self.backend == "torch":
            return TorchModule(self._torch_modules[name])
        from .bundling import tensorrt as trt_backend

        engine = self._engines.get(name)
        if engine is None:
            raise KfError(f"no TensorRT engine for task {name!r} on this device; build it with `kfdeploy build-engines`")
        return EngineModule(trt_backend.load_engine(self.bundle.file(engine["file"])))

    # -- compositions (onnxruntime) -------------------------------------------------------
    def _composition(self, key: FrozenSet[str]) -> Composition:
        """The composition for a task set: from the cache, or built now (in this thread)."""
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        composition = self._build(key)
        with self._cache_lock:
            self._cache[key] = composition
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return composition

    def _build(self, key: FrozenSet[str], merge: bool = True) -> Composition:
        tasks = [t for t in self.bundle.tasks if t in key]  # bundle order: one graph per set
        model = self._composer.compose(tasks, merge)
        session = ort_session_for(model, self.providers_for(key), self.threads)
        if self._io_device is not None:  # a GPU: one run per call, its kernels as large as they come
            return Composition(key, model, session, self._io_device)
        rows = max(1, RUN_BYTES // self._composer.image_bytes(tasks, merge))
        merged = self._composer.merged_bytes(tasks) if merge else 0
        merged_rows = (sys.maxsize if not merged else self.merge_max_batch if self.merge_max_batch is not None
                       else max(1, MERGED_CALL_BYTES // merged))
        return Composition(key, model, session, None, rows, merged_rows)

    def _for_batch(self, composition: Composition, images: int) -> Composition:
        """What a call of `images` images runs: `composition`, or past its `merged_rows` its
        twin with every task module on its own, built on that first use and released with it."""
        if images <= composition.merged_rows:
            return composition
        if composition.one_by_one is None:
            with self._twin_lock:
                if composition.one_by_one is None:
                    composition.one_by_one = self._build(composition.tasks, merge=False)
        return composition.one_by_one

    def _cached_or_scheduled(self, key: FrozenSet[str]) -> Optional[Composition]:
        """A cached composition for a subset of the tasks; else build one in the background
        for the next calls, and None for this one (it runs on the full composition)."""
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if key in self._pending:
                return None
            self._pending.add(key)
        if self._builder is None:
            from concurrent.futures import ThreadPoolExecutor

            self._builder = ThreadPoolExecutor(1, thread_name_prefix="kfdeploy-compose")
        self._builder.submit(self._build_in_background, key)
        return None

    def _build_in_background(self, key: FrozenSet[str]) -> None:
        try:
            self._composition(key)
        except Exception as exc:  # the calls go on with the full composition; say why it stays so
            self._log(f"warning: could not compose {', '.join(sorted(key))} on its own ({exc}); "
                      "calls for it keep running the full composition")
        finally:
            with self._cache_lock:
                self._pending.discard(key)

    def providers_for(self, key: FrozenSet[str]) -> list:
        """The providers, with the TensorRT EP's options: this graph's batch profile, and an
        engine cache of its own, keyed by what makes the engine (tasks, module checksums,
        precision, GPU), so a task set seen before loads without a build."""
        if "TensorrtExecutionProvider" not in self.providers:
            return self.providers
        import hashlib
        import json

        from .bundling import tensorrt as trt_backend

        precision = self.manifest.get("profile", {}).get("precision", "fp32")
        identity = {"tasks": sorted(key), "sha256": {m: self.bundle.variant(m, self.precision)["sha256"]
                                                     for m in ["trunk", *sorted(key)]},
                    "precision": precision, "gpu": gpu_name()}
        cache = trt_backend.ep_cache_dir(hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24])
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KfError(f"cannot make the TensorRT engine cache {cache} ({exc.strerror}); "
                          "set KFDEPLOY_CACHE to a writable folder") from None
        self._log(f"onnxruntime: TensorRT engine for {', '.join(sorted(key))} cached in {cache} (built on its first load)")
        options = trt_backend.ep_options({"image": self.bundle.input_shapes("trunk")["image"]}, precision, cache)
        return [("TensorrtExecutionProvider", options) if p == "TensorrtExecutionProvider" else p for p in self.providers]

    # -- inference -----------------------------------------------------------------
    def prepare(self, images) -> np.ndarray:
        """Validate and convert images to the float32 NCHW array the graphs take: pixels in
        [0, 1] (uint8 divided by 255). Normalization is the graphs' own work (every backend's).

        Every call pays for this, so the common case is a few comparisons; the messages
        are worked out only for input that fails them.
        """
        array = images if isinstance(images, np.ndarray) else np.asarray(images)
        if array.ndim != 4 or array.shape[1:] != self._image_shape or array.dtype.kind not in "biuf":
            self._refuse_layout(array)
        if array.dtype == np.uint8:
            if not self._takes_uint8:
                raise KfError(f"this bundle takes {' or '.join(self.bundle.pixel_types())} pixels (its input.pixel_types), not uint8")
            return array.astype(np.float32) / 255.0  # as the manifest's input.uint8 says
        if not self._takes_float:
            raise KfError(f"this bundle takes {' or '.join(self.bundle.pixel_types())} pixels (its input.pixel_types), not {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        # The largest of the bits, read as integers, answers the common case (see _top_bits);
        # anything else (negatives, -0.0, NaN, values too large, or a range without 0) gets
        # min and max. argmax and the item at it take half of max's time at batch 1 (0.8 us, 1.7).
        bits = array.view(np.uint32)
        if array.size and (self._top_bits is None or bits.item(bits.argmax()) > self._top_bits):
            low, high = array.min(), array.max()
            if not (self._accepted[0] <= low and high <= self._accepted[1]):  # NaN fails every comparison
                self._refuse_values(float(low), float(high))
        return array

    def _refuse_layout(self, array: np.ndarray) -> None:
        expected = self._image_shape
        shape = f"(N, {', '.join(map(str, expected))})"
        if array.dtype.kind not in "biuf":
            raise KfError(f"images must be numeric (uint8 or float), got dtype {array.dtype}")
        if array.ndim != 4:
            raise KfError(f"images must have shape {shape}, got {array.shape} (rank {array.ndim}); add a batch axis with images[None] for one image")
        if array.shape[1] != expected[0]:
            raise KfError(f"images must have {expected[0]} channel(s) (shape {shape}), got {array.shape[1]} in {array.shape}")
        raise KfError(f"images must be {expected[1]}x{expected[2]} pixels (shape {shape}), got {array.shape[2]}x{array.shape[3]}; resize them first")

    def _refuse_values(self, low: float, high: float) -> None:
        if not (np.isfinite(low) and np.isfinite(high)):  # min and max carry any NaN or inf with them
            raise KfError("images contain NaN or infinite values")
        lowest, highest = self.manifest["input"]["range"]
        raise KfError(
            f"images must lie in [{lowest:g}, {highest:g}] (the manifest's input.range), got values from "
            f"{low:g} to {high:g}; scale them first (uint8 images are divided by 255 for you)")

    def run(self, images, tasks: Optional[Iterable[str]] = None, logits: bool = False) -> Dict[str, np.ndarray]:
        """Scores per task (softmax probabilities, or logits) for a batch of images.

        `tasks` picks a subset of the selected tasks for this call; it does not pay for the
        others once their own composition is built (in the background, on first use).
        """
        selected, runner = self._state  # a snapshot: add/remove elsewhere cannot disturb this call
        wanted = selected
        if tasks is not None:  # the common call skips this: at batch 1 every microsecond shows
            wanted = tuple(dict.fromkeys(tasks))
            unknown = [t for t in wanted if t not in selected]
            if unknown:
                raise KfError(f"task {unknown[0]!r} is not selected; selected: {', '.join(selected) or 'none'}")
            if isinstance(runner, Composition) and wanted and set(wanted) != set(selected):
                runner = self._cached_or_scheduled(frozenset(wanted)) or runner
        x = self.prepare(images)
        if not wanted or len(x) == 0:
            self._local.last_call = (0.0, None)
            return {t: np.zeros((len(x), self.bundle.task(t)["classes"]), np.float32) for t in wanted}
        # Timings are kept raw and made on request: at batch 1, every object made per call shows
        started = time.perf_counter()
        if type(runner) is Composition:
            out, split = self._for_batch(runner, len(x)).run(x, wanted, logits), None
        else:
            split = Timings()
            out = runner.run(x, wanted, logits, split)
        self._local.last_call = (time.perf_counter() - started, split)
        records = self.manifest["tasks"]
        for task in wanted:  # a graph may give another width than its manifest says: apps would index past it
            if out[task].shape != (len(x), records[task]["classes"]):
                self._refuse_output(task, out[task].shape, len(x))
        return out

    def _refuse_output(self, task: str, shape: tuple, images: int) -> None:
        raise KfError(f"{module_title(task)} gave scores of shape {shape} for {images} image(s), where the manifest "
                      f"says {self.manifest['tasks'][task]['classes']} classes: its graph does not compute what bundle "
                      f"{self.bundle.root} declares; re-export the bundle")

    __call__ = run

    @property
    def last_timings(self) -> Timings:
        """Timings of this thread's last call (wall time; per module on module-by-module backends)."""
        seconds, split = getattr(self._local, "last_call", (0.0, None))
        split = split or Timings()
        return Timings(seconds * 1e3, split.trunk_ms, dict(split.tasks_ms))

    def profile(self, images, tasks: Optional[Sequence[str]] = None, runs: int = 20, warmup: int = 3) -> Timings:
        """Where a call's time goes, per module: the median of `runs` calls on `images`, split.

        For ONNX Runtime this is its own profiler on a twin of the running composition
        (node names carry their module), not a split of the graph, which would change what
        is measured; module-by-module backends time each module directly.
        """
        selected, runner = self._state
        wanted = list(selected if tasks is None else tasks)
        if not wanted:
            raise KfError("select at least one task to profile")
        x = self.prepare(images)
        if not isinstance(runner, Composition):
            calls = []
            for _ in range(warmup + runs):
                self.run(x, wanted)
                calls.append(self.last_timings)
            calls = calls[warmup:]
            chosen = calls[median_call([c.total_ms for c in calls])]
            return Timings(chosen.total_ms, chosen.trunk_ms, {t: chosen.tasks_ms[t] for t in wanted})
        import json
        import tempfile

        composition = self._for_batch(self._composition(frozenset(wanted)), len(x))  # the form calls of this size run
        with tempfile.TemporaryDirectory(prefix="kfdeploy-profile-") as folder:
            session = ort_session_for(composition.model, self.providers_for(composition.tasks), self.threads,
                               profile_prefix=str(Path(folder) / "run"))
            twin = Composition(composition.tasks, composition.model, session, composition.io_device, composition.rows)
            for _ in range(warmup + runs):
                twin.run(x, tuple(wanted), False)
            with open(session.end_profiling()) as f:
                trace = json.load(f)
        return profile_timings(trace, ["trunk", *wanted], warmup)

    def top(self, scores: Dict[str, np.ndarray], k: int = 1) -> Dict[str, List[List[tuple]]]:
        """Per task, per image: the k best (label, probability) pairs."""
        result = {}
        for task, probs in scores.items():
            labels = self.labels(task)
            order = np.argsort(-probs, axis=1)[:, :k]
            result[task] = [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]
        return result

    # -- description, fusion -------------------------------------------------------
    def module_bytes(self) -> Dict[str, int]:
        sizes = {m: self.bundle.variant(m, self.precision)["bytes"] for m in ["trunk", *self.tasks]}
        return sizes

    def describe(self) -> str:
        sizes = self.module_bytes()
        lines = [
            f"Assembly of {self.bundle.root} ({self.backend}: {', '.join(self.providers)}; {self.precision})",
            f"  trunk      {sizes['trunk'] / 1e6:6.2f} MB  -> common[{self.manifest['trunk']['output']['width']}]",
        ]
        for task in self.tasks:
            record = self.bundle.task(task)
            accuracy = self.bundle.variant(task, self.precision).get("heldout_accuracy")  # at this precision
            lines.append(f"  {task:<10} {sizes[task] / 1e6:6.2f} MB  {record['classes']} classes"
                         + (f", held-out accuracy {accuracy:.4f}" if accuracy is not None else ""))
        lines.append(f"  total      {sum(sizes.values()) / 1e6:6.2f} MB for {len(self.tasks)} task(s)")
        return "\n".join(lines)

    def save_fused(self, path, tasks: Optional[Sequence[str]] = None) -> Path:
        """Write the composition of the selected tasks (or `tasks`) as one ONNX file: what
        this assembly runs, outputs `<task>` (logits) and `<task>:probs`."""
        from .bundling.fuse import fuse_bundle

        return fuse_bundle(self.bundle, list(tasks or self.tasks), Path(path), self.precision, self._composer.merge)


def load(bundle, tasks: Optional[Sequence[str]] = None, backend: str = "onnxruntime",
         providers: Optional[Sequence[str]] = None, threads: Optional[int] = None, cache_size: int = 4,
         verify: bool = True, log=None, precision: str = "fp32", merge: bool = True,
         merge_max_batch: Optional[int] = None) -> Assembly:
    """Open a bundle (folder or .tar.gz), check it, and compose the trunk with `tasks` (default all).

    Every checksum is verified before any session is created; a task whose trunk
    fingerprint differs from the bundle's trunk is refused. `threads` sizes ONNX Runtime's
    intra-op pool (default: the cores this process may use); `cache_size` how many recently
    used task-set compositions stay loaded. `precision` ("fp32", or "int8"/"fp16" once
    `kfdeploy quantize` made them) picks every module's graph: one precision for all.
    `merge` runs selected tasks of one architecture as one grouped subgraph (the same
    answers, faster for small batches); False runs them one by one, each its own entry in
    `profile`. On a CPU a call of more than `merge_max_batch` images runs them one by one
    (the twin composition built on the first such call): by default as many images as keep
    the merged subgraph's largest tensor within 4 MiB (16 for five MobileNetV2 x0.5 tasks at
    32x32), where one by one turned faster.
    """
    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
    log = log or (lambda line: print(line, file=sys.stderr))
    selected = list(tasks) if tasks is not None else opened.tasks
    for task in selected:
        opened.task(task)  # unknown names fail here, listing the available ones
    return Assembly(opened, backend, selected, providers=providers, threads=threads, cache_size=cache_size, log=log,
                    precision=precision, merge=merge, merge_max_batch=merge_max_batch)
