"""The migration scenarios of ``livemig bench``: real loopback migrations (a destination process,
this process the source), each figure beside a raw baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from livemig import _core
from livemig.benchmark.figures import (
    MIB,
    PAGE,
    Figure,
    Stat,
    buckets_quantile_us,
    engine_figure,
    first_round_gbps,
    merged_buckets,
)
from livemig.benchmark.scenarios import Scenario, size_label
from livemig.guest import GuestConfig, Workload
from livemig.memory import Region
from livemig.migration.config import MigrationConfig
from livemig.migration.results import POWER_OF_TWO_UPPER_US, MigrationResult
from livemig.source import Source
from livemig.workload.buffer import BufferWorkload

if TYPE_CHECKING:
    from livemig.benchmark.runner import Bench


def run_baselines(b: Bench, sc: Scenario) -> list[Figure]:
    """The bandwidth and latency baselines not tied to one scenario."""
    n = min(int(sc.arg("size")), 256 * MIB)
    for _ in range(b.micro):
        b.base.memcpy_gbps(n)
        b.base.read_gbps(n)
        b.base.socket_copy_warm_gbps(n)
        b.base.uffd_copy_us()
        b.base.pingpong_us()
    for _ in range(min(b.micro, 3)):
        b.base.first_touch_gbps(n)
    return []

def buffer_region(size: int) -> Region:
    """A user's buffer of ``size`` bytes, warm and without zero pages (like the model guest's)."""
    region = Region.allocate(size)
    region.array.reshape(-1, PAGE)[:, :8] = np.arange(1, region.pages + 1, dtype=np.uint64)[:, None].view(np.uint8)
    return region


def run_migration(b: Bench, sc: Scenario) -> list[Figure]:
    size, mode, workload = int(sc.arg("size")), sc.arg("mode"), sc.arg("workload")
    buffer = buffer_region(size) if workload == "buffer" else None
    guest = GuestConfig(
        workload="idle" if buffer is not None else workload,
        rate=0.0 if workload in ("idle", "buffer") else b.dirty_rate, seed=1
    )
    config = MigrationConfig(postcopy=mode == "postcopy", hints=False, verify=True)
    eng, raw, warm, results = [], [], [], []
    for _ in range(b.repeat):
        raw.append(b.base.socket_copy_gbps(size))
        warm.append(b.base.socket_copy_warm_gbps(size))
        r = b.migrate(size, guest if buffer is None else BufferWorkload(buffer), config)
        results.append(r)
        eng.append(first_round_gbps(r))
    details = {
        "region_bytes": size,
        "workload": workload,
        "dirty_rate": guest.rate,
        "raw_copy_warm_destination_gbps": statistics.median(warm),
        "ratio_vs_warm_destination": statistics.median(eng) / statistics.median(warm),
        "downtime_ms": Stat.of(r.downtime_ms for r in results).median,
        "total_ms": Stat.of(r.total_ms for r in results).median,
        "precopy_rounds": Stat.of(r.precopy_rounds for r in results).median,
        "bytes_sent": Stat.of(r.bytes_sent for r in results).median,
    }
    if mode == "postcopy":
        details["requests"] = Stat.of(r.postcopy.requests for r in results).median
        details["fault_p50_us"] = Stat.of(r.postcopy.fault_latency_us.p50 for r in results).median
    goal = "precopy >= 75% of a raw socket copy" if mode == "precopy" else None
    figs = [
        engine_figure(
            f"{sc.name} first round",
            "migration",
            "GB/s",
            "higher",
            Stat.of(eng),
            Stat.of(raw),
            f"raw socket copy {size_label(size)}",
            goal,
            0.75 if mode == "precopy" else None,
            **details,
        )
    ]
    if mode == "precopy" and workload == "idle":
        figs.append(switchover_figure(b, sc, size, results))
    return figs

def switchover_figure(b: Bench, sc: Scenario, size: int, results: list[MigrationResult]) -> Figure:
    """Downtime of an idle guest's precopy against its floor: one bare PAGEMAP_SCAN of the
    region (the final sync) plus one raw ping-pong (the device state and the resume ack)."""
    scan = bare_scans_ms(size, b.micro)
    ping = [b.base.pingpong_us(500) / 1e3 for _ in range(3)]
    floor = Stat.of(s + statistics.median(ping) for s in scan)
    return engine_figure(
        f"switchover-{size_label(size)} downtime",
        "scaling",
        "ms",
        "lower",
        Stat.of(r.downtime_ms for r in results),
        floor,
        "bare PAGEMAP_SCAN of the region + raw ping-pong",
        None,
        None,
        region_bytes=size,
        scan_ms=statistics.median(scan),
        pingpong_ms=statistics.median(ping),
    )

def bare_scans_ms(size: int, runs: int) -> list[float]:
    """Milliseconds of `runs` bare PAGEMAP_SCAN walks over a populated, tracked region with
    nothing written (what a final sync of an idle guest must do at least)."""
    src = Source.allocate(size // PAGE)  # unmapped when the last reference goes
    _core._bench.source_touch_pages(src.address, src.pages, 1, 1)
    src.sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _core._bench.source_pagemap_scan_loop(src.address, src.nbytes, 1024)
        out.append((time.perf_counter() - t0) * 1e3)
    return out

def run_zero(b: Bench, sc: Scenario) -> list[Figure]:
    """An all-zero idle guest: wire bytes per page against a page (what a raw copy moves)."""
    size = int(sc.arg("size"))
    guest = GuestConfig(workload="idle", fill="zero", seed=1)
    per_page = []
    results = []
    for _ in range(b.repeat):
        r = b.migrate(size, guest, MigrationConfig(hints=False, verify=True))
        results.append(r)
        per_page.append(r.bytes_sent / (size // PAGE))
    return [
        engine_figure(
            f"{sc.name} wire bytes per page",
            "zero",
            "B/page",
            "lower",
            Stat.of(per_page),
            Stat.of([float(PAGE)]),
            "one page's bytes (what a raw copy sends)",
            "zero pages cost no payload bytes (< 1% of a page)",
            0.01,
            region_bytes=size,
            zero_pages=results[0].zero_pages,
            bytes_sent=results[0].bytes_sent,
        )
    ]

def run_hints(b: Bench, sc: Scenario) -> list[Figure]:
    """An idle guest with a share of its memory free: bytes sent with hints against without
    (same run); and what a hinted page cost on the wire."""
    size, free = int(sc.arg("size")), float(sc.arg("free"))
    guest = GuestConfig(workload="idle", free_fraction=free, seed=2)
    on, off, hinted = [], [], []
    for _ in range(b.repeat):
        off.append(
            float(
                b.migrate(size, guest, MigrationConfig(hints=False, verify=True)).bytes_sent
            )
        )
        r = b.migrate(size, guest, MigrationConfig(hints=True, verify=True))
        on.append(float(r.bytes_sent))
        hinted.append(float(r.hints.pages_hinted))
    pages_hinted = statistics.median(hinted)
    figs = [
        engine_figure(
            f"{sc.name} bytes sent",
            "hints",
            "MB",
            "lower",
            Stat.of(x / 1e6 for x in on),
            Stat.of(x / 1e6 for x in off),
            "bytes sent with hints off",
            None,
            None,
            region_bytes=size,
            free_fraction=free,
            pages_hinted=pages_hinted,
            expected_ratio=1 - free,
        )
    ]
    if pages_hinted > 0:
        cost = [
            max(0.0, b_on - (b_off - h * PAGE)) / h
            for b_on, b_off, h in zip(on, off, hinted)
            if h
        ]
        figs.append(
            engine_figure(
                f"{sc.name} wire bytes per hinted page",
                "hints",
                "B/page",
                "lower",
                Stat.of(cost),
                Stat.of([float(PAGE)]),
                "one page's bytes (hints off)",
                "hinted pages cost no payload bytes (< 1% of a page)",
                0.01,
                pages_hinted=pages_hinted,
            )
        )
    return figs

def run_faults(b: Bench, sc: Scenario) -> list[Figure]:
    """Postcopy after one precopy round with a writing guest (increment: address order;
    random), urgent channel on or off: fault read to placed, p50 and p99, against a raw loopback
    ping-pong (24 B out, a page back) plus one raw UFFDIO_COPY, measured between the migrations;
    the request-to-placed and blocked measures beside them (all runs' histograms merged)."""
    size, access, urgent = int(sc.arg("size")), sc.arg("access"), bool(sc.arg("urgent"))
    # Sequential: the increment writer at full speed dirties whole passes during the first
    # round, so after switchover it faults page after page in address order, racing the push.
    workload: Workload = "increment" if access == "sequential" else "random"
    guest = GuestConfig(
        workload=workload, rate=0.0 if access == "sequential" else 5 * b.dirty_rate, seed=3
    )
    off = frozenset() if urgent else frozenset({"urgent-channel"})
    config = MigrationConfig(postcopy=True, hints=False, verify=True, disable_capabilities=off)
    p50, p99, floor50, floor99, requests, ping, copy, push = [], [], [], [], [], [], [], []
    results: list[MigrationResult] = []
    for _ in range(b.repeat):
        ping.append(b.base.pingpong_us())
        copy.append(b.base.uffd_copy_us())
        floor50.append(ping[-1] + copy[-1])
        floor99.append(b.base.pingpong_p99 + copy[-1])
        r = b.migrate(size, guest, config)
        results.append(r)
        if ("urgent-channel" in r.capabilities) != urgent:
            raise RuntimeError(
                f"urgent channel negotiated: {'urgent-channel' in r.capabilities}"
            )
        p50.append(r.postcopy.fault_latency_us.p50)
        p99.append(r.postcopy.fault_latency_us.p99)
        requests.append(float(r.postcopy.requests))
        if r.push_seconds > 0:
            push.append(r.push_bytes / r.push_seconds / 1e9)
    if statistics.median(requests) == 0:
        raise RuntimeError("no postcopy faults were requested: nothing to measure")
    details: dict[str, object] = {
        "region_bytes": size, "workload": workload, "urgent_channel": urgent, "requests": statistics.median(requests),
        "dirty_rate": guest.rate, "pingpong_p50_us": statistics.median(ping), "uffd_copy_us": statistics.median(copy),
        "push_gbps": statistics.median(push) if push else 0.0,
    }
    details.update(latency_details(results))
    return [
        engine_figure(
            f"{sc.name} fault p50", "faults", "us", "lower", Stat.of(p50), Stat.of(floor50),
            "raw ping-pong p50 + raw UFFDIO_COPY",
            "fault read to placed p50 within 1.3x of raw ping-pong + UFFDIO_COPY", 1.3, **details,
        ),
        engine_figure(
            f"{sc.name} fault p99", "faults", "us", "lower", Stat.of(p99), Stat.of(floor99),
            "raw ping-pong p99 + raw UFFDIO_COPY",
            "fault read to placed p99 within 1.3x of raw ping-pong p99 + UFFDIO_COPY", 1.3,
            region_bytes=size, workload=workload, urgent_channel=urgent,
        ),
    ]


def latency_details(results: list[MigrationResult]) -> dict[str, object]:
    """The three postcopy latency measures over all runs (their histograms merged): p50, p90,
    p99, p99.9 and max per measure, the samples over 1 ms and over 10 ms, the merged buckets
    with their bounds per measure (for plots), plus the power-of-two view of the fault ones."""
    out: dict[str, object] = {}
    for name, summaries, buckets in (
        ("fault", [r.postcopy.fault_latency_us for r in results], [r.postcopy.fault_buckets for r in results]),
        ("request", [r.postcopy.request_latency_us for r in results], [r.postcopy.request_buckets for r in results]),
        ("blocked", [r.postcopy.blocked_us for r in results], [r.postcopy.blocked_buckets for r in results]),
    ):
        merged = merged_buckets(buckets)
        top = max((s.max for s in summaries), default=0.0)
        for q, label in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99_9")):
            out[f"{name}_{label}_us"] = buckets_quantile_us(merged, q, top)
        out[f"{name}_max_us"] = top
        out[f"{name}_over_1ms"] = sum(s.over_1ms for s in summaries)
        out[f"{name}_over_10ms"] = sum(s.over_10ms for s in summaries)
        out[f"{name}_buckets"] = {"lower_us": list(merged.lower_us), "upper_us": list(merged.upper_us),
                                  "counts": list(merged.counts)}
        if name == "fault":
            out["histogram"] = list(merged.power_of_two())
            out["histogram_upper_us"] = list(POWER_OF_TWO_UPPER_US)
    return out


def run_channels(b: Bench, sc: Scenario) -> list[Figure]:
    size, n = int(sc.arg("size")), int(sc.arg("channels"))
    guest = GuestConfig(workload="idle", seed=1)
    config = MigrationConfig(channels=n, hints=False, verify=True)
    eng, raw = [], []
    for _ in range(b.repeat):
        raw.append(b.base.socket_copy_gbps(size, n))
        r = b.migrate(size, guest, config)
        eng.append(first_round_gbps(r))
    return [
        engine_figure(
            f"{sc.name} first round",
            "channels",
            "GB/s",
            "higher",
            Stat.of(eng),
            Stat.of(raw),
            f"raw socket copy x{n}",
            "precopy >= 75% of a raw socket copy",
            0.75,
            region_bytes=size,
            channels=n,
        )
    ]


__all__ = ["buffer_region", "run_baselines", "run_channels", "run_faults", "run_hints", "run_migration", "run_zero"]
