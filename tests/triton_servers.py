"""Real Triton servers for the serving tests, in the environment that serving needs.

PyTriton 0.7 pins numpy<2, and the rest of the suite runs on numpy 2 (gradio's pandas needs
it), so the server side runs in an environment of its own: the Python named by
$KFDEPLOY_SERVE_PYTHON, else this interpreter when it has PyTriton, else `.venv-serve/`
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
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
_PROBE = ("import json, sys, sysconfig, pathlib, pytriton; "
          "site = pathlib.Path(pytriton.__file__).parents[1]; "
          "print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'), 'site': str(site), "
          "'version': f'{sys.version_info[0]}.{sys.version_info[1]}', 'bin': str(pathlib.Path(sys.executable).parent)}))")


@functools.cache
def serve_env() -> Optional[dict]:
    """Where the serving environment is: its python, site-packages, libpython's folder; or None."""
    candidates = [os.environ.get("KFDEPLOY_SERVE_PYTHON"), sys.executable, str(REPO / ".venv-serve" / "bin" / "python")]
    for python in filter(None, candidates):
        if not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return {"python": python, **json.loads(probe.stdout)}
    return None


def need_serve_env() -> dict:
    env = serve_env()
    if env is None:
        why = ("no Python with PyTriton (pip install -e '.[cpu,serve]' in a venv of its own, then set "
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
    """The tritonserver binary that PyTriton's wheel ships, on a model repository, in explicit
    model-control mode with every model loaded; yields its HTTP and gRPC addresses.

    That build has the Python backend only, so it serves `--backend python` repositories.
    Its backend folder is assembled as PyTriton does it: libtriton_python.so plus the stub
    built for the serving environment's Python version.
    """
    env = need_serve_env()
    site = Path(env["site"])
    backends = tmp_path / "backends" / "python"
    backends.mkdir(parents=True)
    for item in (site / "pytriton" / "tritonserver" / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy(item, backends)
    shutil.copy(site / "pytriton" / "tritonserver" / "python_backend_stubs" / env["version"] / "triton_python_backend_stub", backends)
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "tritonserver.log"
    run_env = {**os.environ,
               # the stub embeds the serving environment's Python (found on PATH) and must link its libpython
               "PATH": f"{env['bin']}:{os.environ['PATH']}",
               "LD_LIBRARY_PATH": f"{env['libdir']}:{site / 'nvidia_pytriton.libs'}"}
    command = [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"), f"--model-repository={repository}",
               f"--backend-directory={tmp_path / 'backends'}", "--model-control-mode=explicit", "--load-model=*",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
               f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--exit-timeout-secs=5",
               *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=run_env)
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
        # PyTriton loads the model once the server is up: its readiness is the model's
        wait_ready(f"http://127.0.0.1:{http}", process, 180, "kfdeploy serve", log, path="/v2/models/kfdeploy/ready")
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "metrics": f"127.0.0.1:{metrics}",
               "control": f"127.0.0.1:{control}", "process": process, "log": log}
    finally:
        stop(process)
