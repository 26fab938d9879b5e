"""Runtime benchmark: what composing factor modules costs and saves, all in one run.

    python benchmarks/runtime.py --bundle runs/quickstart/bundle

For k = 1..5 selected tasks, at batch 1 (latency) and batch 64 (throughput):
- assembly          kfdeploy.load(bundle, tasks) called as apps call it: probabilities,
                    input validation included (one composed ONNX Runtime session)
- fused             a plain session on the save_fused graph of the same tasks, configured
                    like the assembly's (threads, no arena), asked for the same outputs
- independent       k separate factor networks, each a full trunk + its task
- teacher           the monolithic 5-task teacher as one ONNX graph (same cost for any k)
- torch eager       the same trunk + k tasks in PyTorch
Ratios are to the assembly, each measured with the variant and the assembly taking turns
(time_in_turns): this VM drifts 10-20% within seconds, which timing one after the other
turned into differences of that size. Also, with all tasks selected: add_task/remove_task
latency (composing anew, and switching back to a cached composition), the longest call
while 100 add/remove cycles run beside a caller thread, the assembly next to an app's own
default ONNX Runtime session, achieved GFLOP/s at batch 64 against a large SGEMM's rate,
and resident memory for 0..5 tasks and after 1, 100 and 200 add/remove cycles. Writes
results/runtime-<device>.json and .png. Run it alone: another busy process on 2 cores
distorts everything.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import kfdeploy
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.extras import pyplot
from kfdeploy.training.data import SpritesSource
from kfdeploy.bundling.export import ExportProfile, TrunkGraph, _quiet_export, torch_modules
from kfdeploy.bundling.fuse import Composer, probs_output
from kfdeploy.training.runs import load_teacher
from kfdeploy.runtime import ort_session_for, physical_cores
from rates import time_in_turns

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64)


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds x 2 of the Conv2d and Linear layers for one image."""
    macs = []

    def conv(m, inp, out):
        macs.append(out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    def linear(m, inp, out):
        macs.append(m.in_features * m.out_features)

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module(*inputs)
    for h in hooks:
        h.remove()
    return 2 * sum(macs)


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (where there is one), with its family and
    widest vector unit: results say which machine they come from, and cloud VMs name two
    generations alike ("AMD EPYC" has been an AVX2 Zen and an AVX-512 Zen 5 here)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    if not model:
        return platform.processor() or platform.machine()
    family = re.search(r"cpu family\s*:\s*(\d+)", info)
    flags_line = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model.group(1).strip()} (family {family.group(1) if family else '?'}, {vector})"


def cpu_peak_gflops() -> dict:
    """cores x clock x FMA width: 2 flops x fp32 lanes x FMA ports per core.

    Server Xeons with AVX-512 have two FMA ports (one assumed measured 194 GFLOP/s, above
    its 'peak'); AVX2-only parts are counted with two as well, the common case. AMD before
    Zen 5 (family 0x1A) runs 512-bit operations on 256-bit units, so 8 lanes per port.
    The clock is the one /proc/cpuinfo reports; in a VM that is the nominal clock, and a
    core that boosts beats this "peak", so a large matrix multiply's rate is measured too.
    """
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)]
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    family = re.search(r"cpu family\s*:\s*(\d+)", info)
    if "AuthenticAMD" in info and family and int(family.group(1)) < 0x1A:
        lanes = min(lanes, 8)
    clock_ghz = max(mhz) / 1000 if mhz else float("nan")
    cores = physical_cores()
    ports = 2
    return {"cpu": cpu_model(), "cores": cores, "clock_ghz": clock_ghz,
            "fp32_lanes": lanes, "fma_ports": ports, "peak_gflops": cores * clock_ghz * 2 * lanes * ports,
            "sgemm_gflops": sgemm_gflops()}


