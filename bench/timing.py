"""Timing helpers shared by the benchmarks: medians over repeats after a warm-up."""

import statistics
import time
from typing import Callable


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call `fn()`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn) for _ in range(repeats))
