"""`kfdeploy serve`: a bundle on a real Triton (the binary nvidia-pytriton ships), driven over
loopback with tritonclient (HTTP and gRPC), every answer checked against kfdeploy.load here."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import kfdeploy
from conftest import REPO, add_on_disk
from triton_servers import free_ports, kfdeploy_serve, need_serve_env, needs_serve_env

http = pytest.importorskip("tritonclient.http", reason="tritonclient (the dev extra) is missing")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient (the dev extra) is missing")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
QUIET = {"log": lambda line: None}
SERVED = ["shape", "scale", "pos_x"]
MAX_BATCH = 16


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    # Served from a folder whose name is not ASCII: Triton's Python stub runs with an ASCII
    # filesystem encoding, which once made such a bundle "no bundle at"
    folder = tmp_path_factory.mktemp("serve")
    served = folder / "bündel é"
    shutil.copytree(bundle, served)
    # a long queue delay, so that concurrent requests are batched together
    with kfdeploy_serve(served, folder, "--tasks", ",".join(SERVED),
                        "--max-batch-size", str(MAX_BATCH), "--max-queue-delay-us", "20000", "--drain-timeout", "10") as running:
        yield running


@pytest.fixture(scope="module")
def reference(bundle):
    return kfdeploy.load(bundle, **QUIET)


def images(count, seed=0):
    return np.random.default_rng(seed).random((count, 1, 64, 64), dtype=np.float32)


def infer(client, x, tasks=None, datatype="FP32", **kwargs):
    """One request through either client; returns {output: array} of what came back."""
    module = grpc if isinstance(client, grpc.InferenceServerClient) else http
    image = module.InferInput("image", list(x.shape), datatype)
    image.set_data_from_numpy(x)
    outputs = [module.InferRequestedOutput(t) for t in tasks] if tasks else None
    result = client.infer("kfdeploy", [image], outputs=outputs, **kwargs)
    names = [o.name for o in result.get_response().outputs] if module is grpc else [o["name"] for o in result.get_response()["outputs"]]
    return {name: result.as_numpy(name) for name in names}


def client_for(server, protocol):
    return http.InferenceServerClient(server["http"]) if protocol == "http" else grpc.InferenceServerClient(server["grpc"])


def control(server, method, path):
    request = urllib.request.Request(f"http://{server['control']}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def listening_addresses(port: int) -> set:
    """The local addresses a TCP port listens on, from /proc/net/tcp and tcp6 (gRPC may open
    an IPv6 socket for 127.0.0.1: it shows as the IPv4-mapped ::ffff:127.0.0.1)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            words = [address[i:i + 8] for i in range(0, len(address), 8)]  # little-endian 32-bit words
            raw = b"".join(bytes.fromhex(word)[::-1] for word in words)
            if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
                raw = raw[12:]  # IPv4-mapped
            found.add(".".join(map(str, raw)) if len(raw) == 4 else raw.hex())
    return found


