"""Everything that needs TensorRT: building engines, naming them, running them.

Engines are specific to a GPU and a TensorRT version, so they are built on the device that
runs them. This module imports neither TensorRT nor torch at import time, so the rest of
kfdeploy works where they are missing; each entry point says which package is missing.

Written against the TensorRT 10 Python API (name-based I/O tensors, execute_async_v3,
build_serialized_network); TensorRT 8.5+ also works for the calls used here. It has not
been run: TensorRT cannot be installed where kfdeploy is developed.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import re
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_write
from ..errors import KfError

PRECISIONS = ("fp32", "fp16")
Shapes = Tuple[tuple, tuple, tuple]  # (min, opt, max) shape of one input


def _import(module: str, package: str, product: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise KfError(
                f"{product} is not installed (Python package {package!r}): build engines on the target device, where "
                f"TensorRT ships with the platform (e.g. JetPack on Jetson) or `pip install {package}` reaches NVIDIA's index"
            ) from None
        problem = exc
    except (ImportError, OSError) as exc:  # present, but it or its shared libraries do not load
        problem = exc
    raise KfError(f"{product} is installed but cannot be imported (Python package {package!r}: {problem}); "
                  "reinstall the build that matches this device's CUDA, TensorRT and PyTorch")


def require_tensorrt():
    """The `tensorrt` module, or a KfError that names the missing package."""
    return _import("tensorrt", "tensorrt", "TensorRT")


def require_torch_tensorrt():
    """The `torch_tensorrt` module, or a KfError that names the missing package."""
    return _import("torch_tensorrt", "torch-tensorrt", "Torch-TensorRT")


@functools.cache
def _logger():
    # One logger for the process: it must outlive every builder, runtime and engine made with it.
    trt = require_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise KfError(f"engine precision {precision!r} is not supported: use fp32 or fp16 (int8 needs calibration "
                      "data or a quantized graph, which kfdeploy does not make)")


# -- device ---------------------------------------------------------------------------

def device_signature() -> dict:
    """What an engine is tied to: {gpu, compute_capability ("8.7"), tensorrt, cuda}."""
    trt = require_tensorrt()
    gpu, capability, cuda = _cuda_device()
    return {"gpu": gpu, "compute_capability": capability, "tensorrt": trt.__version__, "cuda": cuda}


def _cuda_device() -> Tuple[str, str, Optional[str]]:
    """(name, compute capability, CUDA runtime version) of the current GPU."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return torch.cuda.get_device_name(), f"{major}.{minor}", torch.version.cuda
    # A CPU-only PyTorch (or none) still leaves the `cuda` Python bindings, if installed.
    cudart = _cudart()
    if cudart is not None:
        ok = cudart.cudaError_t.cudaSuccess
        err, count = cudart.cudaGetDeviceCount()
        if err == ok and count > 0:
            _, device = cudart.cudaGetDevice()
            _, prop = cudart.cudaGetDeviceProperties(device)
            err, version = cudart.cudaRuntimeGetVersion()
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            cuda = f"{version // 1000}.{version % 1000 // 10}" if err == ok else None
            return name.rstrip("\0"), f"{prop.major}.{prop.minor}", cuda
    raise KfError("no CUDA GPU is visible (asked PyTorch and the `cuda` Python bindings): run this on the target "
                  "device with its NVIDIA driver loaded, with PyTorch built for CUDA or `pip install cuda-python`")


