"""`kfdeploy serve`: a bundle on a real Triton Inference Server.

    kfdeploy serve bundles/sprites [--tasks shape,scale] [--port 8000] [--grpc-port 8001]

The nvidia-pytriton wheel (the serve extra) ships a `tritonserver` binary with the Python
backend; kfdeploy runs that binary itself, on a model repository it writes into a temporary
folder: one Python-backend model, `kfdeploy` unless `--model-name` says otherwise, whose
config.pbtxt comes from the bundle's manifest and whose model.py imports
kfdeploy/serving/serve_backend.py (nothing from the bundle is executed). Inside Triton's Python
stub, kfdeploy/serving/routing.py answers each dynamic batch: the trunk once for every row, each
task on the rows that asked for it, and one response per request: a request that cannot be
answered gets its own error while the others of its batch are answered. PyTriton's own
Python API is not used: its proxy hop cost ~2 ms a request here, and it answers a batch
with one error for all its requests.

The protocol is Triton's (KServe v2, HTTP and gRPC):
- input `image`: FP32 [batch, C, H, W] in the manifest's range;
- one output per task of the bundle, named after it: probabilities [batch, classes], or
  logits with the request parameter `logits: true`. A request asks for tasks by asking for
  those outputs; a request that names no output (or all of them) gets every served task.
  Outputs of tasks that are not served now are refused;
- labels, per task, are in the model's config (`GET /v2/models/kfdeploy/config`, parameter
  `labels`, a JSON object), and in the control endpoint.
Triton's health (`/v2/health/ready`), metadata, statistics and Prometheus metrics endpoints
are Triton's own. Triton runs in explicit model-control mode: the served task set is a
parameter of the model's config, and changing it rewrites config.pbtxt and loads the model
again (Triton's repository API), which keeps the loaded model answering until the new one
is ready. A control endpoint (HTTP, 127.0.0.1 unless `--control-host`) does that: `GET
/tasks`, `PUT /tasks/NAME`, `DELETE /tasks/NAME`, and `GET /stats` (Triton's statistics of
the model, since it was last loaded).

When the model's process dies (Triton's Python backend stub, killed by the kernel's OOM killer,
say), Triton 2.51 goes on saying ready while every request fails with "Stub process ... is not
healthy": the stub restart older Python backends had went in python_backend#360 (server#8604),
and model readiness that follows the stub came later (server#8552, 2025). So kfdeploy serve
watches each stub with a pidfd and, the moment none is left alive, kills that Triton and starts
another on the same ports and repository (the served tasks included), logging one line;
meanwhile the ports refuse connections, so readiness probes and requests fail at once instead
of hanging. Loading the model again through the repository API was measured and is no cure:
once a request has reached the dead stub, the dead model never finishes unloading (UNLOADING
for good, its stub a zombie, its shared memory kept), so every later stop waits out the drain
timeout and exits 1. A Triton that cannot start again, or whose model dies at once, makes
kfdeploy serve exit 1 for a supervisor to restart it.

What the binary needs, measured here (Triton 2.51 from nvidia-pytriton 0.7): a backend
folder holding libtriton_python.so beside the stub built for this Python's version; the
stub embeds the Python it finds on PATH (this interpreter's, so its site-packages), and
must link this interpreter's libpython, not the system's (else model loading fails with
"'_thread.RLock' object has no attribute '_recursion_count'"), plus the wheel's own
libraries; Triton's addresses default to 0.0.0.0, so all three are set.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..atomic import atomic_write
from ..errors import KfError
from ..extras import install_hint
from ..runtime import load
from . import SERVE_DRAIN_TIMEOUT_S, SERVE_QUEUE_DELAY_US
from .routing import ServedTasks
from .triton_repo import Enum, to_pbtxt

READY_TIMEOUT_S = 180
# The Python backend's stub, Triton's child, as /proc/PID/stat names it (the kernel keeps 15
# characters of triton_python_backend_stub); one per model instance.
STUB_NAME = "triton_python_b"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # what the stub puts on sys.path to import kfdeploy


def triton_folder() -> Path:
    """The `tritonserver` folder inside the nvidia-pytriton wheel (found, not imported)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise KfError(install_hint("pytriton", "serve"))
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def _prepend(variable: str, *paths) -> str:
    current = os.environ.get(variable)
    return ":".join([*map(str, paths), *([current] if current else [])])