@needs_serve_env
def test_triton_endpoints_answer_on_loopback_only(server, bundle):
    for key in ("http", "grpc", "metrics", "control"):
        assert listening_addresses(int(server[key].rsplit(":", 1)[1])) == {"127.0.0.1"}, key
    client = http.InferenceServerClient(server["http"])
    assert client.is_server_ready() and client.is_model_ready("kfdeploy")
    metadata = client.get_model_metadata("kfdeploy")
    tasks = kfdeploy.load(bundle, tasks=[], **QUIET).bundle.tasks
    assert [o["name"] for o in metadata["outputs"]] == tasks  # every task of the bundle can be served
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 64, 64]}]
    config = client.get_model_config("kfdeploy")
    labels = json.loads(config["parameters"]["labels"]["string_value"])
    assert labels == {t: kfdeploy.load(bundle, tasks=[], **QUIET).labels(t) for t in tasks}
    assert config["max_batch_size"] == MAX_BATCH and config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    infer(client, images(1))
    with urllib.request.urlopen(f"http://{server['metrics']}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert any(line.startswith('nv_inference_request_success{model="kfdeploy"') for line in metrics.splitlines())
    status, body = control(server, "GET", "/tasks")
    assert status == 200 and body["served"] == SERVED and body["labels"]["shape"] == labels["shape"]
    client.close()


@needs_serve_env
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_are_kfdeploy_loads(server, reference, protocol):
    client = client_for(server, protocol)
    x = images(3, 1)
    expected, expected_logits = reference(x), reference(x, logits=True)
    everything = infer(client, x)
    assert sorted(everything) == sorted(SERVED)  # no output named: every served task
    for task, scores in everything.items():
        np.testing.assert_allclose(scores, expected[task], rtol=1e-5, atol=1e-6)
    only = infer(client, x, ["pos_x"])
    assert list(only) == ["pos_x"]
    np.testing.assert_allclose(only["pos_x"], expected["pos_x"], rtol=1e-5, atol=1e-6)
    logits = infer(client, x, ["shape", "scale"], parameters={"logits": True})
    for task in ("shape", "scale"):
        np.testing.assert_allclose(logits[task], expected_logits[task], rtol=1e-5, atol=1e-5)
    client.close()


@needs_serve_env
def test_concurrent_requests_for_different_task_sets_are_batched_and_each_answered_right(server, reference):
    """Eight threads, each with its own client (HTTP and gRPC), send interleaved requests
    asking for different task sets; every answer matches kfdeploy.load on its images, and
    Triton formed batches of several requests (the trunk ran once for each)."""
    task_sets = [["shape"], ["scale", "pos_x"], None, ["pos_x"], ["shape", "scale"]]
    _, before = control(server, "GET", "/stats")
    barrier, failures, answered = threading.Barrier(8), [], []

    def worker(index):
        client = http.InferenceServerClient(server["http"]) if index % 2 else grpc.InferenceServerClient(server["grpc"])
        try:
            barrier.wait(60)
            for step in range(10):
                tasks = task_sets[(index + step) % len(task_sets)]
                x = images(1 + (index + step) % 3, seed=100 * index + step)
                answer = infer(client, x, tasks)
                expected = reference(x)
                assert sorted(answer) == sorted(tasks or SERVED)
                for task, scores in answer.items():
                    np.testing.assert_allclose(scores, expected[task], rtol=1e-5, atol=1e-6)
                answered.append(1)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            failures.append(f"worker {index}: {exc!r}"[:500])
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures, failures
    assert len(answered) == 80
    _, after = control(server, "GET", "/stats")
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 80 and batches < requests, (requests, batches)  # several requests per batch


@needs_serve_env
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "NaN", "unknown task", "task not served", "empty batch",
                                  "oversized batch", "logits not a boolean"])
def test_bad_requests_get_an_error_naming_the_problem_and_the_next_request_is_answered(server, reference, case, protocol):
    client = client_for(server, protocol)
    x = images(2, 5)
    attempt = {
        "wrong shape": lambda: infer(client, images(2)[:, :, :32]),
        "wrong dtype": lambda: infer(client, x.astype(np.float64), datatype="FP64"),
        "NaN": lambda: infer(client, np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x).astype(np.float32)),
        "unknown task": lambda: infer(client, x, ["colour"]),
        "task not served": lambda: infer(client, x, ["orientation"]),
        "empty batch": lambda: infer(client, images(0)),
        "oversized batch": lambda: infer(client, images(MAX_BATCH + 1)),
        "logits not a boolean": lambda: infer(client, x, ["shape"], parameters={"logits": "yes"}),
    }[case]
    named = {
        "wrong shape": r"unexpected shape for input 'image' for model 'kfdeploy'. Expected \[-1,1,64,64\], got \[2,1,32,64\]",
        "wrong dtype": r"inference input 'image' data-type is 'FP64', but model 'kfdeploy' expects 'FP32'",
        "NaN": r"kfdeploy: images contain NaN or infinite values",
        "unknown task": r"unexpected inference output 'colour' for model 'kfdeploy'",
        "task not served": r"kfdeploy: task 'orientation' is not served; served: shape, scale, pos_x",
        "empty batch": r"input byte size mismatch for input 'image' for model 'kfdeploy'",
        "oversized batch": rf"inference request batch-size must be <= {MAX_BATCH} for 'kfdeploy'",
        "logits not a boolean": r"kfdeploy: logits must be true or false, got 'yes'",
    }[case]
    with pytest.raises(InferenceServerException, match=named):
        attempt()
    answer = infer(client, x, ["shape"])
    np.testing.assert_allclose(answer["shape"], reference(x)["shape"], rtol=1e-5, atol=1e-6)
    client.close()