def _cudart():
    """The CUDA runtime bindings of cuda-python: new module path first, then the old one."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    return None


def signature_slug(sig: dict) -> str:
    """A short, filename-safe name for a device signature, e.g. "orin-sm87-trt10.3"."""
    gpu = re.sub(r"\bnvidia\b", "", str(sig.get("gpu") or "").lower())
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu).strip("-")[:32].strip("-") or "gpu"
    sm = re.sub(r"[^0-9]", "", str(sig.get("compute_capability") or "")) or "unknown"
    trt = ".".join(re.findall(r"\d+", str(sig.get("tensorrt") or ""))[:2]) or "unknown"
    return f"{gpu}-sm{sm}-trt{trt}"


# -- ONNX Runtime's TensorRT execution provider ------------------------------------------

def ep_cache_dir(key: str) -> Path:
    """Where ONNX Runtime's TensorRT EP keeps the engine and timings of one composition.

    Not inside the bundle, which is checksummed and may be read-only: $KFDEPLOY_CACHE, else
    the user's cache folder. `key` names what the engine was built from (the runtime
    hashes the task set, module checksums, precision and GPU into it), so a task set seen
    before finds its engine.
    """
    root = os.environ.get("KFDEPLOY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kfdeploy"
    return Path(root) / "trt-ep" / key


def ep_options(shapes: Dict[str, Shapes], precision: str, cache_dir: Path) -> dict:
    """Provider options for ONNX Runtime's TensorrtExecutionProvider (names as documented for
    onnxruntime-gpu 1.18+).

    Without an engine cache the EP builds every module's engine again in each new session,
    minutes on a Jetson; without explicit profile shapes it builds one for the first batch
    size it meets and again for each larger one.
    """
    _check_precision(precision)

    def profile(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in shapes.items())

    return {
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": profile(0), "trt_profile_opt_shapes": profile(1), "trt_profile_max_shapes": profile(2),
    }


# -- building ---------------------------------------------------------------------------

def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    shapes: Dict[str, Shapes],
    precision: str,
    timing_cache_path: Optional[Path | str] = None,
    workspace_bytes: int = 1 << 30,
) -> None:
    """Build a TensorRT engine (plan file) from an ONNX graph on this machine's GPU.

    `shapes` gives (min, opt, max) for every input; they make the one optimization profile.
    The timing cache, if given, is read before and written after the build so rebuilding
    on the same device skips most of the kernel timing.
    """
    _check_precision(precision)
    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise KfError(f"ONNX graph {onnx_path} does not exist; export the bundle first (`kfdeploy export`)")
    logger = _logger()
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x must be asked.
    explicit_batch = int(trt.__version__.split(".")[0]) < 10
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if explicit_batch else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise KfError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors or 'no details'}; "
                      "`kfdeploy check-trt` lists what the parser does not take")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise KfError(f"TensorRT {trt.__version__} has no fp16 builder flag (TensorRT 11 builds strongly typed "
                          "networks only); build with --precision fp32, or use TensorRT 10")
        if not builder.platform_has_fast_fp16:
            raise KfError("this GPU has no fast fp16, so an fp16 engine would be no faster; build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(shapes):
        raise KfError(f"{onnx_path.name} has inputs {inputs}, but shapes were given for {sorted(shapes)}; "
                      "give (min, opt, max) for exactly these inputs")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    if config.add_optimization_profile(profile) < 0:
        raise KfError(f"invalid shapes for {onnx_path.name}: {shapes}; each input needs min <= opt <= max, "
                      "differing only where the graph's dimension is dynamic")

    if timing_cache_path is not None:
        timing_cache_path = Path(timing_cache_path)
        previous = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        cache = config.create_timing_cache(previous)
        # A cache from another TensorRT version or GPU is refused; starting empty only costs time.
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise KfError(f"TensorRT could not build an engine from {onnx_path.name} (its log above says why); if it "
                      f"ran out of memory, give it more workspace than {workspace_bytes >> 20} MiB or lower the batch max")
    with atomic_write(engine_path) as tmp:
        tmp.write_bytes(plan)
    if timing_cache_path is not None:
        with atomic_write(timing_cache_path) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())


def build_torch_tensorrt(module, example_shapes: Sequence[Shapes], precision: str, path: Path | str) -> None:
    """Compile a PyTorch module with Torch-TensorRT (dynamo) and save it as an ExportedProgram.

    `example_shapes` holds (min, opt, max) per positional input, all float32. The saved file
    loads with torch_tensorrt.load(path).module() on a device with the same GPU and TensorRT.
    """
    _check_precision(precision)
    torch_tensorrt = require_torch_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise KfError("Torch-TensorRT needs a CUDA GPU, and PyTorch sees none; run this on the target device")
    # A copy: compiling moves the module to the GPU, which the caller did not ask for.
    module = copy.deepcopy(module).eval().to("cuda")
    inputs = [torch_tensorrt.Input(min_shape=low, opt_shape=opt, max_shape=high, dtype=torch.float32)
              for low, opt, high in example_shapes]
    precisions = {torch.float32} if precision == "fp32" else {torch.float16, torch.float32}
    with torch.no_grad():
        compiled = torch_tensorrt.compile(module, ir="dynamo", inputs=inputs, enabled_precisions=precisions)
        # Saving retraces the compiled module; its examples must lie in the profile's range.
        examples = [torch.rand(opt, device="cuda") for _, opt, _ in example_shapes]
        with atomic_write(path) as tmp:
            torch_tensorrt.save(compiled, str(tmp), output_format="exported_program", inputs=examples)


# -- running ----------------------------------------------------------------------------

class TrtEngine:
    """A deserialized engine and one execution context; `run(feeds) -> {output name: array}`.

    Device buffers are PyTorch CUDA tensors: PyTorch is installed wherever Torch-TensorRT
    is, and its caching allocator makes per-call buffers cheap, where cuda-python would
    need hand-managed allocations.
    """

    def __init__(self, path: Path | str):
        trt = require_tensorrt()
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise KfError("running a TensorRT engine needs PyTorch with CUDA (it holds the GPU buffers): install the "
                          "PyTorch build for this device (on Jetson, NVIDIA's JetPack wheel)")
        self._torch = torch
        # The runtime must outlive the engine deserialized from it.
        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise KfError(f"TensorRT could not load {path}: engines only load on the GPU model and TensorRT version "
                          "that built them; rebuild it here with `kfdeploy build-engines`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise KfError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs: List[str] = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs: List[str] = [n for n in names if n not in self.inputs]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = torch.cuda.Stream()
        # An execution context holds the shapes and addresses of one inference at a time.
        self._lock = threading.Lock()

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        torch = self._torch
        if sorted(feeds) != sorted(self.inputs):
            raise KfError(f"the engine takes inputs {self.inputs}, got {sorted(feeds)}")
        with self._lock, torch.cuda.stream(self._stream):
            # Copies, allocations and the engine all run on one stream, so they stay in order.
            buffers = {}
            for name in self.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                buffers[name] = torch.from_numpy(array).to("cuda")
                if not self.context.set_input_shape(name, array.shape):
                    raise KfError(f"input {name} of shape {array.shape} is outside the shapes the engine was built "
                                  "for; rebuild it with a wider batch range, or send smaller batches")
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise KfError(f"output {name} has a data-dependent shape {shape}, which kfdeploy cannot allocate")
                dtype = torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
                buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            for name, tensor in buffers.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise KfError("TensorRT failed to run the engine (its log above says why)")
            outputs = {name: buffers[name].cpu() for name in self.outputs}
        return {name: tensor.numpy() for name, tensor in outputs.items()}


def load_engine(path: Path | str) -> TrtEngine:
    return TrtEngine(path)
