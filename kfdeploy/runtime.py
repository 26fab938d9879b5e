"""The runtime: compose a bundle's shared trunk with the task modules an app selects.

    model = kfdeploy.load("bundles/sprites", tasks=["shape", "scale"])
    scores = model(images)          # {"shape": (N, 3) probabilities, "scale": (N, 6)}
    model.add_task("pos_x")         # the trunk stays loaded
    model.remove_task("scale")

One call runs the trunk once and feeds its output, with the image, to every selected
task. Tasks can be added and removed while other threads are calling the model. This
module imports neither torch nor anything that does (unless backend="torch"), so a
device with only numpy and onnxruntime can run it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .bundle import Bundle
from .errors import KfError

BACKENDS = ("onnxruntime", "tensorrt", "torch")
_PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def physical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _gpu_visible() -> bool:
    """Whether a CUDA device is there, asked of the driver (no torch, no CUDA toolkit)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def choose_providers(requested: Optional[Sequence[str]] = None) -> tuple[List[str], str]:
    """ONNX Runtime providers to use, and a line saying which and why."""
    import onnxruntime as ort

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


THREAD_POOLS = ("per-session", "shared")
# {"threads": n} once this process runs on ONNX Runtime's global pool: made by
# use_shared_thread_pool (n threads), or found made by the app itself (n = None).
_shared_pool: Dict[str, Optional[int]] = {}


def use_shared_thread_pool(threads: int) -> None:
    """Make one ONNX Runtime intra-op pool for the whole process (thread_pool="shared").

    Every session then runs on the same threads instead of each owning a pool that
    competes for the cores. It is for the whole process: from then on ONNX Runtime
    refuses sessions that ask for a pool of their own.
    """
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    if _shared_pool:
        return
    try:
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool["threads"] = threads
    except Fail as exc:
        if "already been created" not in str(exc):
            raise
        _shared_pool["threads"] = None  # the app made the pool first; share the app's


def engines_for_this_device(manifest: dict) -> tuple[Optional[Dict[str, dict]], str]:
    """The bundle's TensorRT engines built for this GPU, by module; or None and why not."""
    try:
        from . import tensorrt as trt_backend

        trt_backend.require_tensorrt()
        slug = trt_backend.signature_slug(trt_backend.device_signature())
    except KfError as exc:
        return None, f"tensorrt backend unavailable ({exc})"
    mine = {e["module"]: e for e in manifest.get("engines", [])
            if e["builder"] == "tensorrt" and trt_backend.signature_slug(e["device"]) == slug}
    if "trunk" not in mine:
        return None, f"the bundle has no TensorRT engine for this device ({slug}); build them here with `kfdeploy build-engines`"
    return mine, ""


def io_device_for(providers: Sequence) -> Optional[str]:
    """Where the sessions' inputs and outputs should stay between modules: "cuda" when the
    first provider computes on an NVIDIA GPU; None keeps plain numpy runs (CPU)."""
    return "cuda" if providers[0] in _PROVIDER_PREFERENCE[:2] else None


