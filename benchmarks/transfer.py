"""Plug-and-play on a shipped trunk: new sprite tasks, four ways, against the number of labels.

    python benchmarks/transfer.py BUNDLE [--labels 100,1000,10000] [--steps 600] [--extra-trunk BUNDLE2]

For each embedded new task (kfdeploy.training.data.NEW_TASKS) and each label budget, with the same
step budget, batch and learning-rate schedule (kfdeploy.training.train.train) for all four:
  (a) brick   - `kfdeploy add-task`: a task module on the bundle's frozen trunk, exported
                into a copy of the bundle; accuracy as the manifest records it (ONNX Runtime)
  (b) probe   - a linear head on the frozen trunk's common feature
  (c) alone   - the same task module with no trunk: head(its own code)
  (d) scratch - a full SimpleConv network (the teacher's architecture) from scratch
all scored on the same 2,048 held-out sprites. Then the LogME transferability score of
each task (kfdeploy.bundling.transferability, on 500 images, before any training) against the
accuracy the brick reached, as a Spearman rank correlation (across trunks too with
--extra-trunk, whose bricks train at the largest budget only). Last, the new modules' size
and the composed assembly's latency with one of them, against the factorization's own.

Writes a JSON result and a PNG (accuracy against labels per task; score against accuracy).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kfdeploy
from kfdeploy.bundling.add_task import LabelledPool, add_task, open_new_task_data
from kfdeploy.bundling.bundle import Bundle
from kfdeploy.extras import pyplot
from kfdeploy.training.data import NEW_TASKS
from kfdeploy.bundling.export import ACCURACY_IMAGES, torch_modules
from kfdeploy.training.losses import LossWeights, TeacherObjective, single_task_terms
from kfdeploy.training.models import SpritesTeacher, TeacherConfig
from kfdeploy.training.train import TrainConfig, accuracy, setup_distributed, train
from rates import per_second

METHODS = ("brick", "probe", "alone", "scratch")
SCORES = ("logme", "gain", "readout_accuracy")  # kfdeploy.bundling.transferability's, each rank-correlated with the brick


class Probe(nn.Module):
    """(b): a linear head on the frozen trunk's common feature."""

    def __init__(self, trunk: nn.Module, width: int, task: str, classes: int):
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.head = nn.Linear(width, classes)
        self.task = task

    def forward(self, images):
        with torch.no_grad():
            common = self.trunk(images)
        return {self.task: self.head(common)}


class ProbeObjective(nn.Module):
    def __init__(self, probe: Probe):
        super().__init__()
        self.model = probe

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.trunk.eval()
        return self

    def forward(self, images, labels):
        loss = nn.functional.cross_entropy(self.model(images)[self.model.task], labels[self.model.task])
        return loss, {"ce": loss}


class Alone(nn.Module):
    """(c): the brick's task module with no trunk under it: head(mu(x))."""

    def __init__(self, module: nn.Module, task: str):
        super().__init__()
        self.module, self.task = module, task

    def forward(self, images):
        mu = self.module.code(images)[0]
        return {self.task: self.module.head(mu)}


class AloneObjective(nn.Module):
    """The brick's own terms (kfdeploy.training.losses.single_task_terms) with a zero common feature."""

    def __init__(self, alone: Alone):
        super().__init__()
        self.model = alone

    def forward(self, images, labels):
        metrics = {}
        zero = torch.zeros(len(images), self.model.module.head.in_features, device=images.device)
        single_task_terms(self.model.task, self.model.module, images, zero, labels[self.model.task], LossWeights(), metrics)
        return sum(metrics.values()), metrics


def _fit(objective: nn.Module, source, config: TrainConfig, images, labels, work: Path, desc: str) -> float:
    env = setup_distributed("cpu")
    run = Path(tempfile.mkdtemp(dir=work))
    train(run, objective, source, config, evaluate=lambda m: {}, env=env, desc=desc)
    return accuracy(objective.model, images, labels)[next(iter(labels))]


