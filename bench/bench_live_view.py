"""The live view costs the migration nothing measurable. First, what one sample costs alone (the
counts read and drawn, as the monitor does five times a second), as a share of one core; then the
same migration with the live view on
(the terminal display redrawn 5 times a second on a pseudo-terminal-like console, and every event
written as NDJSON) and off (no progress, no events, no sampler thread), alternated in one run;
the figure is the ratio of the medians, on / off (goal: within 5% for the total time and the first
round's bandwidth).

Size: 512 MiB, or LIVEMIG_BENCH_LIVE_VIEW_SIZE (e.g. 1G); with --benchmark-disable (CI's smoke
run) 32 MiB and one pair.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import pytest
from rich.console import Console

from livemig import display, migration
from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally
from livemig.migration import MigrationConfig, MigrationResult

GOAL = 1.05  # on / off, for times (lower is better); off / on for bandwidths


def _size(benchmark: Any) -> int:
    if getattr(benchmark, "disabled", False):
        return 32 << 20
    text = os.environ.get("LIVEMIG_BENCH_LIVE_VIEW_SIZE", "512M").upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


class _LiveLocal:
    """What ``livemig migrate`` wires up on a terminal, writing to /dev/null."""

    def __init__(self) -> None:
        self.sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.console = Console(file=self.sink, force_terminal=True, width=150)
        self.view = display.RichProgress(self.console)
        self.writer = migration.EventWriter(self.sink)
        self.snapshots = 0

    def close(self) -> None:
        self.sink.close()


def _one(guest: GuestConfig, config: MigrationConfig, size: int,
         live: bool) -> tuple[MigrationResult, tuple[float, float]]:
    """One migration; with ``live``, also (snapshots drawn, seconds spent drawing them)."""
    if not live:
        r, _ = migrate_locally(guest, config, size=size, settle_s=1.0, deadline_s=300)
        return r, (0.0, 0.0)
    lv = _LiveLocal()
    count = [0.0, 0.0]  # snapshots shown, seconds spent drawing them
    real = lv.view.snapshot

    def counted(s: migration.Snapshot) -> None:
        t0 = time.perf_counter()
        real(s)
        count[0] += 1
        count[1] += time.perf_counter() - t0

    lv.view.snapshot = counted  # type: ignore[method-assign]
    try:
        with lv.view:
            r, _ = migrate_locally(guest, config, size=size, settle_s=1.0, deadline_s=300, progress=lv.view,
                                   events=display.fan_out(lv.view.event, lv.writer))
    finally:
        lv.close()
    return r, (count[0], count[1])


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_live_view_costs_nothing_measurable(benchmark: Any, mode: str) -> None:
    """Alternates live view on and off (on first in every other pair, so drift cancels). Figures:
    the median over pairs of each pair's on/off ratio (total time; first round's send time), and
    the share of the migration's time the live view spent drawing (the monitor's thread, one core)."""
    size = _size(benchmark)
    pairs = 1 if getattr(benchmark, "disabled", False) else int(os.environ.get("LIVEMIG_BENCH_LIVE_VIEW_PAIRS", "7"))
    guest = (GuestConfig(workload="idle", seed=1) if mode == "precopy"
             else GuestConfig(workload="random", rate=20000, seed=3))
    config = MigrationConfig(postcopy=mode == "postcopy", hints=False, verify=True)
    on: list[MigrationResult] = []
    off: list[MigrationResult] = []
    drawn: list[tuple[float, float]] = []

    def pair() -> None:
        order = [True, False] if len(on) % 2 == 0 else [False, True]
        for live in order:
            r, d = _one(guest, config, size, live)
            assert r.ok and r.verify is not None and r.verify.mismatches == 0
            (on if live else off).append(r)
            if live:
                drawn.append(d)

    benchmark.pedantic(pair, rounds=pairs, iterations=1)
    total = [a.total_ms / b.total_ms for a, b in zip(on, off)]
    first = [a.rounds[0].seconds / b.rounds[0].seconds for a, b in zip(on, off)]
    busy = [d[1] / (r.total_ms / 1e3) for d, r in zip(drawn, on)]
    per_s = [d[0] / (r.total_ms / 1e3) for d, r in zip(drawn, on)]
    ratio_total, ratio_first = statistics.median(total), statistics.median(first)
    benchmark.extra_info.update(
        region_bytes=size, pairs=pairs, total_ratio_each=[round(x, 3) for x in total],
        first_round_ratio_each=[round(x, 3) for x in first], total_time_ratio_on_off=round(ratio_total, 4),
        first_round_time_ratio_on_off=round(ratio_first, 4), snapshots_per_s=[round(x, 1) for x in per_s],
        drawing_share=[round(x, 5) for x in busy], goal=f"median ratios <= {GOAL}",
        met=ratio_total <= GOAL and ratio_first <= GOAL,
    )
    if not getattr(benchmark, "disabled", False):
        print(f"\nlive view, {mode} {size >> 20} MiB, {pairs} pairs: total time on/off median {ratio_total:.3f}"
              f" (each {benchmark.extra_info['total_ratio_each']}), first round send time on/off median"
              f" {ratio_first:.3f} (each {benchmark.extra_info['first_round_ratio_each']}); goal <= {GOAL}:"
              f" {'met' if benchmark.extra_info['met'] else 'not met'}; {statistics.median(per_s):.1f} snapshots/s,"
              f" drawing {100 * statistics.median(busy):.3f}% of the time")


def test_one_sample_costs_microseconds(benchmark: Any) -> None:
    """What the live view does five times a second, timed alone on a 1 GiB source: read the counts
    (every writer's, the dirty popcount, the scanner's) and draw them on a terminal console. The
    figure is the share of one core it takes at 5 Hz (goal: below 1%)."""
    from livemig import _core
    from livemig.migration.monitor import Monitor
    from livemig.migration.source_figures import SourceFigures
    from livemig.source import Source

    pages = (32 << 20) // 4096 if getattr(benchmark, "disabled", False) else (1 << 30) // 4096
    engine = Source.allocate(pages, mode="explicit")
    try:
        lv = _LiveLocal()
        monitor = Monitor("source", lv.view, lv.writer)
        figures = SourceFigures(engine, monitor)
        cfg = _core.WireConfig(page_size=4096, region_pages=pages)
        writers = [_core.FrameWriter(-1, cfg) for _ in range(3)]
        figures.writers += writers
        monitor._meter = figures.counts  # no sampler thread: sampled by hand below
        monitor.phase_name, monitor.round, monitor.round_budget = "precopy", 1, pages

        def one() -> None:
            monitor.sample()

        with lv.view:
            benchmark.pedantic(one, rounds=200, iterations=1, warmup_rounds=5)
        lv.close()
    finally:
        engine.close()
    if getattr(benchmark, "disabled", False):
        return  # CI's smoke run: it ran, nothing to time
    per_sample = benchmark.stats.stats.median
    share = per_sample * 5.0
    benchmark.extra_info.update(region_pages=pages, sample_us=round(per_sample * 1e6, 1),
                                core_share_at_5hz=round(share, 5), goal="< 1% of one core", met=share < 0.01)
    print(f"\nlive view sample on a {pages * 4096 >> 20} MiB source: {per_sample * 1e6:.0f} us (median),"
          f" {100 * share:.3f}% of one core at 5 Hz")