def triton_environment(triton: Path) -> dict:
    """Triton's environment: the stub's Python, libpython and kfdeploy (see the docstring)."""
    return {**os.environ,
            "PATH": _prepend("PATH", Path(sys.executable).parent),
            "LD_LIBRARY_PATH": _prepend("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"), triton.parent.parent / "nvidia_pytriton.libs"),
            "PYTHONPATH": _prepend("PYTHONPATH", PACKAGE_ROOT)}


def backend_folder(triton: Path, out: Path) -> Path:
    """`--backend-directory` for the Python backend: the wheel's backend with the stub for this Python."""
    python = out / "python"
    python.mkdir(parents=True)
    for item in (triton / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy(item, python)
    stub = triton / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.exists():
        raise KfError(f"nvidia-pytriton has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]} ({stub})")
    shutil.copy(stub, python)
    return out


def child_processes(parent: int, name: str) -> Dict[int, bool]:
    """The processes called `name` (as /proc/PID/stat has it: 15 characters at most) whose
    parent is `parent`: pid -> alive, False for one that has died and is not reaped yet (a
    zombie: Triton 2.51 never reaps a stub that was killed)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes().decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        name_end = stat.rindex(")")
        state, ppid = stat[name_end + 2:].split()[:2]
        if int(ppid) == parent and stat[stat.index("(") + 1:name_end] == name:
            found[int(entry.name)] = state != "Z"
    return found


def stub_memory(triton_pid: int) -> Set[str]:
    """The shared memory Triton holds for its Python stubs (not a client's, which Triton may
    map too), as /dev/shm paths: what a killed Triton leaves behind."""
    try:
        maps = Path(f"/proc/{triton_pid}/maps").read_text().splitlines()
    except OSError:  # gone already
        return set()
    return {line.split()[-1] for line in maps if "/dev/shm/triton_python_backend_shm_region_" in line}


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel before 5.3
        return False
    return True


def _die_with_parent() -> None:
    """In Triton's process before exec: SIGTERM it when kfdeploy serve dies (prctl PR_SET_PDEATHSIG),
    so that a killed server leaves no Triton behind holding the ports."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class ControlHandler(BaseHTTPRequestHandler):
    """GET /tasks, PUT|POST /tasks/NAME, DELETE /tasks/NAME, GET /stats; JSON answers."""

    server_version = "kfdeploy-control"
    served: "Server" = None  # set on the subclass the server makes

    def _answer(self, status: int, body: dict) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/tasks":
            return self._answer(200, self.served.describe_tasks())
        if self.path.rstrip("/") == "/stats":
            try:
                return self._answer(200, self.served.stats())
            except KfError as exc:
                return self._answer(503, {"error": str(exc)})
        self._answer(404, {"error": f"no such endpoint {self.path}; try GET /tasks, PUT or DELETE /tasks/NAME, GET /stats"})

    def _change(self, add: bool):
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "tasks" or not parts[1]:
            return self._answer(404, {"error": f"no such endpoint {self.path}; {'PUT' if add else 'DELETE'} /tasks/NAME"})
        served = self.served
        try:
            (served.add_task if add else served.remove_task)(parts[1])
        except KfError as exc:
            return self._answer(404, {"error": str(exc), **served.describe_tasks()})
        served.log(f"kfdeploy serve: {'added' if add else 'removed'} task {parts[1]!r} in {served.last_switch_ms:.0f} ms; "
                   f"serving {', '.join(served.tasks) or 'no task'}")
        self._answer(200, {**served.describe_tasks(), "switch_ms": served.last_switch_ms})

    def do_PUT(self):  # noqa: N802
        self._change(add=True)

    do_POST = do_PUT

    def do_DELETE(self):  # noqa: N802
        self._change(add=False)

    def log_message(self, *args) -> None:  # quiet: the server's own lines say what changed
        pass


class Server(ServedTasks):
    """A bundle served by a Triton process of its own, with a control endpoint beside it.
    The served set (TaskSelection's) changes by loading the model again in Triton."""

    def __init__(self, bundle, tasks: Optional[Sequence[str]] = None, host: str = "127.0.0.1", port: int = 8000,
                 grpc_port: Optional[int] = None, metrics_port: Optional[int] = None, control_port: Optional[int] = None,
                 control_host: str = "127.0.0.1", model_name: str = "kfdeploy", max_batch_size: Optional[int] = None,
                 max_queue_delay_us: int = SERVE_QUEUE_DELAY_US, dynamic_batching: bool = True,
                 drain_timeout_s: int = SERVE_DRAIN_TIMEOUT_S, threads: Optional[int] = None,
                 triton_log: Optional[Path] = None, log=None):
        self.triton_home = triton_folder()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        ports = {"--port": port, "--grpc-port": grpc_port, "--metrics-port": metrics_port, "--control-port": control_port}
        for flag, value in ports.items():
            if value is not None and not 1 <= value <= 65535:
                raise KfError(f"{flag} must be a port number (1-65535), got {value}")
        self.host, self.port = host, port
        self.grpc_port = grpc_port if grpc_port is not None else port + 1
        self.metrics_port = metrics_port if metrics_port is not None else port + 2
        self.control_port = control_port if control_port is not None else port + 3
        self.control_host = control_host
        if max_queue_delay_us < 0:
            raise KfError(f"--max-queue-delay-us must be 0 or more, got {max_queue_delay_us}")
        if drain_timeout_s < 1:
            raise KfError(f"--drain-timeout must be at least 1 second, got {drain_timeout_s}")
        # An assembly with no task builds no session: it brings the checks (checksums, trunk
        # fingerprints, tasks added to the bundle's folder since) before Triton is involved.
        self.model = load(bundle, tasks=[], threads=threads, log=self.log)
        batch_max = self.bundle.manifest["input"]["batch"]["max"]
        self.max_batch_size = max_batch_size or batch_max
        if not 1 <= self.max_batch_size <= batch_max:
            raise KfError(f"--max-batch-size must be between 1 and the bundle's batch maximum {batch_max}, got {max_batch_size}")
        self._init_selection()
        chosen = tuple(dict.fromkeys(tasks)) if tasks is not None else tuple(self.bundle.tasks)
        for task in chosen:
            self.check_task(task)
        self._state = (chosen, None)  # loaded when Triton starts
        self.model_name = model_name
        self.max_queue_delay_us = max_queue_delay_us
        self.dynamic_batching = dynamic_batching
        self.drain_timeout_s = drain_timeout_s
        self.threads = threads
        self.folder = Path(tempfile.mkdtemp(prefix="kfdeploy-serve-"))
        # beside the folder, not in it: the log outlives the repository, removed at the end
        self.triton_log = Path(triton_log) if triton_log else self.folder.with_name(self.folder.name + "-tritonserver.log")
        self.repository = self.folder / "repository"
        self.triton: Optional[subprocess.Popen] = None
        self._command: Sequence[str] = ()
        self._watching = False
        self._stubs: Dict[int, int] = {}  # pid -> pidfd of each stub watched, readable once it dies
        self.control: Optional[ThreadingHTTPServer] = None
        self._control_thread: Optional[threading.Thread] = None

    # -- the model Triton serves ------------------------------------------------------------
    def config(self, tasks: Sequence[str]) -> dict:
        """The model's config for a served set: every task of the bundle is an output (so a
        task added later needs no other client), the set itself a parameter the model reads."""
        bundle = self.bundle
        config = {
            "name": self.model_name, "backend": "python", "max_batch_size": self.max_batch_size,
            "input": [{"name": "image", "data_type": Enum("TYPE_FP32"), "dims": bundle.manifest["input"]["shape"][1:]}],
            "output": [{"name": t, "data_type": Enum("TYPE_FP32"), "dims": [bundle.task(t)["classes"]]} for t in bundle.tasks],
        }
        if self.dynamic_batching:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": self.max_queue_delay_us}
        config["instance_group"] = [{"count": 1, "kind": Enum("KIND_CPU")}]
        parameters = {
            "bundle": str(bundle.root), "tasks": json.dumps(list(tasks)), "threads": str(self.threads or ""),
            "labels": json.dumps({t: self.labels(t) for t in bundle.tasks}),
            "input_range": json.dumps(bundle.manifest["input"]["range"]),
            "outputs": "probabilities; logits with the request parameter logits=true",
        }
        config["parameters"] = ("map", {k: {"string_value": v} for k, v in parameters.items()})
        return config

    def _write_config(self, tasks: Sequence[str]) -> None:
        with atomic_write(self.repository / self.model_name / "config.pbtxt") as path:
            path.write_text(to_pbtxt(self.config(tasks)) + "\n")

    def _switch(self, tasks: Tuple[str, ...]) -> None:
        """Load the model again with `tasks` (TaskSelection's swap: Triton keeps answering with
        the loaded model until the new one is ready); an empty set is loaded too."""
        started = time.perf_counter()
        previous = self._state[0]
        self._write_config(tasks)
        try:
            self._triton_call("POST", f"/v2/repository/models/{self.model_name}/load", {})
        except KfError:
            self._write_config(previous)  # what Triton still serves
            raise
        self._state = (tasks, None)
        self.last_switch_ms = (time.perf_counter() - started) * 1e3

    def _triton_call(self, method: str, path: str, body: Optional[dict] = None, timeout: float = READY_TIMEOUT_S) -> dict:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        request = urllib.request.Request(f"http://{host}:{self.port}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            message = exc.read().decode(errors="replace")
            try:
                message = json.loads(message)["error"]
            except (ValueError, KeyError):
                pass
            raise KfError(f"Triton refused {method} {path}: {message}") from None
        except OSError as exc:
            raise KfError(f"Triton did not answer {method} {path}: {exc}") from None
        return json.loads(data) if data else {}

    def describe_tasks(self) -> dict:
        bundle = self.bundle
        return {"model": self.model_name, "served": self.tasks, "available": bundle.tasks,
                "labels": {t: self.labels(t) for t in bundle.tasks}}

    def stats(self) -> dict:
        """Triton's statistics of the model since it was last loaded: batches, requests, rows."""
        found = self._triton_call("GET", f"/v2/models/{self.model_name}/stats")["model_stats"]
        batches = sum(s["execution_count"] for s in found)
        succeeded = sum(s["inference_stats"]["success"]["count"] for s in found)
        failed = sum(s["inference_stats"]["fail"]["count"] for s in found)
        return {"batches": batches, "requests": succeeded + failed, "failed_requests": failed,
                "rows": sum(s["inference_count"] for s in found),
                "requests_per_batch": round((succeeded + failed) / batches, 3) if batches else None}

    # -- the process --------------------------------------------------------------------
    def start(self) -> None:
        """Open the control endpoint's port (a port in use fails before Triton starts), start
        Triton and wait for the model to be ready, then answer control calls."""
        handler = type("Handler", (ControlHandler,), {"served": self})
        with _port_refused("the control endpoint", self.control_host, self.control_port, "--control-port"):
            self.control = ThreadingHTTPServer((self.control_host, self.control_port), handler)
        self.control.daemon_threads = True
        # Triton binds its ports after loading the model, seconds later, and then only says so
        # in its log: a port in use is named here, before it starts (a race can still lose one)
        for what, port, flag in (("HTTP", self.port, "--port"), ("gRPC", self.grpc_port, "--grpc-port"),
                                 ("metrics", self.metrics_port, "--metrics-port")):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with _port_refused(f"Triton's {what} endpoint", self.host, port, flag), socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no conflict
                probe.bind((self.host, port))
        (self.repository / self.model_name / "1").mkdir(parents=True)
        (self.repository / self.model_name / "1" / "model.py").write_text(
            "# written by kfdeploy serve: the model is kfdeploy's own (kfdeploy/serving/serve_backend.py)\n"
            "from kfdeploy.serving.serve_backend import TritonPythonModel  # noqa: F401\n")
        self._write_config(self.tasks)
        self._command = [
            str(self.triton_home / "bin" / "tritonserver"), f"--model-repository={self.repository}",
            f"--backend-directory={backend_folder(self.triton_home, self.folder / 'backends')}",
            "--model-control-mode=explicit", f"--load-model={self.model_name}",
            f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
            f"--http-port={self.port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", f"--exit-timeout-secs={self.drain_timeout_s}", "--log-verbose=0",
        ]
        self._watching = _pidfd_works()
        dead = self._launch("w")
        if self._watching and not (dead or self._stubs):
            self._watching = False  # a Triton that runs its Python models some other way
        if not self._watching:
            self.log("kfdeploy serve: cannot watch the model's process (no pidfd, or no Python backend stub found); "
                     "should it die, requests will fail until kfdeploy serve is restarted")
        self._control_thread = threading.Thread(target=self.control.serve_forever, name="kfdeploy-control", daemon=True)
        self._control_thread.start()

    def _launch(self, log_mode: str) -> List[int]:
        """Start Triton (its log opened with `log_mode`), wait for the model, watch its stubs;
        returns the pids of stubs found dead."""
        with open(self.triton_log, log_mode) as out:
            # a session of its own: Ctrl-C reaches kfdeploy serve, which drains Triton once
            self.triton = subprocess.Popen(self._command, stdout=out, stderr=subprocess.STDOUT, env=triton_environment(self.triton_home),
                                           start_new_session=True, preexec_fn=_die_with_parent)
        self._wait_ready()
        return self._watch_stubs() if self._watching else []

    def _watch_stubs(self) -> List[int]:
        """A pidfd on each of Triton's live stubs (readable once it dies); returns the dead ones' pids."""
        self._unwatch()
        dead = []
        for pid, alive in child_processes(self.triton.pid, STUB_NAME).items():
            fd = None
            if alive:
                with contextlib.suppress(ProcessLookupError):  # gone since it was listed
                    fd = os.pidfd_open(pid)
            if fd is None:
                dead.append(pid)
            else:
                self._stubs[pid] = fd
        return dead

    def _unwatch(self) -> None:
        for fd in self._stubs.values():
            os.close(fd)
        self._stubs = {}

    def model_down(self, timeout: float) -> Optional[str]:
        """Wait up to `timeout` s for the model's process to die; why the model is down, or None.
        A task switch replaces the stub too: the model is down when no stub is left alive."""
        if not self._watching:
            time.sleep(timeout)
            return None
        died = select.select(list(self._stubs.values()), [], [], timeout)[0] if self._stubs else []
        if self._stubs and not died:
            return None
        dead = {pid for pid, fd in self._stubs.items() if fd in died}
        dead.update(self._watch_stubs())
        if self._stubs:
            return None
        pids = f", pid {', '.join(map(str, sorted(dead)))}" if dead else ""
        return f"the model's process died (Triton's Python backend stub{pids})"

    def restart(self, why: str) -> None:
        """Bring the model back after its process died: kill this Triton, whose dead model would
        never unload (see the module's docstring), and start another. Raises KfError when it
        cannot start, or its model dies before it is watched (a model that cannot live)."""
        with self._mutation:  # no task switch meanwhile: the new Triton loads the current config
            started = time.perf_counter()
            self._kill()
            try:
                self._launch("a")
                if not self._stubs:  # the last Triton's was watched, so this one's died already
                    raise KfError("the new model process died as soon as it was ready")
            except (KfError, OSError):
                self._kill()
                raise
        self.log(f"kfdeploy serve: {why}; started Triton again, the model answers again after "
                 f"{time.perf_counter() - started:.1f} s, serving {', '.join(self.tasks) or 'no task'}")

    def _kill(self) -> None:
        memory = stub_memory(self.triton.pid)
        self.triton.kill()
        self.triton.wait()
        for path in memory:
            Path(path).unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.triton.poll() is not None:
                raise KfError(f"Triton exited with code {self.triton.returncode} before the model was ready" + self._log_tail())
            try:
                # briefly: whatever holds the port if Triton lost it may never answer
                self._triton_call("GET", f"/v2/models/{self.model_name}/ready", timeout=2)
                return
            except KfError:
                time.sleep(0.2)
        raise KfError(f"the model was not ready within {READY_TIMEOUT_S} s" + self._log_tail())

    def _log_tail(self, lines: int = 8) -> str:
        if not self.triton_log.exists():
            return ""
        tail = self.triton_log.read_text(errors="replace").strip().splitlines()[-lines:]
        return f"; the end of its log {self.triton_log}:\n  " + "\n  ".join(tail)

    def describe(self) -> str:
        served = self.tasks
        others = [t for t in self.bundle.tasks if t not in served]
        batching = (f"dynamic batching up to {self.max_batch_size} rows, queue delay {self.max_queue_delay_us} us"
                    if self.dynamic_batching else f"no dynamic batching (requests up to {self.max_batch_size} rows)")
        return "\n".join([
            f"kfdeploy serve: model {self.model_name!r} on Triton, serving {', '.join(served) or 'no task'}"
            + (f" (also in the bundle: {', '.join(others)})" if others else ""),
            f"  HTTP     http://{self.host}:{self.port}/v2/models/{self.model_name}  (infer, config, ready, stats)",
            f"  gRPC     {self.host}:{self.grpc_port}",
            f"  metrics  http://{self.host}:{self.metrics_port}/metrics",
            f"  control  http://{self.control_host}:{self.control_port}/tasks  (GET; PUT or DELETE /tasks/NAME; GET /stats)",
            f"  {batching}; SIGTERM or Ctrl-C drains in-flight requests (up to {self.drain_timeout_s} s) and exits",
            f"  Triton's log: {self.triton_log}",
        ])

    def stop(self) -> int:
        """Stop taking control calls; SIGTERM Triton, which refuses new requests, answers those
        in flight (up to --drain-timeout) and exits. Returns Triton's exit code."""
        if self.control is not None:
            if self._control_thread is not None:  # shutdown() waits for serve_forever: forever, had it not begun
                self.control.shutdown()
            self.control.server_close()
        self._unwatch()
        code = 0
        if self.triton is not None:
            if self.triton.poll() is None:
                self.triton.send_signal(signal.SIGTERM)
            try:
                code = self.triton.wait(self.drain_timeout_s + 30)
            except subprocess.TimeoutExpired:
                self.triton.kill()
                code = self.triton.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        return code


@contextlib.contextmanager
def _port_refused(what: str, host: str, port: int, flag: str):
    """Turn a failure to bind `host:port` into the one-line error that names the flag to change."""
    try:
        yield
    except OSError as exc:
        raise KfError(f"cannot open {what} on {host}:{port} ({exc.strerror}); choose another {flag}") from None


def run(server: Server, ready=None) -> int:
    """Start `server`, serve until SIGTERM/SIGINT (or until Triton dies), drain, stop.
    Returns the exit code: 0 when Triton answered what was in flight and exited cleanly."""
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        server.log(server.describe())
        if ready is not None:
            ready()
        failed = None
        while not received and server.triton.poll() is None:
            why = server.model_down(timeout=0.5)  # also how often a signal is looked for
            if why is not None:
                try:
                    server.restart(why)
                except (KfError, OSError) as exc:  # OSError: no tritonserver to start any more
                    failed = f"kfdeploy serve: {why}, and it could not be brought back ({exc}); exiting for a supervisor to restart"
                    break
        died = not received
        server.log(failed or ("kfdeploy serve: Triton stopped on its own; shutting down" if died
                              else f"kfdeploy serve: {received[0]}: draining in-flight requests, then stopping"))
        started = time.perf_counter()
        code = server.stop()
        server.log(f"kfdeploy serve: Triton exited with code {code} after {time.perf_counter() - started:.1f} s; "
                   f"its log: {server.triton_log}")
        return 0 if code == 0 and not died else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