def run_task(bundle_dir: Path, copy: Path, task: str, count: int, config: TrainConfig, methods, work: Path) -> dict:
    bundle = Bundle.open(bundle_dir)
    opened = open_new_task_data(bundle, "sprites", [task], seed=config.seed)
    classes = len(opened.task_labels[task])
    images, labels = opened.source.heldout(ACCURACY_IMAGES)  # what export scores the brick on
    result = {}
    if "brick" in methods:
        record = add_task(copy, task, "sprites", labels=count, config=config, replace_existing=True, progress=lambda line: None)
        result["brick"] = record["heldout_accuracy"]
    pool = LabelledPool(opened, count, config.seed)
    torch.manual_seed(config.seed)
    if "probe" in methods:
        trunk = torch_modules(bundle, new_tasks={}).trunk
        probe = Probe(trunk, bundle.manifest["trunk"]["output"]["width"], task, classes)
        result["probe"] = _fit(ProbeObjective(probe), pool, config, images, labels, work, f"{task}/{count} probe")
    if "alone" in methods:
        module = torch_modules(bundle, new_tasks={task: classes}).tasks[task]
        result["alone"] = _fit(AloneObjective(Alone(module, task)), pool, config, images, labels, work, f"{task}/{count} alone")
    if "scratch" in methods:
        teacher = SpritesTeacher(TeacherConfig(task_classes={task: classes}))
        result["scratch"] = _fit(TeacherObjective(teacher), pool, config, images, labels, work, f"{task}/{count} scratch")
    return result


