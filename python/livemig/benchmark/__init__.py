"""``livemig bench``: livemig measured on this machine, every figure beside a raw baseline from the
same run. Scenarios are data (:mod:`.scenarios`); :class:`Bench` runs them (:mod:`.runner`, with the
kinds in :mod:`.kinds_migration` and :mod:`.kinds_micro` and the baselines in :mod:`.baselines`);
the :class:`Report` prints as a table (:mod:`.report`) and draws as pictures (:mod:`.plots`)."""

from __future__ import annotations

from livemig.benchmark.baselines import Baselines
from livemig.benchmark.figures import (
    GROUPS,
    SKIPPED,
    Figure,
    Stat,
    buckets_quantile_us,
    engine_figure,
    failed_figure,
    histogram_quantile_us,
    merged_buckets,
)
from livemig.benchmark.plots import plot
from livemig.benchmark.report import Report, latency_table, progress, table
from livemig.benchmark.runner import Bench
from livemig.benchmark.scenarios import Scenario, needs_postcopy, scenarios, select

__all__ = [
    "GROUPS",
    "SKIPPED",
    "Baselines",
    "Bench",
    "Figure",
    "Report",
    "Scenario",
    "Stat",
    "buckets_quantile_us",
    "engine_figure",
    "failed_figure",
    "histogram_quantile_us",
    "latency_table",
    "merged_buckets",
    "needs_postcopy",
    "plot",
    "progress",
    "scenarios",
    "select",
    "table",
]