def sgemm_gflops(n: int = 4096, seconds: float = 2.0) -> float:
    """What PyTorch's large float32 matrix multiply reaches here: a practical ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / time_in_turns({"sgemm": lambda: a @ b}, seconds, turn_seconds=seconds / 2)["sgemm"] / 1e9


def alike_session(model: bytes):
    """A plain ONNX Runtime session configured the way the assembly configures its own."""
    return ort_session_for(model, ["CPUExecutionProvider"], physical_cores())


def default_session(path: Path):
    """A session as an app makes one with ONNX Runtime's defaults (its pool spins after runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1)) / 1024


MEMORY_PROBE = """
import json, sys, numpy as np, onnxruntime, kfdeploy
sys.path.insert(0, {bench!r})
from runtime import rss_mb
x = np.zeros((64, 1, 64, 64), np.float32)
base = rss_mb()
model = kfdeploy.load({bundle!r}, tasks=[], log=lambda s: None)
call = lambda: (model(x[:1]), model(x))  # both sizes, as a live app sees them
call()
rows = [{{"tasks": 0, "rss_mb": rss_mb() - base}}]
for task in {tasks!r}:
    model.add_task(task)
    call()
    rows.append({{"tasks": len(model.tasks), "rss_mb": rss_mb() - base}})
last = {tasks!r}[-1]
for cycle in range(1, 201):  # the first cycle caches the 4-task composition beside the 5-task one
    model.remove_task(last)
    model.add_task(last)
    call()
    if cycle in (1, 100, 200):
        rows.append({{"tasks": len(model.tasks), "after_cycles": cycle, "rss_mb": rss_mb() - base}})
print(json.dumps(rows))
"""


def memory_growth(bundle: Path, tasks) -> list:
    """Resident memory above an idle ONNX Runtime process with 0..k tasks, then after 1, 100
    and 200 remove/add cycles of the last task (measured in a fresh process)."""
    code = MEMORY_PROBE.format(bench=str(Path(__file__).parent), bundle=str(bundle), tasks=list(tasks))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def switch_latency(bundle: Bundle, cycles: int = 50) -> dict:
    """add_task/remove_task wall time with all tasks selected: composing anew (cache_size=0)
    and switching back to a recently used composition (the default cache)."""
    result = {}
    for label, cache_size in (("composed anew", 0), ("cached", 4)):
        model = kfdeploy.load(bundle, cache_size=cache_size, log=lambda s: None)
        last, times = bundle.tasks[-1], {"remove_task": [], "add_task": []}
        for _ in range(cycles):
            for name, step in (("remove_task", model.remove_task), ("add_task", model.add_task)):
                started = time.perf_counter()
                step(last)
                times[name].append(time.perf_counter() - started)
        result[label] = {name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)} for name, v in times.items()}
    return result


def calls_during_churn(bundle: Bundle, x: np.ndarray, cycles: int = 100) -> dict:
    """Call latency in one thread while another runs add/remove cycles (each composing anew),
    against the same thread's calls with no churn: a call never waits for a composition,
    but on 2 cores it shares them with the one being built."""
    model = kfdeploy.load(bundle, cache_size=0, log=lambda s: None)
    last = bundle.tasks[-1]

    def calls_while(busy) -> list:
        took, errors = [], []

        def caller():
            try:
                while not done.is_set():
                    started = time.perf_counter()
                    model(x)
                    took.append(time.perf_counter() - started)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        done = threading.Event()
        thread = threading.Thread(target=caller)
        thread.start()
        busy()
        done.set()
        thread.join()
        if errors:
            raise errors[0]
        return took

    def churn():
        for _ in range(cycles):
            model.remove_task(last)
            model.add_task(last)

    churning = calls_while(churn)
    seconds = max(0.5, sum(churning))
    quiet = calls_while(lambda: time.sleep(seconds))
    return {label: {"calls": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v) * 1e3}
            for label, v in (("with add/remove churn", churning), ("quiet", quiet))}