def spearman(x, y) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties among these floats in practice
    rx, ry = rank(np.asarray(x)), rank(np.asarray(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def latency(bundle_dir: Path, own: list, new: str, rounds: int, seconds: float) -> dict:
    """Images/s of the composed assembly with the factorization's tasks, and with one new one too, timed alternately."""
    models = {"own": kfdeploy.load(bundle_dir, tasks=own, log=lambda line: None),
              "own+new": kfdeploy.load(bundle_dir, tasks=[*own, new], log=lambda line: None)}
    shape = Bundle.open(bundle_dir).manifest["input"]["shape"][1:]
    rng = np.random.default_rng(0)
    batches = {b: rng.random((b, *shape), dtype=np.float32) for b in (1, 64)}
    speed = {k: {b: [] for b in batches} for k in models}
    for _ in range(rounds):
        for b, batch in batches.items():
            for k, model in models.items():
                speed[k][b].append(per_second(lambda: model(batch), len(batch), seconds))
    return {k: {f"batch{b}_images_per_s": statistics.median(v) for b, v in s.items()} for k, s in speed.items()}


def plot(result: dict, path: Path) -> None:
    plt = pyplot("train")

    tasks = list(result["accuracy"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.2 * (len(tasks) + 1), 3.4))
    for ax, task in zip(axes, tasks):
        per = result["accuracy"][task]
        counts = sorted(int(c) for c in per)
        for method in METHODS:
            values = [per[str(c)].get(method) for c in counts]
            if any(v is not None for v in values):
                ax.plot(counts, values, marker="o", label=method)
        ax.axhline(1 / len(NEW_TASKS[task][0]), color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("labelled images")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    for trunk, points in result["transferability"]["points"].items():
        ax.scatter([p["gain"] for p in points], [p["brick"] for p in points], label=trunk)
        for p in points:
            ax.annotate(p["task"], (p["gain"], p["brick"]), fontsize=7)
    ax.set_xlabel("LogME gain (before training)")
    ax.set_ylabel("brick accuracy")
    ax.set_title(f"Spearman {result['transferability']['all trunks']['gain']:+.2f}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a sprites bundle (grey, 64x64)")
    parser.add_argument("--tasks", default=",".join(NEW_TASKS))
    parser.add_argument("--labels", default="100,1000,10000")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--extra-trunk", type=Path, help="another sprites bundle: LogME and bricks at the largest budget, for the correlation across trunks")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/transfer-cpu.json"))
    args = parser.parse_args()
    from kfdeploy.bundling.transferability import score

    tasks, counts, methods = args.tasks.split(","), [int(c) for c in args.labels.split(",")], args.methods.split(",")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=10**9, checkpoint_every=10**9, log_every=50)
    started = time.perf_counter()
    trunks = {"trunk": args.bundle, **({"extra trunk": args.extra_trunk} if args.extra_trunk else {})}
    result = {"bundle": str(args.bundle), "steps": args.steps, "batch_size": args.batch_size, "accuracy": {t: {} for t in tasks},
              "transferability": {"points": {}}, "machine": {"cpu_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory(prefix="kf-transfer-") as tmp:
        work = Path(tmp)
        copies = {}
        for name, bundle_dir in trunks.items():
            copies[name] = {}
            for count in (counts if name == "trunk" else counts[-1:]):
                copies[name][count] = work / f"{name.replace(' ', '-')}-{count}"
                shutil.copytree(bundle_dir, copies[name][count])
        for task in tasks:
            for count in counts:
                print(f"== {task}, {count} labels", flush=True)
                result["accuracy"][task][str(count)] = run_task(args.bundle, copies["trunk"][count], task, count, config, methods, work)
                print(json.dumps(result["accuracy"][task][str(count)]), flush=True)
        largest = counts[-1]
        all_points = []
        for name, bundle_dir in trunks.items():
            scores = score(bundle_dir, "sprites", tasks=tasks, progress=lambda line: None)
            points = []
            for task in tasks:
                if name == "trunk":
                    brick = result["accuracy"][task][str(largest)]["brick"]
                else:
                    brick = add_task(copies[name][largest], task, "sprites", labels=largest, config=config,
                                     progress=lambda line: None)["heldout_accuracy"]
                points.append({"task": task, "brick": brick, **{k: scores["tasks"][task][k] for k in SCORES}})
            result["transferability"]["points"][name] = points
            result["transferability"][name] = {k: spearman([p[k] for p in points], [p["brick"] for p in points]) for k in SCORES}
            all_points += points
        result["transferability"]["all trunks"] = {k: spearman([p[k] for p in all_points], [p["brick"] for p in all_points]) for k in SCORES}
        final = Bundle.open(copies["trunk"][largest])
        own = [t for t in final.tasks if t not in tasks]
        result["module_bytes"] = {t: final.task(t)["bytes"] for t in final.tasks}
        result["latency"] = latency(copies["trunk"][largest], own, tasks[0], args.rounds, args.seconds)
    result["wall_s"] = round(time.perf_counter() - started, 1)

    print(f"\naccuracy on {ACCURACY_IMAGES} held-out sprites, {args.steps} steps of {args.batch_size} for every method")
    print(f"{'task':<20} {'labels':>7} " + " ".join(f"{m:>8}" for m in METHODS))
    for task in tasks:
        for count in counts:
            row = result["accuracy"][task][str(count)]
            print(f"{task:<20} {count:>7} " + " ".join(f"{row[m]:8.3f}" if m in row else f"{'-':>8}" for m in METHODS))
    for name, points in result["transferability"]["points"].items():
        print(f"\n{name}: transferability before training vs the brick's accuracy at {largest} labels")
        for p in points:
            print(f"  {p['task']:<20} LogME {p['logme']:7.3f}  gain {p['gain']:+.3f}  read-out {p['readout_accuracy']:.3f}  brick {p['brick']:.3f}")
    for name in (*result["transferability"]["points"], "all trunks"):
        print(f"Spearman ({name}): " + ", ".join(f"{k} {v:+.2f}" for k, v in result["transferability"][name].items()))
    print("\nmodule bytes: " + ", ".join(f"{t} {b / 1e3:.0f} kB" for t, b in result["module_bytes"].items()))
    for k, v in result["latency"].items():
        print(f"assembly {k:<8} batch 1 {v['batch1_images_per_s']:8.0f} img/s, batch 64 {v['batch64_images_per_s']:8.0f} img/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
