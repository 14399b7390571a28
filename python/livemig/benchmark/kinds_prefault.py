"""The prefault scenarios of ``livemig bench``: precopy of an idle guest (or one with a light
writer) with the destination's prefault on and off, alternated in one run beside raw socket copies
into fresh and into warm memory, and the downtime split into its steps."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from livemig.benchmark.figures import Figure, Stat, engine_figure, first_round_gbps
from livemig.benchmark.kinds_migration import bare_scans_ms
from livemig.benchmark.scenarios import Scenario, size_label
from livemig.guest import GuestConfig
from livemig.migration.config import DestinationConfig, MigrationConfig
from livemig.migration.results import MigrationResult

if TYPE_CHECKING:
    from livemig.benchmark.runner import Bench

#: The downtime goal of issue 21, in ms, at every size, idle and with the light writer.
DOWNTIME_GOAL_MS = 5.0
#: The light writer's rate, pages per second.
WRITER_PPS = 2000.0
#: What precopy aims the page part of the downtime at (MigrationConfig.downtime_limit_ms): the
#: rest of the 5 ms goes to the sync, the device state and the resume.
DOWNTIME_LIMIT_MS = 2.0


def _split(results: list[MigrationResult]) -> dict[str, float]:
    steps = ("final_sync_ms", "last_pages_ms", "device_state_ms", "resume_ms")
    return {k: statistics.median(getattr(r.downtime_split, k) for r in results) for k in steps}


def run_prefault(b: Bench, sc: Scenario) -> list[Figure]:
    """Precopy with the prefault on and off, alternated (which goes first swaps every run), each
    run beside a raw socket copy into fresh and into warm memory of the same size."""
    size, writer = int(sc.arg("size")), bool(sc.arg("writer"))
    guest = GuestConfig(workload="random" if writer else "idle", rate=WRITER_PPS if writer else 0.0, seed=1)
    config = MigrationConfig(hints=False, verify=True, downtime_limit_ms=DOWNTIME_LIMIT_MS)
    fresh, warm = [], []
    runs: dict[bool, list[MigrationResult]] = {True: [], False: []}
    for i in range(b.repeat):
        fresh.append(b.base.socket_copy_gbps(size))
        warm.append(b.base.socket_copy_warm_gbps(size))
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            runs[on].append(b.migrate(size, guest, config, dest=DestinationConfig(prefault=on)))
    s = size_label(size)
    warm_stat = Stat.of(warm)
    figs: list[Figure] = []
    for on in (True, False):
        rs = runs[on]
        tag = "prefault on" if on else "prefault off"
        pf = rs[-1].prefault
        figs.append(engine_figure(
            f"{sc.name} first round, {tag}", "prefault", "GB/s", "higher", Stat.of(first_round_gbps(r) for r in rs),
            warm_stat, f"raw socket copy into warm memory {s}", "first round >= 75% of a raw copy into warm memory",
            0.75, region_bytes=size, writer_pps=guest.rate, fresh_copy_gbps=statistics.median(fresh),
            total_ms=Stat.of(r.total_ms for r in rs).median, prefault_threads=[r.prefault.threads for r in rs],
            prefault_added_threads=[r.prefault.added_threads for r in rs],
            prefault_tried=list(pf.tried), prefault_tried_gbps=list(pf.tried_gbps),
            prefault_seconds=statistics.median(r.prefault.seconds for r in rs)))
    figs.append(engine_figure(
        f"{sc.name} total, prefault on", "prefault", "ms", "lower", Stat.of(r.total_ms for r in runs[True]),
        Stat.of(r.total_ms for r in runs[False]), "the same migration with the prefault off", None, None,
        region_bytes=size, writer_pps=guest.rate))
    scan = bare_scans_ms(size, b.micro)
    ping = [b.base.pingpong_us(500) / 1e3 for _ in range(3)]
    floor = Stat.of(x + statistics.median(ping) for x in scan)
    for on in (True, False):
        rs = runs[on]
        tag = "prefault on" if on else "prefault off"
        figs.append(engine_figure(
            f"{sc.name} downtime, {tag}", "prefault", "ms", "lower", Stat.of(r.downtime_ms for r in rs), floor,
            "bare PAGEMAP_SCAN of the region + raw ping-pong", f"downtime <= {DOWNTIME_GOAL_MS:g} ms", None,
            goal_ms=DOWNTIME_GOAL_MS, met_goal_ms=Stat.of(r.downtime_ms for r in rs).median <= DOWNTIME_GOAL_MS,
            region_bytes=size, writer_pps=guest.rate, switchover_pages=[r.switchover_pages for r in rs],
            precopy_rounds=[r.precopy_rounds for r in rs], downtime_limit_ms=DOWNTIME_LIMIT_MS,
            **_split(rs)))
    return figs


__all__ = ["DOWNTIME_GOAL_MS", "DOWNTIME_LIMIT_MS", "WRITER_PPS", "run_prefault"]