class OrtModule:
    """One ONNX Runtime session; `run(feeds) -> first output` on the host.

    With an `io_device` ("cuda"), feeds are OrtValues already on that device and
    `run_kept` leaves its output there: the image goes to the GPU once per call and the
    trunk's `common` never leaves it, where plain session.run would copy both up again for
    every task and `common` down and up in between. Untested on a GPU here (none is lent
    to this project's CPU machines); tests run the same bound path with io_device="cpu".
    """

    def __init__(self, path: Path, providers: Sequence, threads: int, thread_pool: str = "per-session",
                 io_device: Optional[str] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A per-session arena keeps the peak of every batch size it has served: trunk + 5
        # tasks grew to ~140 MB after batches of 1 and 64, against ~50 MB without it, and
        # batch 64 was no slower without it.
        options.enable_cpu_mem_arena = False
        if thread_pool == "shared" or _shared_pool:  # once shared, per-session pools are refused
            use_shared_thread_pool(threads)
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Sessions of one assembly share the cores. By default a session's pool keeps
            # spinning after its run and steals them from the next session: trunk + 5 tasks
            # ran 6x slower at batch 64 on 2 cores. Spinning only while a run lasts keeps
            # the fast wake-ups (0.71 ms at batch 1 vs 0.85 with spinning off) without that.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except RuntimeError as exc:
            if "global thread pool" not in str(exc):
                raise
            # The app set up ONNX Runtime's global pool itself (set_global_thread_pool_sizes),
            # so sessions of their own are refused: join the app's pool, now and from now on.
            _shared_pool.setdefault("threads", None)
            options.use_per_session_threads = False
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.joined_global_pool = not options.use_per_session_threads
        self.providers = self.session.get_providers()
        self.io_device = io_device
        self._output = self.session.get_outputs()[0].name

    def run(self, feeds: Mapping) -> np.ndarray:
        if self.io_device is None:
            return self.session.run(None, dict(feeds))[0]
        return self._run_bound(feeds, "cpu").numpy()

    def run_kept(self, feeds: Mapping):
        """The output where the next module reads it: a numpy array, or an OrtValue on io_device."""
        return self.run(feeds) if self.io_device is None else self._run_bound(feeds, self.io_device)

    def _run_bound(self, feeds: Mapping, output_device: str):
        binding = self.session.io_binding()  # one per call: bindings are not shared between threads
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._output, output_device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


class TorchModule:
    """The PyTorch reference for one module, from the weights the bundle carries."""

    def __init__(self, forward):
        import torch

        self._torch = torch
        self._forward = forward

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            return self._forward(*(self._torch.from_numpy(v) for v in feeds.values())).numpy()

    run_kept = run


class EngineModule:
    """A TensorRT engine behind the same `run(feeds) -> first output` as the other backends."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.engine.run(dict(feeds))[self.engine.outputs[0]]

    run_kept = run


@dataclass
class Timings:
    """Where the last call's time went, in milliseconds."""

    trunk_ms: float = 0.0
    tasks_ms: Dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return self.trunk_ms + sum(self.tasks_ms.values())


class Assembly:
    """A trunk plus selected task modules of one bundle, callable like a model."""

    def __init__(self, bundle: Bundle, backend: str, tasks: Sequence[str], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, thread_pool: str = "per-session", log=print):
        if backend not in BACKENDS:
            raise KfError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if thread_pool not in THREAD_POOLS:
            raise KfError(f"unknown thread_pool {thread_pool!r}; choose one of {', '.join(THREAD_POOLS)}")
        self.thread_pool = thread_pool
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.threads = threads or physical_cores()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._tasks: Dict[str, object] = {}
        self._engines = None
        self.backend = backend
        if backend == "tensorrt":
            self._engines, why_not = engines_for_this_device(self.manifest)
            if self._engines is None:
                log(f"warning: {why_not}; falling back to onnxruntime")
                self.backend = backend = "onnxruntime"
        if backend == "onnxruntime":
            self.providers, line = choose_providers(providers)
            log(line)
            if "TensorrtExecutionProvider" in self.providers:
                from . import tensorrt as trt_backend

                self._trt_cache = trt_backend.ep_cache_dir(self.manifest["trunk"]["fingerprint"])
                try:
                    self._trt_cache.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise KfError(f"cannot make the TensorRT engine cache {self._trt_cache} ({exc.strerror}); "
                                  "set KFDEPLOY_CACHE to a writable folder") from None
                log(f"onnxruntime: TensorRT engines cached in {self._trt_cache} (the first load of each module builds them)")
        elif backend == "torch":
            from .export import torch_modules

            self._torch_model = torch_modules(bundle)
            self.providers = ["torch"]
        else:
            self.providers = ["tensorrt"]
            log(f"tensorrt: using engines built for {self._engines['trunk']['device'].get('gpu')}")
        self._trunk = self._make_module("trunk")
        if getattr(self._trunk, "joined_global_pool", False) and self.thread_pool == "per-session":
            self.thread_pool = "shared"
            log("onnxruntime: this process already runs ONNX Runtime's global thread pool; the sessions join it")
        for task in tasks:
            self.add_task(task)

    # -- modules -----------------------------------------------------------------
    def _make_module(self, name: str):
        record = self.manifest["trunk"] if name == "trunk" else self.bundle.task(name)
        if self.backend == "onnxruntime":
            return OrtModule(self.bundle.file(record["file"]), self._providers_for(name), self.threads, self.thread_pool,
                             io_device_for(self.providers))
        if self.backend == "torch":
            model = self._torch_model
            return TorchModule(model.forward_features if name == "trunk" else model.tasks[name])
        from . import tensorrt as trt_backend

        engine = self._engines.get(name)
        if engine is None:
            raise KfError(f"no TensorRT engine for task {name!r} on this device; build it with `kfdeploy build-engines`")
        return EngineModule(trt_backend.load_engine(self.bundle.file(engine["file"])))

    def _providers_for(self, module: str) -> list:
        """The providers, with the TensorRT EP's options for this module's input shapes."""
        if "TensorrtExecutionProvider" not in self.providers:
            return self.providers
        from . import tensorrt as trt_backend

        precision = self.manifest.get("profile", {}).get("precision", "fp32")
        options = trt_backend.ep_options(self.bundle.input_shapes(module), precision, self._trt_cache)
        return [("TensorrtExecutionProvider", options) if p == "TensorrtExecutionProvider" else p for p in self.providers]

    def add_task(self, name: str) -> None:
        """Select one more task; the trunk is not reloaded."""
        record = self.bundle.task(name)
        if record["trunk_fingerprint"] != self.manifest["trunk"]["fingerprint"]:
            raise KfError(
                f"task {name!r} was trained with another trunk (fingerprint {record['trunk_fingerprint'][:12]}, "
                f"bundle trunk {self.manifest['trunk']['fingerprint'][:12]}); it cannot be composed with this trunk"
            )
        if name in self._tasks:
            return
        module = self._make_module(name)
        with self._lock:
            self._tasks = {**self._tasks, name: module}

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise KfError(f"task {name!r} is not selected; selected: {', '.join(self._tasks) or 'none'}")
            self._tasks = {t: m for t, m in self._tasks.items() if t != name}

    @property
    def tasks(self) -> List[str]:
        return list(self._tasks)

    def labels(self, task: str) -> List[str]:
        return self.bundle.task(task)["labels"]

    # -- inference -----------------------------------------------------------------
    def prepare(self, images) -> np.ndarray:
        """Validate and convert images to the float32 NCHW array the graphs take."""
        spec = self.manifest["input"]
        expected = tuple(spec["shape"][1:])
        array = np.asarray(images)
        if array.dtype.kind not in "biuf":
            raise KfError(f"images must be numeric (uint8 or float), got dtype {array.dtype}")
        if array.ndim != 4:
            raise KfError(f"images must have shape (N, {', '.join(map(str, expected))}), got {array.shape} (rank {array.ndim}); add a batch axis with images[None] for one image")
        if array.shape[1] != expected[0]:
            raise KfError(f"images must have {expected[0]} channel(s) (shape (N, {', '.join(map(str, expected))})), got {array.shape[1]} in {array.shape}")
        if tuple(array.shape[2:]) != expected[1:]:
            raise KfError(f"images must be {expected[1]}x{expected[2]} pixels (shape (N, {', '.join(map(str, expected))})), got {array.shape[2]}x{array.shape[3]}; resize them first")
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255.0  # as the manifest's input.uint8 says
        array = array.astype(np.float32, copy=False)
        if array.size:
            # min and max carry any NaN or inf with them: one check for both mistakes.
            low, high = float(array.min()), float(array.max())
            if not (np.isfinite(low) and np.isfinite(high)):
                raise KfError("images contain NaN or infinite values")
            lowest, highest = spec.get("range", (-np.inf, np.inf))
            slack = 1e-3 * (highest - lowest)  # resampling may overshoot by a rounding error
            if low < lowest - slack or high > highest + slack:
                raise KfError(
                    f"images must lie in [{lowest:g}, {highest:g}] (the manifest's input.range), got values from "
                    f"{low:g} to {high:g}; scale them first (uint8 images are divided by 255 for you)")
        return np.ascontiguousarray(array)

    def run(self, images, tasks: Optional[Iterable[str]] = None, logits: bool = False) -> Dict[str, np.ndarray]:
        """Scores per task (softmax probabilities, or logits) for a batch of images."""
        with self._lock:
            selected = dict(self._tasks)  # a snapshot: add/remove elsewhere cannot disturb this call
        if tasks is not None:
            tasks = list(tasks)
            unknown = [t for t in tasks if t not in selected]
            if unknown:
                raise KfError(f"task {unknown[0]!r} is not selected; selected: {', '.join(selected) or 'none'}")
            selected = {t: selected[t] for t in tasks}
        x = self.prepare(images)
        timings = Timings()
        if len(x) == 0:
            self._local.timings = timings
            return {t: np.zeros((0, self.bundle.task(t)["classes"]), np.float32) for t in selected}
        started = time.perf_counter()
        image = self._place(x)
        common = self._trunk.run_kept({"image": image})
        timings.trunk_ms = (time.perf_counter() - started) * 1e3
        out = {}
        # Runs back to back, softmax after: an ONNX Runtime pool woken again soon finds its
        # threads still awake, while numpy work in between let them sleep (at batch 1 with
        # 5 tasks, softmax in between cost 0.08 ms of wake-ups for 0.02 ms of arithmetic).
        for task, module in selected.items():
            started = time.perf_counter()
            out[task] = module.run({"image": image, "common": common})
            timings.tasks_ms[task] = (time.perf_counter() - started) * 1e3
        self._local.timings = timings
        return out if logits else {task: _softmax(scores) for task, scores in out.items()}

    __call__ = run

    def _place(self, x: np.ndarray):
        """The image where the modules read it: numpy on the host, or once onto the GPU."""
        device = getattr(self._trunk, "io_device", None)
        if device is None:
            return x
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(x, device, 0)

    @property
    def last_timings(self) -> Timings:
        """Timings of this thread's last call."""
        return getattr(self._local, "timings", Timings())

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
        sizes = {"trunk": self.manifest["trunk"]["bytes"]}
        sizes.update({t: self.bundle.task(t)["bytes"] for t in self.tasks})
        return sizes

    def describe(self) -> str:
        sizes = self.module_bytes()
        lines = [
            f"Assembly of {self.bundle.root} ({self.backend}: {', '.join(self.providers)})",
            f"  trunk      {sizes['trunk'] / 1e6:6.2f} MB  -> common[{self.manifest['trunk']['output']['width']}]",
        ]
        for task in self.tasks:
            record = self.bundle.task(task)
            accuracy = record.get("heldout_accuracy")
            lines.append(f"  {task:<10} {sizes[task] / 1e6:6.2f} MB  {record['classes']} classes"
                         + (f", held-out accuracy {accuracy:.4f}" if accuracy is not None else ""))
        lines.append(f"  total      {sum(sizes.values()) / 1e6:6.2f} MB for {len(self.tasks)} task(s)")
        return "\n".join(lines)

    def save_fused(self, path, tasks: Optional[Sequence[str]] = None) -> Path:
        """Write one ONNX graph computing the selected tasks' logits (outputs named by task)."""
        from .fuse import fuse_bundle

        return fuse_bundle(self.bundle, list(tasks or self.tasks), Path(path))


def load(bundle, tasks: Optional[Sequence[str]] = None, backend: str = "onnxruntime",
         providers: Optional[Sequence[str]] = None, threads: Optional[int] = None, thread_pool: str = "per-session",
         verify: bool = True, log=None) -> Assembly:
    """Open a bundle (folder or .tar.gz), check it, and compose the trunk with `tasks` (default all).

    Every checksum is verified before any session is created; a task whose trunk
    fingerprint differs from the bundle's trunk is refused. `thread_pool="shared"` runs all
    sessions of the process on one ONNX Runtime pool: fastest (see benchmarks/runtime.py),
    but from then on every ONNX Runtime session in the process, yours too, must set
    `use_per_session_threads = False`. The default gives each session its own pool, unless
    the app already made ONNX Runtime's global pool itself: then the sessions join that.
    """
    opened = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
    log = log or (lambda line: print(line, file=sys.stderr))
    selected = list(tasks) if tasks is not None else opened.tasks
    for task in selected:
        opened.task(task)  # unknown names fail here, listing the available ones
    return Assembly(opened, backend, selected, providers=providers, threads=threads, thread_pool=thread_pool, log=log)
