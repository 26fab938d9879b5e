"""ONNX Runtime as kfdeploy runs a bundle's graphs: quietly, and what it raises as one line.

A bundle's graphs are untrusted: a run can fail (an allocation it cannot make, a shape a
lying graph did not announce), and ONNX Runtime would then print its own error lines to the
terminal and raise one of its own exception types with a C++ source location in it. The
runtime, `kfdeploy run` and `kfdeploy verify` turn that into a KfError naming the module.
Imports ONNX Runtime only when called, never torch.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable

from .errors import KfError
from .names import module_title, quote

# FATAL only: ONNX Runtime logs every failed run as an error line on stderr, besides raising
# it (a session's level governs its runs: RunOptions default to it).
QUIET = 4
_SOURCE_LOCATION = re.compile(r"\S+\.(?:cc|cpp|h):\d+ (?:[^()]*\([^()]*\) )?")
_NODE = re.compile(r"Name:'([^'/]*)/")


def quiet_options():
    """SessionOptions that keep ONNX Runtime's own log lines off the user's terminal."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    return options


@functools.cache
def run_failures() -> tuple:
    """What ONNX Runtime raises when a graph fails while running: its own exception types
    (none shares a base but Exception) and what pybind11 makes of C++'s."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.RuntimeException, state.InvalidArgument, state.InvalidGraph, state.NotImplemented,
            state.EPFail, state.EngineError, RuntimeError, MemoryError)


def ort_message(exc: BaseException) -> str:
    """ONNX Runtime's message, short: its first line without the error-code prefix or the C++
    source location, quoted (it holds node names, which come from the bundle)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = _SOURCE_LOCATION.sub("", re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text))
    return quote(text, 200)


def run_failure(exc: BaseException, modules: Iterable[str]) -> KfError:
    """The KfError for a failed run of a graph composing `modules` ("trunk" and tasks): it names
    the module whose node failed (node names carry it as a prefix), else the set."""
    modules = list(modules)
    node = _NODE.search(str(exc))
    module = modules[0] if len(modules) == 1 else node.group(1) if node and node.group(1) in modules else None
    which = module_title(module) if module else f"the graph of {', '.join(modules)}"
    return KfError(f"{which} failed while running in ONNX Runtime ({ort_message(exc)}); if the batch is large, call with "
                   "fewer images, else the bundle's graphs are damaged: check it with `kfdeploy verify`, or re-export it")