@needs_serve_env
def test_a_nan_request_batched_with_good_ones_fails_alone(server, reference):
    """Six clients send at once (one with a NaN pixel) until Triton puts all six in one
    dynamic batch: the NaN request gets its error, the five others their answers."""
    good = [images(1 + i % 2, seed=200 + i) for i in range(5)]
    nan = images(1, 7)
    nan[0, 0, 3, 5] = np.nan
    for round_ in range(10):
        barrier, results = threading.Barrier(6), {}

        def send(i):
            # a client of its own thread: the HTTP client's gevent hub belongs to the thread that
            # made it, and a later round's thread cannot use one from a thread that has exited
            client = client_for(server, "grpc" if i % 2 else "http")
            barrier.wait(60)
            try:
                results[i] = infer(client, nan if i == 5 else good[i], ["shape", "pos_x"])
            except Exception as exc:  # noqa: BLE001 - checked below, whatever it is
                results[i] = exc
            client.close()

        _, before = control(server, "GET", "/stats")
        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        _, after = control(server, "GET", "/stats")
        assert isinstance(results[5], InferenceServerException) and "kfdeploy: images contain NaN or infinite values" in str(results[5])
        for i in range(5):
            assert isinstance(results[i], dict), results[i]
            expected = reference(good[i])
            for task in ("shape", "pos_x"):
                np.testing.assert_allclose(results[i][task], expected[task], rtol=1e-5, atol=1e-6)
        if (after["batches"] - before["batches"], after["requests"] - before["requests"]) == (1, 6):
            break
    else:
        pytest.fail("Triton never batched the six requests together in 10 rounds")


