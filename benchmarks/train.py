"""Training benchmark: data rate, training throughput and accuracy versus wall time.

    python benchmarks/train.py                       # train quickstart-sized runs here, then report
    python benchmarks/train.py --runs runs/quickstart  # report on runs you already have

Throughput comes from the runs' own metrics.jsonl (steps x batch / training time between
the first and last logged step, periodic held-out evaluation included), so it is what a
user of `kfdeploy teacher` / `factorize` gets. Writes results/train-<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kfdeploy.cli import QUICKSTART_FACTORIZE_STEPS, QUICKSTART_TEACHER_STEPS
from kfdeploy.data import SpritesSource, render
from kfdeploy.pipeline import factorize, train_teacher
from kfdeploy.runs import METRICS_FILE, RUN_FILE
from kfdeploy.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def data_rate(seconds: float = 3.0) -> float:
    """Sprites rendered per second on one core (numpy, no torch)."""
    source = SpritesSource()
    factors = source.train_factors(0, 4096)
    render(factors)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        render(factors)
        count += len(factors)
    return count / (time.perf_counter() - started)


def read_run(run: Path) -> dict:
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    batch = json.loads((run / RUN_FILE).read_text())["train"]["batch_size"]
    logged = [r for r in records if "loss" in r]
    first, last = logged[0], logged[-1]
    throughput = (last["step"] - first["step"]) * batch / (last["time_s"] - first["time_s"])
    curve = [(r["time_s"], r["heldout_accuracy"]) for r in records if "heldout_accuracy" in r]
    return {
        "samples_per_s": throughput,
        "steps": last["step"],
        "train_time_s": records[-1]["time_s"],
        "final_accuracy": records[-1]["heldout_accuracy"],
        "curve": [{"time_s": t, **acc} for t, acc in curve],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("teacher", "factorize")):
        curve = results[stage]["curve"]
        times = [point["time_s"] for point in curve]
        for task in curve[0]:
            if task != "time_s":
                ax.plot(times, [point[task] for point in curve], marker=".", label=task)
        ax.set_title(f"{stage}: {results[stage]['samples_per_s']:.0f} samples/s")
        ax.set_xlabel("training wall time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[1].legend(loc="lower right")
    fig.suptitle(f"Accuracy vs wall time on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="folder with teacher/ and kf/ runs to report on (no training)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    runs = args.runs
    if runs is None:
        runs = Path(tempfile.mkdtemp(prefix="kf-bench-"))
        train_teacher(runs / "teacher", config=TrainConfig(steps=QUICKSTART_TEACHER_STEPS), device=args.device)
        factorize(runs / "teacher", runs / "kf", config=TrainConfig(steps=QUICKSTART_FACTORIZE_STEPS), device=args.device)
    results = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "data_images_per_s_one_core": data_rate(),
        "teacher": read_run(runs / "teacher"),
        "factorize": read_run(runs / "kf"),
    }
    print(f"device: {results['device']}  (torch {results['torch']})")
    print(f"data: {results['data_images_per_s_one_core']:,.0f} sprites/s on one core")
    print(f"{'stage':<10} {'samples/s':>10} {'steps':>6} {'time (s)':>9}  final held-out accuracy")
    for stage in ("teacher", "factorize"):
        r = results[stage]
        accs = " ".join(f"{t}={a:.3f}" for t, a in r["final_accuracy"].items())
        print(f"{stage:<10} {r['samples_per_s']:>10.0f} {r['steps']:>6} {r['train_time_s']:>9.1f}  {accs}")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "gpu" if args.device.startswith("cuda") else "cpu"
    (args.out / f"train-{slug}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / f"train-{slug}.png")
    print(f"wrote {args.out / f'train-{slug}.json'} and .png")


if __name__ == "__main__":
    main()