def export_teacher(bundle: Bundle, folder: Path) -> tuple[Path, torch.nn.Module]:
    teacher_run = bundle.manifest["source"].get("teacher_run")
    if not teacher_run:
        raise SystemExit("this bundle's teacher run is unknown; the benchmark needs the sprites quickstart bundle")
    teacher, _ = load_teacher(Path(teacher_run))

    class TeacherGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def forward(self, image):
            return tuple(self.teacher(image).values())

    path = folder / "teacher.onnx"
    _quiet_export(TeacherGraph(), (torch.zeros(2, 1, 64, 64),), path, ["image"], [f"logits_{t}" for t in teacher.task_classes], ExportProfile("bench"))
    return path, teacher


def parse_arguments(doc: str, seconds: float) -> argparse.Namespace:
    """What every runtime benchmark takes: the bundle, the timing window, where results go."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("runs/quickstart/bundle"))
    parser.add_argument("--seconds", type=float, default=seconds, help="timing window per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments(__doc__, seconds=0.8)

    threads = physical_cores()
    torch.set_num_threads(threads)
    bundle = Bundle.open(args.bundle)
    tasks = bundle.tasks
    images = SpritesSource().heldout(64)[0].numpy()
    work = Path(tempfile.mkdtemp(prefix="kf-runtime-bench-"))
    teacher_path, teacher = export_teacher(bundle, work)
    teacher_session = alike_session(teacher_path.read_bytes())
    reference = torch_modules(bundle)
    composer = Composer(bundle.graph)
    standalone = {t: alike_session(composer.compose([t])) for t in tasks}  # its own trunk + the task
    assembly = kfdeploy.load(bundle, tasks=[], log=lambda s: None)

    example = torch.zeros(1, 1, 64, 64)
    trunk_flops = count_flops(TrunkGraph(reference), example)
    common = reference.forward_features(example)
    task_flops = {t: count_flops(reference.tasks[t], example, common) for t in tasks}
    teacher_flops = count_flops(teacher, example)
    rows = []
    for k in range(1, len(tasks) + 1):
        selected = tasks[:k]
        assembly.add_task(selected[-1])
        fused = alike_session(composer.compose(selected))
        wanted = [probs_output(t) for t in selected]

        def eager(x):
            with torch.inference_mode():
                xt = torch.from_numpy(x)
                c = reference.forward_features(xt)
                return [torch.softmax(reference.tasks[t](xt, c), 1) for t in selected]

        others = {
            "fused": lambda x: fused.run(wanted, {"image": x}),
            "independent": lambda x: [standalone[t].run([probs_output(t)], {"image": x}) for t in selected],
            "teacher": lambda x: teacher_session.run(None, {"image": x}),
            "torch eager": eager,
        }
        flops = trunk_flops + sum(task_flops[t] for t in selected)
        for batch in BATCHES:
            x = np.ascontiguousarray(images[:batch])
            # Each variant takes turns with the assembly alone, so that a variant's spinning
            # threads (PyTorch's) never touch a third one's times.
            pairs = {name: time_in_turns({"assembly": lambda: assembly(x), name: lambda fn=fn: fn(x)}, args.seconds)
                     for name, fn in others.items()}
            seconds = {"assembly": statistics.median(pair["assembly"] for pair in pairs.values())}
            seconds.update({name: pair[name] / pair["assembly"] * seconds["assembly"] for name, pair in pairs.items()})
            row = {"tasks": k, "batch": batch, "ms": {n: s * 1e3 for n, s in seconds.items()},
                   "images_per_s": {n: batch / s for n, s in seconds.items()},
                   "slowdown_vs_assembly": {n: s / seconds["assembly"] for n, s in seconds.items()},
                   "assembly_gflops": flops * batch / seconds["assembly"] / 1e9}
            rows.append(row)
            print(f"k={k} batch={batch:>2}: " + "  ".join(f"{n} {v:.2f} ms" for n, v in row["ms"].items()), flush=True)

    # An app's own session with ONNX Runtime's defaults, called in alternation with the
    # assembly: the case where separate sessions per module used to collapse.
    app = default_session(teacher_path)
    beside = {}
    for batch in BATCHES:
        x = np.ascontiguousarray(images[:batch])
        turns = time_in_turns({"app then assembly": lambda: (app.run(None, {"image": x}), assembly(x)),
                               "app alone": lambda: app.run(None, {"image": x}),
                               "assembly alone": lambda: assembly(x)}, args.seconds * 2)
        beside[str(batch)] = {"assembly_beside_app_ms": (turns["app then assembly"] - turns["app alone"]) * 1e3,
                              "assembly_alone_ms": turns["assembly alone"] * 1e3}
        print(f"batch {batch}: assembly beside an app's default session {beside[str(batch)]['assembly_beside_app_ms']:.2f} ms, "
              f"alone {beside[str(batch)]['assembly_alone_ms']:.2f} ms", flush=True)
    switching = switch_latency(bundle)
    churn = calls_during_churn(bundle, np.ascontiguousarray(images[:1]))
    peak = cpu_peak_gflops()
    memory = memory_growth(args.bundle, tasks)
    result = {
        "device": f"{peak['cpu']} ({threads} cores)", "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__, "threads": threads, "peak": peak,
        "flops_per_image": {"trunk": trunk_flops, **task_flops, "teacher": teacher_flops},
        "rows": rows, "beside_app": beside, "switch_latency": switching, "calls_during_churn": churn, "memory_mb": memory,
    }
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "runtime-cpu.png")
    print(f"wrote {args.out / 'runtime-cpu.json'} and .png")


def print_report(result: dict) -> None:
    names = list(result["rows"][0]["ms"])
    for batch in BATCHES:
        metric = "latency ms" if batch == 1 else "images/s"
        print(f"\nbatch {batch} ({metric}; in brackets: time relative to the assembly)")
        print(f"{'k':>2} " + " ".join(f"{n:>20}" for n in names))
        for row in rows_at(result, batch):
            values = row["ms"] if batch == 1 else row["images_per_s"]
            print(f"{row['tasks']:>2} " + " ".join(f"{values[n]:>11.2f} ({row['slowdown_vs_assembly'][n]:>5.2f}x)" for n in names))
    last = rows_at(result, 64)[-1]
    peak = result["peak"]
    print(f"\nassembly at batch 64, 5 tasks: {last['assembly_gflops']:.1f} GFLOP/s; peak {peak['peak_gflops']:.0f} GFLOP/s "
          f"({peak['cores']} cores x {peak['clock_ghz']:.2f} GHz x 2 flops x {peak['fp32_lanes']} fp32 lanes x {peak['fma_ports']} FMA ports); "
          f"a 4096x4096 float32 matrix multiply in PyTorch reaches {peak['sgemm_gflops']:.0f} GFLOP/s")
    f = result["flops_per_image"]
    print(f"MFLOP per image: trunk {f['trunk'] / 1e6:.1f}, each task {f[next(k for k in f if k not in ('trunk', 'teacher'))] / 1e6:.1f}, teacher {f['teacher'] / 1e6:.1f}")
    print("resident memory above an idle process (MB): " + ", ".join(
        f"{m['tasks']} tasks{' after %d add/remove' % m['after_cycles'] if 'after_cycles' in m else ''} {m['rss_mb']:.1f}"
        for m in result["memory_mb"]))
    for label, steps in result["switch_latency"].items():
        print(f"switching with all tasks, {label}: " + ", ".join(
            f"{name} p50 {v['p50_ms']:.1f} ms / p99 {v['p99_ms']:.1f} ms" for name, v in steps.items()))
    for label, v in result["calls_during_churn"].items():
        print(f"batch-1 calls {label}: {v['calls']} calls, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, longest {v['max_ms']:.1f} ms")
    print("\ngoals:")
    for line in goal_lines(result):
        print("  " + line)
    print("\nfor docs/benchmarks/runtime.md:\n" + markdown_table(result))


def rows_at(result: dict, batch: int) -> list:
    return [r for r in result["rows"] if r["batch"] == batch]


def goal_lines(result: dict) -> list:
    """The issue's goals, each as the range over k and whether it holds."""
    def ratio_range(batch, numerator, denominator):
        ratios = [r["ms"][numerator] / r["ms"][denominator] for r in rows_at(result, batch)]
        return min(ratios), max(ratios)

    def verdict(value_range, met):
        low, high = value_range
        shown = f"{low:.2f}x" if low == high else f"{low:.2f}-{high:.2f}x"
        return f"{shown} ({'met' if met else 'NOT met'})"

    lines = []
    for batch in BATCHES:
        r = ratio_range(batch, "assembly", "fused")
        lines.append(f"time vs fused at batch {batch}, k = 1..5, goal <= 1.05x: {verdict(r, r[1] <= 1.05)}")
    last = rows_at(result, 64)[-1]
    gain = last["ms"]["independent"] / last["ms"]["assembly"]
    lines.append(f"all tasks at batch 64 vs independent networks, goal >= 2x throughput: {verdict((gain, gain), gain >= 2)}")
    relative = [(r["ms"]["torch eager"] / r["ms"]["assembly"]) / (r["ms"]["torch eager"] / r["ms"]["fused"]) for r in rows_at(result, 1)]
    lines.append(f"speed-up over torch eager at batch 1 relative to the fused graph's, goal >= 0.95: "
                 f"{verdict((min(relative), max(relative)), min(relative) >= 0.95)}")
    anew = result["switch_latency"]["composed anew"]
    worst_p50 = max(v["p50_ms"] for v in anew.values())
    worst_p99 = max(v["p99_ms"] for v in anew.values())
    lines.append(f"add/remove with 5 tasks, composing anew, goal p50 < 50 ms and p99 < 150 ms: p50 {worst_p50:.1f} ms, "
                 f"p99 {worst_p99:.1f} ms ({'met' if worst_p50 < 50 and worst_p99 < 150 else 'NOT met'})")
    memory = result["memory_mb"]
    grown = memory[-1]["rss_mb"] - memory[-2]["rss_mb"]
    lines.append(f"add/remove cycles 101..200 grow resident memory by {grown:+.1f} MB "
                 f"(cycles 2..100: {memory[-2]['rss_mb'] - memory[-3]['rss_mb']:+.1f} MB)")
    return lines


