"""The figures of ``livemig bench``: each engine figure beside a raw baseline measured in the same
run, as a ratio, with the spread of its runs and whether it meets its goal."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from livemig.memory import system_page_size
from livemig.migration.results import POWER_OF_TWO_UPPER_US, LatencyBuckets, MigrationResult

PAGE = system_page_size()
MIB = 1 << 20
GIB = 1 << 30
Better = Literal["higher", "lower"]

#: Groups, in report order.
GROUPS = ("baselines", "migration", "prefault", "zero", "hints", "faults", "channels", "scaling", "bitmap", "tls",
          "attach")
#: How a figure's error starts when the kernel cannot run its scenario (not a failure).
SKIPPED = "skipped: "




@dataclass(frozen=True)
class Stat:
    """The median of some runs and their spread."""

    median: float
    lo: float
    hi: float
    runs: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, xs: Iterable[float]) -> Stat:
        v = [float(x) for x in xs]
        if not v:
            raise ValueError("no samples")
        return cls(statistics.median(v), min(v), max(v), len(v), tuple(v))


@dataclass
class Figure:
    """One figure of the report: the engine's value beside its raw baseline, or a baseline itself
    (group ``baselines``: ``baseline`` and ``ratio`` are None)."""

    name: str
    group: str
    unit: str
    value: float | None  #: the median over ``runs``
    spread: tuple[float, float] | None  #: (min, max) over the runs
    runs: int
    better: Better
    baseline: float | None = None  #: the baseline's median, same unit, measured in this run
    baseline_name: str | None = None
    baseline_spread: tuple[float, float] | None = None
    ratio: float | None = None  #: value / baseline
    goal: str | None = None  #: the goal, in words
    goal_ratio: float | None = (
        None  #: the bound on ratio (at least it when better is higher, else at most)
    )
    met: bool | None = None  #: ratio within goal_ratio (None: no goal)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  #: why the figure has no value (SKIPPED: the kernel cannot run it)
    samples: list[float] = field(default_factory=list)  #: every run's value
    baseline_samples: list[float] = field(default_factory=list)  #: every run of the baseline

    @property
    def is_baseline(self) -> bool:
        return self.group == "baselines"


def engine_figure(
    name: str,
    group: str,
    unit: str,
    better: Better,
    value: Stat,
    baseline: Stat,
    baseline_name: str,
    goal: str | None = None,
    goal_ratio: float | None = None,
    **details: Any,
) -> Figure:
    """An engine figure: its ratio to the baseline and whether it meets its goal."""
    ratio = value.median / baseline.median if baseline.median else math.inf
    met = None
    if goal_ratio is not None:
        met = ratio >= goal_ratio if better == "higher" else ratio <= goal_ratio
    return Figure(
        name,
        group,
        unit,
        value.median,
        (value.lo, value.hi),
        value.runs,
        better,
        baseline.median,
        baseline_name,
        (baseline.lo, baseline.hi),
        ratio,
        goal,
        goal_ratio,
        met,
        details,
        samples=list(value.samples),
        baseline_samples=list(baseline.samples),
    )


def baseline_figure(name: str, unit: str, better: Better, s: Stat, **details: Any) -> Figure:
    return Figure(
        name,
        "baselines",
        unit,
        s.median,
        (s.lo, s.hi),
        s.runs,
        better,
        details=details,
        samples=list(s.samples),
    )


def failed_figure(name: str, group: str, error: str) -> Figure:
    return Figure(name, group, "", None, None, 0, "higher", error=error)


def histogram_quantile_us(buckets: Sequence[int], q: float, upper_us: Sequence[float] | None = None) -> float:
    """Quantile q of a fault-latency histogram whose bucket k ends at ``upper_us[k]`` microseconds
    (and starts where bucket k-1 ends; default: the report's power-of-two view), interpolated linearly within
    the bucket that holds it; 0 when empty."""
    total = sum(buckets)
    if total == 0:
        return 0.0
    if upper_us is None or len(upper_us) < len(buckets):
        upper_us = POWER_OF_TWO_UPPER_US
    want = q * total
    seen = 0.0
    for k, n in enumerate(buckets):
        if n and seen + n >= want:
            lo, hi = (0.0 if k == 0 else upper_us[k - 1]), upper_us[k]
            return lo + (hi - lo) * (want - seen) / n
        seen += n
    return float(upper_us[len(buckets) - 1])


def merged_buckets(hists: Iterable[LatencyBuckets]) -> LatencyBuckets:
    """Several runs' latency buckets added up (the bucket layout is the same in every run)."""
    acc: dict[tuple[float, float], int] = {}
    for h in hists:
        for lo, hi, n in zip(h.lower_us, h.upper_us, h.counts, strict=True):
            acc[(lo, hi)] = acc.get((lo, hi), 0) + n
    keys = sorted(acc)
    return LatencyBuckets(tuple(k[0] for k in keys), tuple(k[1] for k in keys), tuple(acc[k] for k in keys))


def buckets_quantile_us(h: LatencyBuckets, q: float, max_us: float = math.inf) -> float:
    """Quantile q of log-linear latency buckets: the middle of the bucket holding it (within 0.8 %
    of its samples), at most ``max_us``; 0 when empty."""
    total = sum(h.counts)
    if total == 0:
        return 0.0
    want = max(1, math.ceil(q * total))
    seen = 0
    for lo, hi, n in zip(h.lower_us, h.upper_us, h.counts, strict=True):
        seen += n
        if seen >= want:
            return min(lo + (hi - lo - 1e-3) / 2, max_us)
    return min(h.upper_us[-1], max_us)


def first_round_gbps(r: MigrationResult) -> float:
    """The first precopy round's wire bandwidth (every page of the region goes in it)."""
    first = r.rounds[0]
    return first.bytes_sent / first.seconds / 1e9 if first.seconds > 0 else 0.0


__all__ = [
    "GIB",
    "GROUPS",
    "MIB",
    "PAGE",
    "SKIPPED",
    "Better",
    "Figure",
    "Stat",
    "baseline_figure",
    "buckets_quantile_us",
    "engine_figure",
    "failed_figure",
    "first_round_gbps",
    "histogram_quantile_us",
    "merged_buckets",
]