@needs_serve_env
def test_tasks_are_added_and_removed_live_without_dropping_requests(server, reference):
    x = images(2, 9)
    expected = reference(x)
    stop_event, failures, count = threading.Event(), [], [0]

    def caller():
        client = grpc.InferenceServerClient(server["grpc"])
        while not stop_event.is_set():
            try:
                np.testing.assert_allclose(infer(client, x, ["shape"])["shape"], expected["shape"], rtol=1e-5, atol=1e-6)
                count[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                failures.append(repr(exc)[:300])
        client.close()

    thread = threading.Thread(target=caller)
    thread.start()
    client = http.InferenceServerClient(server["http"])
    try:
        for _ in range(3):
            status, body = control(server, "PUT", "/tasks/pos_y")
            assert status == 200 and body["served"] == [*SERVED, "pos_y"] and body["switch_ms"] > 0
            np.testing.assert_allclose(infer(client, x, ["pos_y"])["pos_y"], expected["pos_y"], rtol=1e-5, atol=1e-6)
            status, body = control(server, "DELETE", "/tasks/pos_y")
            assert status == 200 and body["served"] == SERVED
    finally:
        stop_event.set()
        thread.join(60)
    assert not failures, failures
    assert count[0] > 0
    with pytest.raises(InferenceServerException, match="task 'pos_y' is not served"):
        infer(client, x, ["pos_y"])
    client.close()
    status, body = control(server, "DELETE", "/tasks/pos_y")
    assert status == 404 and body["error"] == "task 'pos_y' is not served; served: shape, scale, pos_x"
    status, body = control(server, "PUT", "/tasks/colour")
    assert status == 404 and body["error"].startswith("unknown task 'colour' in bundle")


@needs_serve_env
def test_a_task_added_to_the_bundle_on_disk_since_start_is_served_without_a_restart(live, bundle, tmp_path):
    """`kfdeploy add-task` while serving: loading the model again declares the new output."""
    with kfdeploy_serve(live, tmp_path, name="added") as running:
        client = grpc.InferenceServerClient(running["grpc"])
        add_on_disk(bundle, live)
        status, body = control(running, "PUT", "/tasks/pos_x")
        assert status == 200 and body["served"] == ["shape", "scale", "pos_x"], body
        assert [o.name for o in client.get_model_metadata("kfdeploy").outputs] == ["shape", "scale", "pos_x"]
        x = images(3, 4)
        np.testing.assert_allclose(infer(client, x, ["pos_x"])["pos_x"], kfdeploy.load(live, **QUIET)(x)["pos_x"], rtol=1e-5, atol=1e-6)
        client.close()


@needs_serve_env
def test_sigterm_drains_in_flight_requests_and_exits_0(bundle, tmp_path, reference):
    with kfdeploy_serve(bundle, tmp_path, "--tasks", "shape", name="drain") as running:
        x = images(256, 3)  # the bundle's largest batch: each takes a while on 2 cores
        expected = reference(x, tasks=["shape"])["shape"]
        results, started = [], threading.Barrier(5)

        def worker():
            client = http.InferenceServerClient(running["http"], network_timeout=120)
            started.wait(60)
            try:
                results.append(infer(client, x, ["shape"])["shape"])
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                results.append(exc)
            client.close()

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        started.wait(60)
        time.sleep(0.3)  # the requests are in Triton now
        running["process"].send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        code = running["process"].wait(120)
    assert len(results) == 4
    for result in results:
        assert isinstance(result, np.ndarray), result
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    log = running["log"].read_text()
    assert code == 0, log[-3000:]
    assert "SIGTERM: draining in-flight requests" in log and "Triton exited with code 0" in log


RECOVERY_S = 30  # measured 3-5 s on 2 cores; the rest is room for a busy CI machine


def readiness(address: str) -> tuple:
    """(model ready, server ready) as a load balancer's probe sees them: no answer is not ready."""
    states = []
    for path in ("/v2/models/kfdeploy/ready", "/v2/health/ready"):
        try:
            with urllib.request.urlopen(f"http://{address}{path}", timeout=2) as response:
                states.append(response.status == 200)
        except OSError:  # refused, timed out, or an HTTP error status
            states.append(False)
    return tuple(states)


@needs_serve_env
def test_a_killed_model_process_is_reported_unready_and_brought_back(bundle, tmp_path, reference):
    """The OOM killer's SIGKILL on Triton's Python stub while a client sends a request every
    10 ms: readiness says so at once, the model answers again within RECOVERY_S, no request
    hangs, one line says what happened, and the server still stops cleanly."""
    from kfdeploy.serving.serve import STUB_NAME, child_processes, stub_memory

    x = images(1, 5)
    expected = reference(x, tasks=["shape"])["shape"]
    with kfdeploy_serve(bundle, tmp_path, "--tasks", "shape", name="stub") as running:
        (triton,) = child_processes(running["process"].pid, "tritonserver")
        (stub,) = child_processes(triton, STUB_NAME)
        memory = stub_memory(triton)
        calls, crashed, stop_calling = [], [], threading.Event()  # calls: (started, seconds, answer or exception)

        def caller():
            try:
                client = http.InferenceServerClient(running["http"], connection_timeout=10, network_timeout=10)
                while not stop_calling.is_set():
                    started = time.monotonic()
                    try:
                        answer = infer(client, x, ["shape"])["shape"]
                    except Exception as exc:  # noqa: BLE001 - refused or failed while the model is down: checked below
                        answer = exc
                    calls.append((started, time.monotonic() - started, answer))
                    time.sleep(0.01)
                client.close()
            except BaseException as exc:  # noqa: BLE001 - the test fails on it below
                crashed.append(exc)

        thread = threading.Thread(target=caller)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not any(isinstance(answer, np.ndarray) for *_, answer in calls) and time.monotonic() < deadline and not crashed:
                time.sleep(0.05)
            killed = time.monotonic()
            os.kill(stub, signal.SIGKILL)
            samples = []  # (when, model ready, server ready)
            while time.monotonic() < killed + RECOVERY_S:
                samples.append((time.monotonic(), *readiness(running["http"])))
                if any(not any(s[1:]) for s in samples) and all(samples[-1][1:]):
                    break
                time.sleep(0.02)
            ready_again = samples[-1][0] if all(samples[-1][1:]) else None
            settled = time.monotonic() + 1  # then some more calls, answered, and probes, all ready
            while time.monotonic() < settled:
                samples.append((time.monotonic(), *readiness(running["http"])))
                time.sleep(0.02)
        finally:
            stop_calling.set()
            thread.join(60)
        assert not thread.is_alive() and not crashed, crashed
        unready = next((when for when, *states in samples if not any(states)), None)
        assert unready is not None and unready - killed < 1, f"readiness kept saying ready: {samples[:5]}"
        assert ready_again is not None, f"not ready again within {RECOVERY_S} s: {samples[-3:]}\n{running['log'].read_text()[-3000:]}"
        assert all(not any(states) for when, *states in samples if unready <= when < ready_again), "readiness flapped while down"
        assert all(all(states) for when, *states in samples if when >= ready_again), "readiness flapped once back"
        assert max(seconds for _, seconds, _ in calls) < 5, "a request hung"
        after = [answer for started, _, answer in calls if started >= ready_again]
        assert after and all(isinstance(answer, np.ndarray) for answer in after), [a for a in after if not isinstance(a, np.ndarray)][:3]
        for answer in after:
            np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
        print(f"stub killed: not ready after {unready - killed:.2f} s, ready and answering again after {ready_again - killed:.1f} s; "
              f"{sum(not isinstance(a, np.ndarray) for *_, a in calls)} of {len(calls)} requests failed meanwhile")
        running["process"].send_signal(signal.SIGTERM)
        code = running["process"].wait(60)
    log = running["log"].read_text()
    lines = [line for line in log.splitlines() if "the model's process died" in line]
    assert len(lines) == 1 and f"pid {stub})" in lines[0] and "the model answers again after" in lines[0], log[-3000:]
    assert code == 0, log[-3000:]
    assert memory and not any(Path(path).exists() for path in memory), f"the dead stub's shared memory was left behind: {memory}"


@needs_serve_env
def test_a_model_that_cannot_be_brought_back_makes_serve_exit_1(bundle, tmp_path):
    """Where the model cannot come back (here its bundle is gone from disk), kfdeploy serve
    exits non-zero, promptly, for a supervisor to restart it, and says why."""
    from kfdeploy.serving.serve import STUB_NAME, child_processes

    served = shutil.copytree(bundle, tmp_path / "served")
    with kfdeploy_serve(served, tmp_path, "--tasks", "shape", name="gone") as running:
        (triton,) = child_processes(running["process"].pid, "tritonserver")
        (stub,) = child_processes(triton, STUB_NAME)
        shutil.rmtree(served)
        os.kill(stub, signal.SIGKILL)
        code = running["process"].wait(RECOVERY_S + 30)
    log = running["log"].read_text()
    assert code == 1, log[-3000:]
    assert (f"kfdeploy serve: the model's process died (Triton's Python backend stub, pid {stub}), and it could not be "
            "brought back (Triton exited with code 1 before the model was ready") in log, log[-3000:]
    assert "exiting for a supervisor to restart" in log


@needs_serve_env
def test_serve_refuses_mistakes_in_one_line_before_starting(bundle, tmp_path):
    env = need_serve_env()
    for args, message in [
        (["--tasks", "shape,colour"], "unknown task 'colour' in bundle"),
        (["--port", "70000"], "--port must be a port number (1-65535), got 70000"),
        (["--max-batch-size", "100000"], "--max-batch-size must be between 1 and the bundle's batch maximum"),
        (["--max-queue-delay-us", "-5"], "--max-queue-delay-us must be 0 or more, got -5"),
    ]:
        result = subprocess.run([env["python"], "-m", "kfdeploy", "serve", str(bundle), *args], capture_output=True,
                                text=True, timeout=120, cwd=REPO)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("kfdeploy: error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


@needs_serve_env
def test_a_port_in_use_is_named_before_triton_starts(bundle):
    env = need_serve_env()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # holds the port and never answers, as a stuck program would
        port = taken.getsockname()[1]
        flags = ("--port", "--grpc-port", "--metrics-port", "--control-port")
        for flag in flags:
            # every other port free, so that only the taken one can be named (not a default in use)
            ports = {**dict(zip(flags, free_ports(len(flags)))), flag: port}
            result = subprocess.run([env["python"], "-m", "kfdeploy", "serve", str(bundle), "--tasks", "shape",
                                     *(arg for pair in ports.items() for arg in map(str, pair))],
                                    capture_output=True, text=True, timeout=120, cwd=REPO)
            assert result.returncode == 2, (flag, result.stderr)
            lines = [line for line in result.stderr.splitlines() if line.startswith("kfdeploy: error:")]
            assert len(lines) == 1 and f":{port} (Address already in use); choose another {flag}" in lines[0], (flag, result.stderr)


@needs_serve_env
def test_a_triton_that_cannot_start_is_reported_not_waited_on(bundle):
    """The control endpoint is open when Triton fails to start: stopping must not wait for
    it to serve (it did, forever: socketserver's shutdown() waits for serve_forever)."""
    env = need_serve_env()
    script = ("import sys; from pathlib import Path; from kfdeploy.serving.serve import Server, run\n"
              "server = Server(sys.argv[1], tasks=['shape'], port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), "
              "metrics_port=int(sys.argv[4]), control_port=int(sys.argv[5]))\n"
              "server.triton_home = Path(sys.argv[6])  # no tritonserver there\n"
              "run(server)\n")
    result = subprocess.run([env["python"], "-c", script, str(bundle), *map(str, free_ports(4)), str(REPO / "no-triton-here")],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1 and "FileNotFoundError" in result.stderr and "no-triton-here" in result.stderr, result.stderr


def test_without_pytriton_serve_names_the_extra(bundle):
    import importlib.util

    if importlib.util.find_spec("pytriton") is not None:
        pytest.skip("PyTriton is installed in this environment")
    result = subprocess.run([sys.executable, "-m", "kfdeploy", "serve", str(bundle)], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "kfdeploy: error: pytriton is not installed: pip install 'kfdeploy[serve]'"
