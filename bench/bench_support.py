"""Shared benchmark helpers. Every engine figure stands beside a raw baseline measured in the same
run, and the ratio is recorded in the benchmark's extra_info and printed at the end."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], object], runs: int = 7, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of fn() over `runs` calls (setup, when given, runs untimed before each)."""
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record_ratio(benchmark: Any, baseline_seconds: float, baseline: str, **extra: Any) -> None:
    """Store the engine's median beside the baseline's (seconds per call, same run) and their ratio
    (engine time / baseline time: below 1 is faster than the baseline)."""
    benchmark.extra_info["baseline"] = baseline
    benchmark.extra_info["baseline_median_s"] = baseline_seconds
    benchmark.extra_info.update(extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and hasattr(stats, "stats") and baseline_seconds > 0:
        benchmark.extra_info["time_ratio_vs_baseline"] = round(stats.stats.median / baseline_seconds, 3)
