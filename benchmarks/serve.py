"""Serving benchmark: `kfdeploy serve` under a bounded local load, against its ceilings.

    python benchmarks/serve.py --bundle runs/quickstart/bundle     # in the serve environment

Runs in an environment with the serve extra (nvidia-pytriton's tritonserver, tritonclient;
numpy<2). It starts the server in a child process (`--child`: kfdeploy.serving.serve.Server, plus a
no-op Python-backend model loaded beside kfdeploy's, the server's own floor), then drives it
from this process over loopback with tritonclient's asyncio gRPC client, the cheapest
client measured here (tritonclient.http's async_infer spaces requests ~10 ms apart, so it
never forms batches; a synchronous client per thread costs ~40% more CPU a request, taken
from the server). Every load is bounded: --requests per level and round and --seconds per
level, whichever ends first. Each level also reports the CPU time a request cost the
client and the server (its whole process tree): on two shared cores, that is where the
throughput goes.

Measured, for batch-1 requests at concurrency 1, 4, 16, 64, with dynamic batching on and
off (the server restarted between the two):
- single: every request asks for the same task set (all served tasks);
- mixed:  requests cycle through five different task sets;
- noop:   the no-op model (concurrency 1 and 16): what Triton and its Python backend cost
          by themselves (same input, outputs and batching; it answers zeros);
plus single at concurrency 1 and 16 (and noop at 1) for each of --sweep-delays, what the
queue delay trades (a lone request waits it out; under load, requests queue while a batch
runs and are batched with no delay); and, in this process, `kfdeploy.load` called one
image at a time and on batches of 8 and 16 (the ceilings: the model alone, unbatched and
batched; a served rate can approach them, not pass them), and what answering a mixed batch
costs with the routed composition (kfdeploy/serving/routing.py: the trunk once, each task on
its rows) against grouping rows by task set and running each group's composition, timed in
turns. Writes results/serve-<device>.json. Client and server share this machine's cores:
run it alone, and read the numbers as the whole system's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from kfdeploy.serving import SERVE_QUEUE_DELAY_US
from rates import time_in_turns

RESULTS = Path(__file__).resolve().parent / "results"
TASK_SETS = [["shape"], ["scale", "pos_x"], ["orientation"], ["pos_x", "pos_y"], None]  # None: all served
CONCURRENCY = (1, 4, 16, 64)


NOOP_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import json
        self.classes = {o["name"]: o["dims"][0] for o in json.loads(args["model_config"])["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().shape[0]
            names = request.requested_output_names() or list(self.classes)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(t, np.zeros((rows, self.classes[t]), np.float32)) for t in names]))
        return responses
"""


def child(args) -> int:
    """The server: kfdeploy's model, and a no-op model with its config loaded beside it."""
    from kfdeploy.serving.serve import Server, run
    from kfdeploy.serving.triton_repo import to_pbtxt

    server = Server(args.bundle, port=args.port, max_queue_delay_us=args.queue_delay_us,
                    dynamic_batching=not args.no_dynamic_batching, drain_timeout_s=5)

    def load_noop():
        config = {**server.config(server.tasks), "name": "noop"}
        del config["parameters"]
        (server.repository / "noop" / "1").mkdir(parents=True)
        (server.repository / "noop" / "1" / "model.py").write_text(NOOP_MODEL)
        (server.repository / "noop" / "config.pbtxt").write_text(to_pbtxt(config) + "\n")
        load = urllib.request.Request(f"http://127.0.0.1:{args.port}/v2/repository/models/noop/load", data=b"{}", method="POST")
        urllib.request.urlopen(load, timeout=120).close()

    return run(server, ready=load_noop)


def consecutive_free_ports(count: int = 4) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1 now (HTTP, gRPC, metrics, control)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise SystemExit("no 4 consecutive free ports on 127.0.0.1")


def start_server(args, delay_us):
    """The server in a child process; `delay_us` None: no dynamic batching."""
    port = consecutive_free_ports()
    command = [sys.executable, __file__, "--child", "--bundle", str(args.bundle), "--port", str(port),
               "--queue-delay-us", str(delay_us or 0)] + ([] if delay_us is not None else ["--no-dynamic-batching"])
    log = open(RESULTS / f".serve-benchmark-{port}.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log.name}")
        try:
            ready = all(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{m}/ready", timeout=2).status == 200
                        for m in ("kfdeploy", "noop"))
            if ready:
                return process, port, Path(log.name)
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server was not ready within 180 s")


