"""Real Triton servers for the serving tests, in the environment that serving needs.

nvidia-pytriton 0.7, whose wheel ships the Triton server, pins numpy<2, and the rest of the
suite runs on numpy 2 (gradio's pandas needs it), so the server side runs in an environment
of its own: the Python named by $KFDEPLOY_SERVE_PYTHON, else this interpreter when it has
nvidia-pytriton, else `.venv-serve/`
in the checkout (`.ci/run` makes it: `pip install -e ".[cpu,serve]"`). The tests talk to it
over loopback with tritonclient from this environment, and compare its answers with
`kfdeploy.load` here, so the runtime is checked under both numpy versions.

Without such an environment the serving tests are skipped, except under CI (CI=true),
where they fail: CI must run them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
_PROBE = "from kfdeploy.serving.serve import triton_folder; triton_folder()"  # nvidia-pytriton's server is there
# What kfdeploy serve gives the binary (kfdeploy/serving/serve.py): a backend folder, the stub's environment
_SETUP = ("import json, pathlib, sys; from kfdeploy.serving.serve import backend_folder, triton_environment, triton_folder; "
          "home = triton_folder(); backend_folder(home, pathlib.Path(sys.argv[1])); env = triton_environment(home); "
          "print(json.dumps({'binary': str(home / 'bin' / 'tritonserver'), "
          "'env': {k: env[k] for k in ('PATH', 'LD_LIBRARY_PATH', 'PYTHONPATH')}}))")


@functools.cache
def serve_env() -> Optional[dict]:
    """The serving environment's python, or None."""
    candidates = [os.environ.get("KFDEPLOY_SERVE_PYTHON"), sys.executable, str(REPO / ".venv-serve" / "bin" / "python")]
    for python in filter(None, candidates):
        if not Path(python).exists():
            continue
        if subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=120).returncode == 0:
            return {"python": python}
    return None


def need_serve_env() -> dict:
    env = serve_env()
    if env is None:
        why = ("no Python with nvidia-pytriton (pip install -e '.[cpu,serve]' in a venv of its own, then set "
               "KFDEPLOY_SERVE_PYTHON to its python, or make .venv-serve/ as .ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(f"serving tests must run in CI: {why}")
        pytest.skip(why)
    return env


def free_ports(count: int) -> List[int]:
    """Ports free on 127.0.0.1 right now (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_ready(url: str, process: subprocess.Popen, timeout: float, what: str, log: Path, path: str = "/v2/health/ready") -> None:
    """Poll a readiness endpoint of Triton's until it answers 200 (or the process dies)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode} before it was ready:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{what} was not ready within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@contextlib.contextmanager
def tritonserver(repository: Path, tmp_path: Path, extra: List[str] = ()) -> Iterator[Dict[str, str]]:
    """The tritonserver binary that nvidia-pytriton's wheel ships, on a model repository, in
    explicit model-control mode with every model loaded, started as `kfdeploy serve` starts
    it; yields its HTTP and gRPC addresses. That build has the Python backend only, so it
    serves `--backend python` repositories.
    """
    env = need_serve_env()
    setup = subprocess.run([env["python"], "-c", _SETUP, str(tmp_path / "backends")], capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr
    triton = json.loads(setup.stdout)
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "tritonserver.log"
    command = [triton["binary"], f"--model-repository={repository}",
               f"--backend-directory={tmp_path / 'backends'}", "--model-control-mode=explicit", "--load-model=*",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
               f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--exit-timeout-secs=5",
               *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **triton['env']})
    try:
        wait_ready(f"http://127.0.0.1:{http}", process, 120, "tritonserver", log)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "log": str(log)}
    finally:
        stop(process)


@contextlib.contextmanager
def kfdeploy_serve(bundle: Path, tmp_path: Path, *args: str, name: str = "serve") -> Iterator[dict]:
    """`kfdeploy serve BUNDLE` in the serving environment on free loopback ports; yields the
    addresses and the process (a test may signal it itself)."""
    env = need_serve_env()
    http, grpc, metrics, control = free_ports(4)
    log = tmp_path / f"{name}.log"
    command = [env["python"], "-m", "kfdeploy", "serve", str(bundle), "--port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--control-port", str(control), *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # the server is up before the model is loaded: its readiness is the model's
        wait_ready(f"http://127.0.0.1:{http}", process, 180, "kfdeploy serve", log, path="/v2/models/kfdeploy/ready")
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "metrics": f"127.0.0.1:{metrics}",
               "control": f"127.0.0.1:{control}", "process": process, "log": log}
    finally:
        stop(process)
