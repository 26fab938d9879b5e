"""INT8/FP16 against fp32: throughput of the composed assembly, accuracy kept, module sizes.

    python benchmarks/precision.py BUNDLE [--precisions int8,fp16] [--rounds 7] [--json out.json]

The bundle must already carry the variants (`kfdeploy quantize BUNDLE --int8`). All tasks
are composed at each precision; the precisions are timed alternately, round after round,
in one process, so drift on a shared machine hits them alike. Accuracy and agreement come
from the manifest's variant records (measured by quantize on 2,048 held-out images), and
the per-module and per-operator split of the time from ONNX Runtime's profiler on the
composed graph.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

import kfdeploy
from kfdeploy.bundling.bundle import Bundle
from rates import per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--precisions", default="int8", help="comma-separated, compared with fp32 (default int8)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    precisions = ["fp32", *args.precisions.split(",")]
    models = {p: kfdeploy.load(bundle, precision=p, threads=args.threads, log=lambda line: None) for p in precisions}
    rng = np.random.default_rng(0)
    batches = {b: rng.random((b, *bundle.manifest["input"]["shape"][1:]), dtype=np.float32) for b in (1, 64)}
    speed = {p: {b: [] for b in batches} for p in precisions}
    for _ in range(args.rounds):
        for b, batch in batches.items():
            for p in precisions:  # alternately: fp32, int8, fp32, int8, ...
                speed[p][b].append(per_second(lambda: models[p](batch), len(batch), args.seconds))
    result = {"bundle": str(args.bundle), "precisions": {}}
    for p in precisions:
        median = {b: statistics.median(v) for b, v in speed[p].items()}
        sizes = models[p].module_bytes()
        profile = models[p].profile(batches[64], runs=10)
        tasks = {t: {k: bundle.variant(t, p).get(k) for k in ("heldout_accuracy", "fp32_heldout_accuracy", "agreement")}
                 for t in bundle.tasks} if p != "fp32" else {t: {"heldout_accuracy": bundle.task(t)["heldout_accuracy"]} for t in bundle.tasks}
        result["precisions"][p] = {
            "images_per_s": median, "vs_fp32": {b: median[b] / statistics.median(speed["fp32"][b]) for b in median},
            "bytes": sum(sizes.values()), "module_bytes": sizes,
            "profile_batch64_ms": {"total": profile.total_ms, "trunk": profile.trunk_ms, **profile.tasks_ms},
            "operators_batch64_ms": profile.ops_ms, "tasks": tasks,
        }
        r = result["precisions"][p]
        print(f"{p:5} batch 1: {median[1]:8.0f} img/s ({r['vs_fp32'][1]:.2f}x)  batch 64: {median[64]:8.0f} img/s "
              f"({r['vs_fp32'][64]:.2f}x)  {r['bytes'] / 1e6:.2f} MB  profile@64: trunk {profile.trunk_ms:.2f} ms, "
              + ", ".join(f"{t} {ms:.2f}" for t, ms in profile.tasks_ms.items()))
        print("      operators@64: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in list(profile.ops_ms.items())[:8]))
        for t, numbers in tasks.items():
            print(f"      {t:<12} " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items() if v is not None))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