def stop_server(process) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(root: int) -> float:
    """CPU time used so far by process `root` and every process under it (Linux /proc)."""
    parents, used = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry)], used[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def load(port: int, model: str, concurrency: int, requests: int, seconds: float, task_sets, server_pid: int) -> dict:
    """`requests` batch-1 requests kept `concurrency` in flight by as many coroutines on one
    asyncio gRPC client; stops early after `seconds`. Returns requests/s, latency
    percentiles, and the CPU time per request of this client and of the server (the
    server's in /proc's 10 ms ticks: coarse for one round, so levels add up their rounds).

    Client and server share two cores, so what the client costs is taken from the server:
    measured at concurrency 16 on the no-op model, a synchronous gRPC client per thread
    cost 166-183 us of CPU a request, an HTTP one 178-190 us, this one 127-132 us."""
    import asyncio

    import tritonclient.grpc.aio as grpc

    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    latencies, errors = [], []
    counter = iter(range(requests))

    async def generate():
        client = grpc.InferenceServerClient(f"127.0.0.1:{port + 1}")
        image = grpc.InferInput("image", [1, 1, 64, 64], "FP32")
        image.set_data_from_numpy(x)
        deadline = time.perf_counter() + seconds

        async def worker():
            for index in counter:
                if time.perf_counter() >= deadline:
                    break
                tasks = task_sets[index % len(task_sets)] if task_sets else None
                outputs = [grpc.InferRequestedOutput(t) for t in tasks] if tasks else None
                started = time.perf_counter()
                try:
                    await client.infer(model, [image], outputs=outputs, client_timeout=60)
                    latencies.append(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(str(exc)[:200])

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await client.close()

    client_cpu, server_cpu, started = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    asyncio.run(generate())
    elapsed = time.perf_counter() - started
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu
    ms = sorted(1e3 * v for v in latencies)
    answered = max(len(ms), 1)
    return {"concurrency": concurrency, "requests": len(ms), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(elapsed, 2), "requests_per_s": round(len(ms) / elapsed, 1),
            "p50_ms": round(ms[len(ms) // 2], 3) if ms else None, "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3) if ms else None,
            "cpu_us_per_request": {"client": round(1e6 * client_cpu / answered), "server": round(1e6 * server_cpu / answered)},
            "cpu_seconds": {"client": client_cpu, "server": server_cpu}}


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port + 3}/stats", timeout=10) as response:
        return json.loads(response.read())


def in_process(bundle: Path, seconds: float) -> dict:
    """The ceilings, in this process: kfdeploy.load one image at a time, and on batches of 8
    and 16 (what the model alone can do once batches form: no client, no server); and routed
    vs grouped mixed batches."""
    import kfdeploy
    from kfdeploy.serving.routing import Router

    quiet = {"log": lambda line: None}
    model = kfdeploy.load(bundle, **quiet)
    images = np.random.default_rng(1).random((64, 1, 64, 64), dtype=np.float32)
    batches = (1, 8, 16)
    took = time_in_turns({rows: lambda rows=rows: model(images[:rows]) for rows in batches}, seconds)
    result = {"load_batch1": {"requests_per_s": round(1 / took[1], 1), "p50_ms": round(1e3 * took[1], 3)},
              "load_batched_images_per_s": {str(rows): round(rows / took[rows], 1) for rows in batches[1:]},
              "load_cpu_us_per_image": {}}
    for rows in batches:  # process time: both of ONNX Runtime's threads, spinning included
        calls = max(10, round(seconds / took[rows]))
        cpu = time.process_time()
        for _ in range(calls):
            model(images[:rows])
        result["load_cpu_us_per_image"][str(rows)] = round(1e6 * (time.process_time() - cpu) / (calls * rows))
    router = Router(bundle, **quiet)
    served = router.tasks
    # grouping: each task set's own composition, made beforehand (as a cache would hold it)
    groups = {tuple(t or served): kfdeploy.load(bundle, tasks=list(t or served), **quiet) for t in TASK_SETS}
    comparison = []
    for rows in (4, 16, 64):
        requests = [(images[i:i + 1], TASK_SETS[i % len(TASK_SETS)], False) for i in range(rows)]

        def grouped():
            by_set = {}
            for i, (_, tasks, _) in enumerate(requests):
                by_set.setdefault(tuple(tasks or served), []).append(i)
            for key, index in by_set.items():
                groups[key](images[index])

        # in turns, each long enough for the other's thread pools to fall asleep first
        took = time_in_turns({"routed": lambda: router.run_requests(requests), "grouped": grouped}, seconds)
        comparison.append({"rows": rows, "task_sets": len(TASK_SETS), "routed_ms": round(1e3 * took["routed"], 3),
                           "grouped_ms": round(1e3 * took["grouped"], 3),
                           "grouped_over_routed": round(took["grouped"] / took["routed"], 2)})
    result["mixed_batch_routed_vs_grouped"] = comparison
    return result


def measure(args, delay_us, plan, key: str) -> dict:
    """Start a server with this queue delay (None: no dynamic batching) and run each load of
    `plan` (name, model, task sets, concurrencies) on it, --rounds times in turn: this VM's
    speed drifts 10-20% within seconds, so a level measured once against a level measured a
    minute later says more about the drift than about the levels. Each level reports its
    median round (by requests/s) and every round's rate."""
    process, port, log = start_server(args, delay_us)
    try:
        rounds = {}
        load(port, "kfdeploy", 4, 100, 10, None, process.pid)  # warm-up
        for round_index in range(args.rounds):
            for name, model, sets, concurrencies in plan:
                for concurrency in concurrencies:
                    before = stats(port)
                    level = load(port, model, concurrency, args.requests, args.seconds, sets, process.pid)
                    if model == "kfdeploy":
                        after = stats(port)
                        batches = after["batches"] - before["batches"]
                        level["requests_per_batch"] = round((after["requests"] - before["requests"]) / batches, 2) if batches else None
                    rounds.setdefault((name, concurrency), []).append(level)
                    print(f"{key:20} round {round_index + 1} {name:6} c={concurrency:<3} {level['requests_per_s']:8.1f} req/s  "
                          f"p50 {level['p50_ms']} ms  p99 {level['p99_ms']} ms  {level.get('requests_per_batch', '')} req/batch  "
                          f"cpu/request client {level['cpu_us_per_request']['client']} us server "
                          f"{level['cpu_us_per_request']['server']} us  errors {level['errors']}", flush=True)
        levels = {}
        for (name, _), measured in rounds.items():
            ranked = sorted(measured, key=lambda level: level["requests_per_s"])
            answered = max(1, sum(level["requests"] for level in measured))
            levels.setdefault(name, []).append({
                **ranked[len(ranked) // 2], "errors": sum(level["errors"] for level in measured),
                "rounds_requests_per_s": [level["requests_per_s"] for level in measured],
                "rounds_p50_ms": [level["p50_ms"] for level in measured],
                "cpu_us_per_request": {side: round(1e6 * sum(level["cpu_seconds"][side] for level in measured) / answered)
                                       for side in ("client", "server")}})
        return levels
    finally:
        stop_server(process)
        log.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=400, help="requests per load level and round (default 400)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of every load level, in turn (default 8)")
    parser.add_argument("--seconds", type=float, default=15, help="time limit per load level (default 15)")
    parser.add_argument("--queue-delay-us", type=int, default=SERVE_QUEUE_DELAY_US,
                        help=f"dynamic batching's queue delay (default kfdeploy serve's, {SERVE_QUEUE_DELAY_US})")
    parser.add_argument("--sweep-delays", type=lambda v: [int(d) for d in v.split(",") if d], default=[250, 500, 1000, 2000],
                        help="queue delays (us) to measure at concurrency 1 and 16 besides the default (default 250,500,1000,2000)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-dynamic-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    RESULTS.mkdir(exist_ok=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                          "note": "client threads and server share these cores"},
              "bundle": str(args.bundle), "queue_delay_us": args.queue_delay_us, "served": {}}
    full = [("noop", "noop", None, (1, 16)), ("single", "kfdeploy", None, CONCURRENCY), ("mixed", "kfdeploy", TASK_SETS, CONCURRENCY)]
    report["served"]["dynamic_batching"] = measure(args, args.queue_delay_us, full, "dynamic_batching")
    report["served"]["no_dynamic_batching"] = measure(args, None, full, "no_dynamic_batching")
    # what the queue delay trades: a lone request waits it out; does batching under load gain?
    report["queue_delay_sweep"] = {
        delay: measure(args, delay, [("noop", "noop", None, (1,)), ("single", "kfdeploy", None, (1, 16))], f"delay {delay} us")
        for delay in args.sweep_delays}
    report["in_process"] = in_process(args.bundle, args.seconds / 3)
    print(json.dumps(report["in_process"], indent=1))
    dyn = report["served"]["dynamic_batching"]
    noop = {lv["concurrency"]: lv for lv in dyn["noop"]}
    single = {lv["concurrency"]: lv for lv in dyn["single"]}
    mixed = {lv["concurrency"]: lv for lv in dyn["mixed"]}
    batched = report["in_process"]["load_batched_images_per_s"]["16"]
    # What concurrency 16 could reach on these cores: the model alone on batches of 16 if
    # client and server cost nothing, or with what they cost on the no-op model added
    both = 1 / (1 / batched + 1 / noop[16]["requests_per_s"])
    def per_round(numerator, denominator, key="rounds_requests_per_s", combine=lambda a, b: a / b):
        """Median and range over rounds of a comparison of two levels measured in the same
        round: seconds apart, so both met the same one of this VM's speeds (a steady load
        here runs at either of two speeds ~1.6x apart, switching every few seconds)."""
        values = sorted(combine(a, b) for a, b in zip(numerator[key], denominator[key]))
        return {"median": round(statistics.median(values), 3), "range": [round(values[0], 3), round(values[-1], 3)]}

    report["goals"] = {
        "c16_over_c1_throughput (>= 3)": per_round(single[16], single[1]),
        "c16_over_c1_bound_by_the_model_alone": round(batched / single[1]["requests_per_s"], 2),
        "c16_over_c1_bound_by_the_model_plus_the_noop_floor": round(both / single[1]["requests_per_s"], 2),
        "single_over_mixed_throughput_c16 (<= 1.3)": per_round(single[16], mixed[16]),
        "p50_c1_minus_noop_ms (<= 1)": per_round(single[1], noop[1], "rounds_p50_ms", lambda a, b: a - b),
    }
    print(json.dumps(report["goals"], indent=1))
    out = RESULTS / "serve-cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
