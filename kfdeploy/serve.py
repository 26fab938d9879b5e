"""`kfdeploy serve`: a bundle on a real Triton Inference Server, through PyTriton.

    kfdeploy serve bundles/sprites [--tasks shape,scale] [--port 8000] [--grpc-port 8001]

PyTriton's wheel ships Triton (Python backend only); the served model, `kfdeploy` unless
`--model-name` says otherwise, is a Python-backend model whose requests PyTriton hands to
this process, where kfdeploy's runtime answers them (kfdeploy/routing.py: one ONNX Runtime
session, the trunk once per dynamic batch, each task on the rows that asked for it).

The protocol is Triton's (KServe v2, HTTP and gRPC):
- input `image`: FP32 [batch, C, H, W] in the manifest's range;
- one output per task of the bundle, named after it: probabilities [batch, classes], or
  logits with the request parameter `logits: true`. A request asks for tasks by asking for
  those outputs; a request that names no output (or all of them) gets every served task.
  Outputs of tasks that are not served now are refused;
- labels, per task, are in the model's config (`GET /v2/models/kfdeploy/config`, parameter
  `labels`, a JSON object), and in the control endpoint.
Triton's health (`/v2/health/ready`), metadata and Prometheus metrics endpoints are
Triton's own. A control endpoint (HTTP, 127.0.0.1 unless `--control-host`) adds and removes
served tasks while requests keep being answered: `GET /tasks`, `PUT /tasks/NAME`,
`DELETE /tasks/NAME`, and `GET /stats` (batches, requests and rows answered).

Facts about PyTriton 0.7 (Triton 2.51) that shape this module, measured here:
- the Python stub links the first libpython it finds; when that is the system's and not the
  interpreter's own, model loading fails ("'_thread.RLock' object has no attribute
  '_recursion_count'"), so LD_LIBRARY_PATH gets this interpreter's LIBDIR first;
- TritonConfig's addresses default to 0.0.0.0: every one is set here (127.0.0.1 by default);
- the server gets SIGTERM when the thread that started it exits, so the main thread starts
  it and lives as long as it;
- an inference callable answers a whole batch or fails it whole: PyTriton has no error per
  request. Triton itself refuses, per request, a wrong shape, dtype or batch size, an empty
  batch and an output (task) the model does not have; what only kfdeploy can check (NaN,
  values out of range, a task not served now) fails the batch the request is in, naming the
  request, and good requests that were batched with it get the same error. Rare by design
  (a client sending NaN), but a limit: a client may retry such a failure.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .errors import KfError
from .extras import require
from .routing import RequestsError, Router

DEFAULT_QUEUE_DELAY_US = 500
DEFAULT_DRAIN_TIMEOUT_S = 30


def _use_own_libpython() -> None:
    """Put this interpreter's libpython first for the Python stub Triton starts (see above)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not Path(libdir).is_dir():
        return
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if current.split(":")[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


class Stats:
    """What the inference callable has done: batches, requests, rows; failed batches."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batches = self.requests = self.rows = self.failed_batches = self.running = 0

    def as_dict(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "requests": self.requests, "rows": self.rows,
                    "failed_batches": self.failed_batches, "running": self.running,
                    "requests_per_batch": round(self.requests / self.batches, 3) if self.batches else None}


class KfdeployModel:
    """The inference callable PyTriton calls with each dynamic batch (undecorated, so each
    request's `requested_output_names` reach it: that is how a request names its tasks)."""

    def __init__(self, router: Router, model_name: str):
        self.router = router
        self.model_name = model_name
        self.outputs = set(router.bundle.tasks)
        self.stats = Stats()

    def __call__(self, requests) -> List[dict]:
        stats = self.stats
        with stats._lock:
            stats.running += 1
        try:
            parsed = []
            for request in requests:
                names = list(request.requested_output_names or ())
                tasks = None if not names or set(names) == self.outputs else names
                logits = (request.parameters or {}).get("logits", False)
                parsed.append((request["image"], tasks, logits))
            try:
                answers = self.router.run_requests(parsed)
            except RequestsError as exc:
                with stats._lock:
                    stats.failed_batches += 1
                alone = "" if exc.count == 1 else (" (PyTriton answers a batch with one error: the other requests "
                                                   "batched with it got it too and may be retried)")
                raise KfError(f"kfdeploy: {exc}{alone}") from None
            with stats._lock:
                stats.batches += 1
                stats.requests += len(requests)
                stats.rows += sum(len(p[0]) for p in parsed)
            return answers
        finally:
            with stats._lock:
                stats.running -= 1


class ControlHandler(BaseHTTPRequestHandler):
    """GET /tasks, PUT|POST /tasks/NAME, DELETE /tasks/NAME, GET /stats; JSON answers."""

    server_version = "kfdeploy-control"
    model: KfdeployModel = None  # set on the subclass the server makes

    def _answer(self, status: int, body: dict) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _tasks(self) -> dict:
        router = self.model.router
        return {"model": self.model.model_name, "served": router.tasks, "available": router.bundle.tasks,
                "labels": {t: router.labels(t) for t in router.bundle.tasks}}

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/tasks":
            return self._answer(200, self._tasks())
        if self.path.rstrip("/") == "/stats":
            return self._answer(200, self.model.stats.as_dict())
        self._answer(404, {"error": f"no such endpoint {self.path}; try GET /tasks, PUT or DELETE /tasks/NAME, GET /stats"})

    def _change(self, add: bool):
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "tasks" or not parts[1]:
            return self._answer(404, {"error": f"no such endpoint {self.path}; {'PUT' if add else 'DELETE'} /tasks/NAME"})
        router = self.model.router
        try:
            (router.add_task if add else router.remove_task)(parts[1])
        except KfError as exc:
            return self._answer(404, {"error": str(exc), **self._tasks()})
        print(f"kfdeploy serve: {'added' if add else 'removed'} task {parts[1]!r} in {router.last_switch_ms:.0f} ms; "
              f"serving {', '.join(router.tasks) or 'no task'}", file=sys.stderr, flush=True)
        self._answer(200, {**self._tasks(), "switch_ms": router.last_switch_ms})

    def do_PUT(self):  # noqa: N802
        self._change(add=True)

    do_POST = do_PUT

    def do_DELETE(self):  # noqa: N802
        self._change(add=False)

    def log_message(self, *args) -> None:  # quiet: the server's own lines say what changed
        pass


class Server:
    """A bundle served by Triton through PyTriton, with a control endpoint beside it."""

    def __init__(self, bundle, tasks: Optional[Sequence[str]] = None, host: str = "127.0.0.1", port: int = 8000,
                 grpc_port: Optional[int] = None, metrics_port: Optional[int] = None, control_port: Optional[int] = None,
                 control_host: str = "127.0.0.1", model_name: str = "kfdeploy", max_batch_size: Optional[int] = None,
                 max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, dynamic_batching: bool = True,
                 drain_timeout_s: int = DEFAULT_DRAIN_TIMEOUT_S, threads: Optional[int] = None,
                 triton_log: Optional[Path] = None, log=None):
        require("pytriton", "serve")
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
        self.router = Router(bundle, tasks=tasks, threads=threads, log=self.log)
        manifest = self.router.bundle.manifest
        batch_max = manifest["input"]["batch"]["max"]
        self.max_batch_size = max_batch_size or batch_max
        if not 1 <= self.max_batch_size <= batch_max:
            raise KfError(f"--max-batch-size must be between 1 and the bundle's batch maximum {batch_max}, got {max_batch_size}")
        self.model_name = model_name
        self.max_queue_delay_us = max_queue_delay_us
        self.dynamic_batching = dynamic_batching
        self.drain_timeout_s = drain_timeout_s
        self.model = KfdeployModel(self.router, model_name)
        # Triton's own log goes to a file (PyTriton would echo every line to stdout)
        self.triton_log = Path(triton_log) if triton_log else Path(tempfile.mkdtemp(prefix="kfdeploy-serve-")) / "tritonserver.log"
        self.triton = None
        self.control = None

    def start(self, also=None) -> None:
        """Start Triton (from this thread, which must outlive it) and the control endpoint.
        `also(triton)`, if given, binds more models before Triton starts (benchmarks/serve.py
        binds a no-op model beside ours, to measure the server's own floor)."""
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        # The control endpoint first: a port already taken fails before Triton starts, and it
        # answers by the time Triton reports ready.
        handler = type("Handler", (ControlHandler,), {"model": self.model})
        try:
            self.control = ThreadingHTTPServer((self.control_host, self.control_port), handler)
        except OSError as exc:
            raise KfError(f"cannot open the control endpoint on {self.control_host}:{self.control_port} ({exc.strerror}); "
                          "choose another --control-port") from None
        self.control.daemon_threads = True
        threading.Thread(target=self.control.serve_forever, name="kfdeploy-control", daemon=True).start()
        for name in ("pytriton", "sh"):
            logging.getLogger(name).setLevel(logging.ERROR)  # their INFO lines bury ours; errors still show
        _use_own_libpython()
        bundle = self.router.bundle
        shape = tuple(bundle.manifest["input"]["shape"][1:])
        config = TritonConfig(
            http_address=self.host, http_port=self.port, grpc_address=self.host, grpc_port=self.grpc_port,
            metrics_address=self.host, metrics_port=self.metrics_port, allow_metrics=True,
            exit_timeout_secs=self.drain_timeout_s, log_verbose=0, log_file=self.triton_log)
        self.triton = Triton(config=config)
        batcher = DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us) if self.dynamic_batching else None
        self.triton.bind(
            model_name=self.model_name, infer_func=self.model,
            inputs=[Tensor(name="image", dtype=np.float32, shape=shape)],
            outputs=[Tensor(name=task, dtype=np.float32, shape=(bundle.task(task)["classes"],)) for task in bundle.tasks],
            config=ModelConfig(batching=True, max_batch_size=self.max_batch_size, batcher=batcher), strict=False)
        self._describe_in_config()
        if also is not None:
            also(self.triton)
        self.triton.run()

    def _describe_in_config(self) -> None:
        """Labels and the input's range into the model config's parameters, where clients read
        them (`GET /v2/models/NAME/config`). PyTriton has no API for parameters of one's own:
        this sets them on the config it is about to load (its private model registry)."""
        bundle = self.router.bundle
        parameters = {
            "labels": json.dumps({t: bundle.task(t)["labels"] for t in bundle.tasks}),
            "input_range": json.dumps(bundle.manifest["input"]["range"]),
            "outputs": "probabilities; logits with the request parameter logits=true",
        }
        try:
            model = next(m for m in self.triton._model_manager.models if m.model_name == self.model_name)
            model._get_triton_model_config().backend_parameters.update(parameters)
        except (AttributeError, StopIteration) as exc:  # a PyTriton whose internals moved: serve without them
            self.log(f"warning: labels are not in the model config ({type(exc).__name__}); GET /tasks on the control endpoint has them")

    def describe(self) -> str:
        served = self.router.tasks
        others = [t for t in self.router.bundle.tasks if t not in served]
        batching = (f"dynamic batching up to {self.max_batch_size} rows, queue delay {self.max_queue_delay_us} us"
                    if self.dynamic_batching else f"no dynamic batching (requests up to {self.max_batch_size} rows)")
        return "\n".join([
            f"kfdeploy serve: model {self.model_name!r} on Triton (PyTriton), serving {', '.join(served) or 'no task'}"
            + (f" (also in the bundle: {', '.join(others)})" if others else ""),
            f"  HTTP     http://{self.host}:{self.port}/v2/models/{self.model_name}  (infer, config, ready)",
            f"  gRPC     {self.host}:{self.grpc_port}",
            f"  metrics  http://{self.host}:{self.metrics_port}/metrics",
            f"  control  http://{self.control_host}:{self.control_port}/tasks  (GET; PUT or DELETE /tasks/NAME; GET /stats)",
            f"  {batching}; SIGTERM or Ctrl-C drains in-flight requests (up to {self.drain_timeout_s} s) and exits",
            f"  Triton's log: {self.triton_log}",
        ])

    def alive(self) -> bool:
        return self.triton is not None and self.triton.is_alive()

    def stop(self) -> bool:
        """Stop taking control calls, let Triton finish what is in flight, stop it. True when
        no batch was cut off."""
        if self.control is not None:
            self.control.shutdown()
            self.control.server_close()
        if self.triton is not None:
            self.triton.stop()
        return self.model.stats.running == 0


def run(server: Server, ready=None, also=None) -> int:
    """Start `server` (`also`: see Server.start), serve until SIGTERM/SIGINT (or until Triton
    dies), drain, stop. Returns the exit code: 0 when every request in flight at the signal
    was answered."""
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start(also)
        except KfError:
            raise
        except Exception as exc:  # PyTriton's own errors (a port in use, Triton failing to start)
            if server.control is not None:
                server.control.shutdown()
                server.control.server_close()
            try:
                if server.triton is not None:
                    server.triton.stop()  # and off its atexit hook, which would fail again, louder
            except Exception:  # noqa: BLE001 - the error worth reporting is the one above
                pass
            tail = server.triton_log.read_text(errors="replace").strip().splitlines()[-5:] if server.triton_log.exists() else []
            raise KfError(f"Triton did not start ({type(exc).__name__}: {exc})"
                          + (f"; the end of its log {server.triton_log}:\n  " + "\n  ".join(tail) if tail else "")) from None
        server.log(server.describe())
        if ready is not None:
            ready()
        died = False
        while not stop.wait(0.5):
            if not server.alive():
                died = True
                break
        if died:
            server.log("kfdeploy serve: Triton stopped on its own; shutting down")
        else:
            server.log(f"kfdeploy serve: {received[0]}: draining in-flight requests, then stopping")
        started = time.perf_counter()
        drained = server.stop()
        stats = server.model.stats.as_dict()
        server.log(f"kfdeploy serve: stopped in {time.perf_counter() - started:.1f} s; answered {stats['requests']} "
                   f"request(s) in {stats['batches']} batch(es)" + ("" if drained else "; a batch was cut off"))
        return 0 if drained and not died else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
