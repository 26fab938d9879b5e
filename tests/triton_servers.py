"""Real Triton servers for the serving tests, in the environment that serving needs.

nvidia-pytriton 0.7, whose wheel ships the Triton server, pins numpy<2, and the rest of the
suite runs on numpy 2 (gradio's pandas needs it), so the server side runs in an environment
of its own: the Python named by $KFDEPLOY_SERVE_PYTHON, else this interpreter when it has
nvidia-pytriton, else one the tests make once and keep between runs: a venv under
~/.cache/kfdeploy-tests/ (or $XDG_CACHE_HOME) with what `pip install ".[cpu,serve]"`
installs besides kfdeploy itself, read from setup.cfg (a changed requirement makes a new
one). kfdeploy comes from this checkout (PYTHONPATH), so one cached environment serves
every checkout. The tests talk to the server over loopback with tritonclient from this
environment, and compare its answers with `kfdeploy.load` here, so the runtime is checked
under both numpy versions.

Tests that need it carry @needs_serve_env: conftest.py finds or makes the environment before
any of their fixtures is set up. Where it cannot be made (no package index), they are
skipped saying why, except under CI (CI=true), where they fail: CI must run them.
"""
from __future__ import annotations

import configparser
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_serve_env = pytest.mark.serve_env  # conftest.py makes or finds the environment before the fixtures
_PROBE = "from kfdeploy.serving.serve import triton_folder; triton_folder()"  # nvidia-pytriton's server is there
# What kfdeploy serve gives the binary (kfdeploy/serving/serve.py): a backend folder, the stub's environment
_SETUP = ("import json, pathlib, sys; from kfdeploy.serving.serve import backend_folder, triton_environment, triton_folder; "
          "home = triton_folder(); backend_folder(home, pathlib.Path(sys.argv[1])); env = triton_environment(home); "
          "print(json.dumps({'binary': str(home / 'bin' / 'tritonserver'), "
          "'env': {k: env[k] for k in ('PATH', 'LD_LIBRARY_PATH', 'PYTHONPATH')}}))")
_COMPLETE = ".kfdeploy-complete"  # written last: a venv without it was interrupted and is made again


def serve_requirements() -> List[str]:
    """What `pip install ".[cpu,serve]"` installs besides kfdeploy, from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    wanted = [config["options"]["install_requires"]] + [config["options.extras_require"][e] for e in ("cpu", "serve")]
    return sorted(line.strip() for text in wanted for line in text.splitlines() if line.strip())


def cached_serve_env_folder() -> Path:
    requirements = serve_requirements()
    key = hashlib.sha256(json.dumps([list(sys.version_info[:2]), requirements]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kfdeploy-tests" / f"serve-env-{key}"


def _make_serve_env(home: Path) -> Tuple[Optional[Path], str]:
    """The cached environment's python, made first if it is not there; or None and why not."""
    python = home / "bin" / "python"
    if (home / _COMPLETE).exists():
        return python, ""
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be making it: wait for that one
        if (home / _COMPLETE).exists():
            return python, ""
        print(f"\nmaking the serving tests' environment in {home} (once; kept for later runs)", flush=True)
        shutil.rmtree(home, ignore_errors=True)
        steps = [[sys.executable, "-m", "venv", str(home)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *serve_requirements()]]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
            except subprocess.TimeoutExpired:
                return None, f"`{' '.join(step[:4])} ...` took more than 30 minutes"
            if done.returncode:
                last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                return None, f"`{' '.join(step[:4])} ...` failed: {last}"
        (home / _COMPLETE).write_text(" ".join(serve_requirements()) + "\n")
    return python, ""


def _has_pytriton(python: str) -> bool:
    return subprocess.run([python, "-c", _PROBE], capture_output=True, timeout=120, cwd=REPO).returncode == 0


@functools.cache
def serve_env() -> Tuple[Optional[dict], str]:
    """The serving environment's python ({"python": path}), or None and why there is none."""
    for python in filter(None, [os.environ.get("KFDEPLOY_SERVE_PYTHON"), sys.executable]):
        if Path(python).exists() and _has_pytriton(python):
            return {"python": python}, ""
    home = cached_serve_env_folder()
    python, why = _make_serve_env(home)
    if python is None:
        return None, f"no serving environment: making one in {home} failed ({why})"
    if not _has_pytriton(str(python)):
        return None, f"the serving environment in {home} cannot import nvidia-pytriton's server; delete the folder to remake it"
    return {"python": str(python)}, ""


def need_serve_env() -> dict:
    env, why = serve_env()
    if env is None:
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
    setup = subprocess.run([env["python"], "-c", _SETUP, str(tmp_path / "backends")], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
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
