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


def bench_median(benchmark: Any) -> float | None:
    """The benchmark's median seconds per call (None when timing is off: --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or not hasattr(stats, "stats"):
        return None
    return float(stats.stats.median)


def record_goal(benchmark: Any, goal: str, measured: float, target: float, *, at_most: bool) -> bool:
    """Record the goal a benchmark's docstring states beside what this run measured: ``goal`` (the
    words), ``goal_target``, ``goal_measured``, ``goal_ratio`` (measured / target) and ``goal_met``
    (measured <= target when ``at_most``, else >=). Several goals: one dict each under ``goals``.
    Returns whether it was met (a benchmark reports; it does not fail on a missed goal)."""
    met = measured <= target if at_most else measured >= target
    entry = {"goal": goal, "goal_target": target, "goal_measured": measured,
             "goal_ratio": round(measured / target, 4) if target else None, "goal_met": met}
    goals = benchmark.extra_info.setdefault("goals", [])
    goals.append(entry)
    if len(goals) == 1:
        benchmark.extra_info.update(entry)
    benchmark.extra_info["goal_met"] = all(g["goal_met"] for g in goals)
    return met
