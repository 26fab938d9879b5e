"""Training benchmark: data rate, training throughput and accuracy versus wall time.

    python benchmarks/train.py                       # train quickstart-sized runs here, then report
    python benchmarks/train.py --runs runs/quickstart  # report on runs you already have
    python benchmarks/train.py --feeds-only          # only the feed comparison (a minute or two)

Throughput comes from the runs' own metrics.jsonl (steps x batch / training time between
the first and last logged step, periodic held-out evaluation included), so it is what a
user of `kfdeploy teacher` / `factorize` gets. Writes results/train-<device>.json and .png.

The feed comparison factorizes a SimpleConv sprites teacher for a few dozen steps per
configuration — feed (inline: made on the host in the step; prefetch: a background
thread; device: sprites rendered on the training device), batch size and torch.compile —
and reports samples/s from the same metrics.jsonl timing (the first logged interval, with
any compilation, is left out), plus how fast each renderer makes images on its own.
Writes results/train-feeds-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from kfdeploy.cli import QUICKSTART_FACTORIZE_STEPS, QUICKSTART_TEACHER_STEPS
from kfdeploy.extras import pyplot
from kfdeploy.training import feed
from kfdeploy.training.data import SpritesRGBSource, SpritesSource, render, render_rgb
from kfdeploy.training.pipeline import factorize, train_teacher
from kfdeploy.training.runs import METRICS_FILE, RUN_FILE
from kfdeploy.training.train import TrainConfig
from rates import per_second

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def data_rate(seconds: float = 3.0) -> float:
    """Sprites rendered per second on one core (numpy, no torch)."""
    factors = SpritesSource().train_factors(0, 4096)
    return per_second(lambda: render(factors), len(factors), seconds)


def renderer_rates(device: str, seconds: float = 2.0) -> dict:
    """Images per second of each renderer: numpy on the host (one core) and torch on `device`."""
    def rate(make, count) -> float:  # the warm-up call builds the texture bank and CUDA kernels
        return per_second(make, count, seconds, torch.cuda.synchronize if device.startswith("cuda") else (lambda: None))

    grey = SpritesSource().train_factors(0, 4096)
    rgb, nuisances = SpritesRGBSource().train_factors(0, 1024)
    return {
        "numpy_sprites_64": rate(lambda: render(grey), len(grey)),
        "numpy_sprites_rgb_128": rate(lambda: render_rgb(rgb, nuisances), len(rgb)),
        f"torch_{device}_sprites_64": rate(lambda: feed.sprites_batch(grey, ["shape"], device), len(grey)),
        f"torch_{device}_sprites_rgb_128": rate(lambda: feed.sprites_rgb_batch(rgb, nuisances, ["shape"], device), len(rgb)),
    }


def feed_configs(device: str, compile_modes) -> list:
    """(feed, batch size, compile mode) to compare. Batch 128 inline is the path every run
    took before feeds existed; the turn-1 GPU figure (2,429 samples/s on an H100) is that."""
    if device.startswith("cuda"):
        configs = [("inline", 128, None), ("prefetch", 128, None), ("device", 128, None),
                   ("inline", 1024, None), ("device", 1024, None), ("device", 4096, None)]
        configs += [("device", 4096, mode) for mode in compile_modes]  # compiling takes a minute or more each
    else:
        configs = [("inline", 128, None), ("prefetch", 128, None), ("device", 128, None),
                   ("inline", 512, None), ("prefetch", 512, None)]
        configs += [("inline", 128, mode) for mode in compile_modes]
    return configs


def measure_feeds(device: str, steps: int, compile_modes, work: Path) -> list:
    """Factorize throughput per configuration, each a fresh factorization of the same teacher."""
    teacher = work / "teacher"
    train_teacher(teacher, config=TrainConfig(steps=1, batch_size=8), device=device)
    rows = []
    for name, batch, mode in feed_configs(device, compile_modes):
        log_every = max(2, steps // 8)
        config = TrainConfig(steps=steps, batch_size=batch, log_every=log_every, eval_every=10 ** 9,
                             checkpoint_every=10 ** 9, feed=name, compile=mode)
        out = work / f"kf-{name}-{batch}-{mode or 'eager'}"
        started = time.perf_counter()
        row = {"feed": name, "batch": batch, "compile": mode, "steps": steps}
        label = f"feed {name:<8} batch {batch:>5} compile {mode or '-':<15}"
        try:
            factorize(teacher, out, config=config, device=device)
        except Exception as error:  # noqa: BLE001 -- one configuration failing (say, compiling) must not lose the others' numbers
            row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            print(f"{label} FAILED: {row['error']}", flush=True)
            continue
        row.update(samples_per_s=read_run(out)["samples_per_s"], wall_s=time.perf_counter() - started)
        rows.append(row)
        print(f"{label} {row['samples_per_s']:>9,.0f} samples/s "
              f"(whole command {row['wall_s']:.0f} s)", flush=True)
    return rows


def load_note() -> str:
    load1, load5, _ = os.getloadavg()
    return f"load average {load1:.1f} (1 min), {load5:.1f} (5 min) on {os.cpu_count()} cores when it ended"


def setup_seconds(records) -> float:
    """What a run spent before its steps, counted in its training time (the teacher's targets
    precomputed), from its metrics.jsonl records."""
    return next((r["setup_s"] for r in records if r.get("event") == "set up"), 0.0)


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
        "setup_s": setup_seconds(records),
        "final_accuracy": records[-1]["heldout_accuracy"],
        "curve": [{"time_s": t, **acc} for t, acc in curve],
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot("train")

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


def plot_feeds(feeds: dict, path: Path) -> None:
    """One bar per configuration: samples/s, labelled with its multiple of batch-128 inline."""
    plt = pyplot("train")

    rows = [row for row in feeds["rows"] if "error" not in row]
    labels = [f"{r['feed']}\nbatch {r['batch']}" + (f"\n{r['compile']}" if r["compile"] else "") for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4.2))
    bars = ax.bar(range(len(rows)), [r["samples_per_s"] for r in rows], color=["tab:blue" if not r["compile"] else "tab:orange" for r in rows])
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['samples_per_s']:,.0f}\n{row['vs_inline_128']:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("factorize samples/s")
    ax.set_ylim(0, 1.2 * max(r["samples_per_s"] for r in rows))
    ax.set_title(f"Factorize throughput by feed, SimpleConv sprites, {feeds['device']} (torch {feeds['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="folder with teacher/ and kf/ runs to report on (no training)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--feeds-only", action="store_true", help="only the feed comparison; no accuracy runs")
    parser.add_argument("--plot-feeds", type=Path, metavar="JSON", help="only draw the .png of a train-feeds-*.json already written")
    parser.add_argument("--feed-steps", type=int, help="steps per feed configuration (default 40 on a CPU, 60 on a GPU)")
    parser.add_argument("--compile", action="append", default=[], choices=["default", "reduce-overhead", "max-autotune"],
                        help="also measure torch.compile in this mode (repeat for more)")
    args = parser.parse_args()
    if args.plot_feeds:
        plot_feeds(json.loads(args.plot_feeds.read_text()), args.plot_feeds.with_suffix(".png"))
        print(f"wrote {args.plot_feeds.with_suffix('.png')}")
        return

    slug = "gpu" if args.device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    feeds = {
        "device": device_name(args.device), "torch": torch.__version__,
        "renderer_images_per_s": renderer_rates(args.device),
        "rows": measure_feeds(args.device, args.feed_steps or (60 if slug == "gpu" else 40), args.compile,
                              Path(tempfile.mkdtemp(prefix="kf-feeds-"))),
        "load": load_note(),
    }
    measured = [row for row in feeds["rows"] if "error" not in row]
    base = next(r for r in measured if (r["feed"], r["batch"], r["compile"]) == ("inline", 128, None))
    for row in measured:
        row["vs_inline_128"] = row["samples_per_s"] / base["samples_per_s"]
    print("renderers (images/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in feeds["renderer_images_per_s"].items()))
    print(f"best: {max(r['vs_inline_128'] for r in measured):.2f}x the batch-128 inline path; {feeds['load']}")
    (args.out / f"train-feeds-{slug}.json").write_text(json.dumps(feeds, indent=2) + "\n")
    plot_feeds(feeds, args.out / f"train-feeds-{slug}.png")
    print(f"wrote {args.out / f'train-feeds-{slug}.json'} and .png")
    if args.feeds_only:
        return

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
    (args.out / f"train-{slug}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / f"train-{slug}.png")
    print(f"wrote {args.out / f'train-{slug}.json'} and .png")


if __name__ == "__main__":
    main()
