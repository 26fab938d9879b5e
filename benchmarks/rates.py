"""The one timing loop the benchmarks share: items per second of a call."""
from __future__ import annotations

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