def markdown_table(result: dict, ks=(1, 3, 5)) -> str:
    """The runtime benchmark page's table: the assembly absolute, every other variant as time relative to it."""
    others = [n for n in result["rows"][0]["ms"] if n != "assembly"]
    lines = ["| k | batch | assembly | " + " | ".join(others) + " |", "|---" * (3 + len(others)) + "|"]
    for batch in BATCHES:
        for row in (r for r in rows_at(result, batch) if r["tasks"] in ks):
            absolute = f"{row['ms']['assembly']:.2f} ms" if batch == 1 else f"{row['images_per_s']['assembly']:.0f} img/s"
            lines.append(f"| {row['tasks']} | {batch} | {absolute} | "
                         + " | ".join(f"{row['slowdown_vs_assembly'][n]:.2f}x" for n in others) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt = pyplot("train")
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, batch in zip(axes, BATCHES):
        rows = rows_at(result, batch)
        for name in rows[0]["ms"]:
            values = [r["ms"][name] if batch == 1 else r["images_per_s"][name] for r in rows]
            ax.plot([r["tasks"] for r in rows], values, marker="o", label=name)
        ax.set_xticks([r["tasks"] for r in rows])
        ax.set_xlabel("selected tasks (k)")
        ax.set_ylabel("latency (ms)" if batch == 1 else "throughput (images/s)")
        ax.set_title(f"batch {batch}")
        ax.set_yscale("log")
        # Plain numbers on the log axis: "0.3 ms" reads faster than "3 x 10^-1".
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Composition cost on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
