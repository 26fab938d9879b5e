"""The timing loops the benchmarks share: items per second of a call, and variants timed in turns."""
from __future__ import annotations

import statistics
import time


def per_second(call, count: int, seconds: float, sync=lambda: None) -> float:
    """Items per second of `call()`, which handles `count` items, timed for at least
    `seconds` after one untimed warm-up call; `sync` waits for queued device work (CUDA)."""
    call()
    sync()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        done += count
    sync()
    return done / (time.perf_counter() - started)


def time_in_turns(variants: dict, seconds: float, turn_seconds: float = 0.25, settle_seconds: float = 0.05) -> dict:
    """Median seconds per call of each variant, the variants taking turns.

    This VM's speed drifts by 10-20% within seconds. Timed one after another, variants
    would differ by whenever they happened to run; taking turns spreads the drift over
    all of them, so their ratios hold still. Turns are long and their first calls are
    not counted: the variant before may leave its threads spinning for milliseconds
    (PyTorch's OpenMP pool, ONNX Runtime's default pools), and the caches hold its data.
    """
    samples = {name: [] for name in variants}
    for _ in range(max(2, round(seconds / turn_seconds))):
        for name, fn in variants.items():
            turn_started = time.perf_counter()
            fn()  # never counted: it meets the previous variant's spinning threads
            calls = []  # (when it started in the turn, how long it took)
            while not calls or calls[-1][0] < turn_seconds:
                started = time.perf_counter()
                fn()
                calls.append((started - turn_started, time.perf_counter() - started))
            settled = [took for at, took in calls if at >= settle_seconds]
            samples[name] += settled or [calls[-1][1]]
    return {name: statistics.median(values) for name, values in samples.items()}
