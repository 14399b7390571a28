"""The attach scenarios of ``livemig bench`` (docs/attach.md, issue figures): another process's
memory (the bench's worker process, livemig.benchmark.attach_worker) migrated to a destination
process, each figure beside the in-process kind or the bare loop measured in the same run, runs
alternating."""

from __future__ import annotations

import functools
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from livemig import _core
from livemig.attach import AttachListener, end_process
from livemig.benchmark.figures import (
    PAGE,
    Figure,
    Stat,
    engine_figure,
    first_round_gbps,
    histogram_quantile_us,
)
from livemig.benchmark.kinds_migration import buffer_region
from livemig.benchmark.scenarios import Scenario
from livemig.guest import GuestConfig
from livemig.migration.config import MigrationConfig
from livemig.migration.results import MigrationResult
from livemig.source import Source
from livemig.workload.attached import AttachedRegion, AttachedWorkload, AttachFactory
from livemig.workload.buffer import BufferWorkload

if TYPE_CHECKING:
    from livemig.benchmark.runner import Bench

#: How long a worker may take to fill its memory and attach (1 GiB on a busy machine).
ATTACH_WAIT_S = 120.0


def worker_argv(role: str, size: str, socket: str, rate: float) -> list[str]:
    """The worker's command line (``size`` and ``socket`` may be the launch template's fields)."""
    return [sys.executable, "-m", "livemig.benchmark.attach_worker", socket, "--role", role, "--size", size,
            "--rate", f"{rate:g}"]


@contextmanager
def _attached_source(size: int, rate: float = 0.0) -> Iterator[AttachedWorkload]:
    """A source worker of ``size`` bytes, attached; ended on leaving."""
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as d:
        path = os.path.join(d, "attach.sock")
        with AttachListener(path) as lst:
            proc = subprocess.Popen(worker_argv("source", str(size), path, rate), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
            try:
                conn = lst.accept(role="source", wait=ATTACH_WAIT_S, timeout=30.0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        w = AttachedWorkload(conn, process=proc, end=True)
        try:
            yield w
        finally:
            w.stop()


def _attach_migration(b: Bench, size: int, config: MigrationConfig, rate: float) -> MigrationResult:
    """The source worker to a destination worker that attached to the destination's factory before
    the migration starts (a process launched per migration would put its start-up into the first
    round)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start_destination(path: str) -> None:
        p = subprocess.Popen([*worker_argv("destination", str(size), path, rate), "--retry", f"{ATTACH_WAIT_S:g}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None
        if not p.stdout.readline().startswith(b"ready "):
            raise RuntimeError("the destination worker did not attach")

    try:
        with tempfile.TemporaryDirectory(prefix="livemig-bench-") as d, _attached_source(size, rate) as w:
            path = os.path.join(d, "dest.sock")
            factory = functools.partial(AttachFactory, path, wait=ATTACH_WAIT_S, timeout=30.0)
            try:
                return b.migrate(size, w, config, factory=factory, before=lambda _addr: start_destination(path))
            finally:
                for p in procs:
                    end_process(p)
    finally:
        _release()


def _release() -> None:
    """Frees what the last migration held now: its engines and mappings (of the process's memfd too,
    which keeps its pages alive) sit in reference cycles the collector may not visit for a while."""
    gc.collect()


def run_attach_precopy(b: Bench, sc: Scenario) -> list[Figure]:
    """An idle attached process against an idle in-process user buffer of the same size, every page
    written in both: first round bandwidth and switchover downtime, alternating."""
    size = int(sc.arg("size"))
    config = MigrationConfig(hints=False, verify=True)
    att: list[MigrationResult] = []
    own: list[MigrationResult] = []
    buffer = buffer_region(size)  # one for every run, as the migration scenarios do
    for _ in range(b.repeat):
        att.append(_attach_migration(b, size, config, 0.0))
        own.append(b.migrate(size, BufferWorkload(buffer), config))
        _release()
    del buffer
    _release()
    details = {"region_bytes": size, "total_ms_attach": Stat.of(r.total_ms for r in att).median,
               "total_ms_buffer": Stat.of(r.total_ms for r in own).median,
               "zero_pages_attach": att[0].zero_pages, "zero_pages_buffer": own[0].zero_pages}
    return [
        engine_figure(f"{sc.name} first round", "attach", "GB/s", "higher", Stat.of(map(first_round_gbps, att)),
                      Stat.of(map(first_round_gbps, own)), "in-process user buffer (buffer kind), same size",
                      "within 10% of the in-process user buffer", 0.9, **details),
        engine_figure(f"{sc.name} downtime", "attach", "ms", "lower", Stat.of(r.downtime_ms for r in att),
                      Stat.of(r.downtime_ms for r in own), "in-process user buffer (buffer kind), same size",
                      "within 1.5x of the in-process kind", 1.5, **details),
    ]


def run_attach_sync(b: Bench, sc: Scenario) -> list[Figure]:
    """A dirty sync of an attached process's memory (its pagemap and uffd, received) with 1% of its
    pages written by the process, against the bare PAGEMAP_SCAN loop over the same writes in this
    process; the in-process Source's sync beside it."""
    size = int(sc.arg("size"))
    B = _core._bench
    att, raw, own = [], [], []
    local = Source.allocate(size // PAGE)
    B.source_touch_pages(local.address, local.pages, 1, 1)
    local.sync()
    with _attached_source(size) as w:
        assert w.process is not None and w.process.stdin is not None and w.process.stdout is not None
        region = w.region
        assert isinstance(region, AttachedRegion)
        src = _core.attached_source(region.connection, region.mapping)
        src.sync()
        for i in range(b.micro):
            w.process.stdin.write(f"write 100 {i % 100}\n".encode())
            w.process.stdin.flush()
            while not (line := w.process.stdout.readline()).startswith(b"wrote "):
                if not line:
                    raise RuntimeError("the worker process ended before it wrote")
            t0 = time.perf_counter()
            src.sync()
            att.append((time.perf_counter() - t0) * 1e3)
            B.source_touch_pages(local.address, local.pages, 100, 2 + i)
            t0 = time.perf_counter()
            B.source_pagemap_scan_loop(local.address, local.nbytes, 1024)
            raw.append((time.perf_counter() - t0) * 1e3)
            B.source_touch_pages(local.address, local.pages, 100, 3 + i)
            t0 = time.perf_counter()
            local.sync()
            own.append((time.perf_counter() - t0) * 1e3)
        src.stop_tracking()
        del src, region
    del local
    _release()
    return [
        engine_figure(f"{sc.name} sync, 1% written", "attach", "ms", "lower", Stat.of(att), Stat.of(raw),
                      "bare PAGEMAP_SCAN loop over the same writes", "within 1.2x of the bare loop", 1.2,
                      region_bytes=size, in_process_sync_ms=statistics.median(own))
    ]


def run_attach_postcopy(b: Bench, sc: Scenario) -> list[Figure]:
    """Postcopy with random writes on both sides (the process's worker; the model guest's random
    workload, in-process), same rate: fault service p50, alternating."""
    size = int(sc.arg("size"))
    rate = 5 * b.dirty_rate
    config = MigrationConfig(postcopy=True, hints=False, verify=True)
    guest = GuestConfig(workload="random", rate=rate, seed=3)
    att: list[MigrationResult] = []
    own: list[MigrationResult] = []
    for _ in range(b.repeat):
        att.append(_attach_migration(b, size, config, rate))
        own.append(b.migrate(size, guest, config))
        _release()

    def p50(r: MigrationResult) -> float:
        return histogram_quantile_us(r.postcopy.histogram, 0.5, r.postcopy.histogram_upper_us or None)

    if min(r.postcopy.requests for r in att + own) == 0:
        raise RuntimeError("a postcopy run had no faults to measure")
    return [
        engine_figure(f"{sc.name} fault p50", "attach", "us", "lower", Stat.of(map(p50, att)), Stat.of(map(p50, own)),
                      "in-process kind (model guest, random writes), same run", "within 1.2x of the in-process kind",
                      1.2, region_bytes=size, rate_pages_per_s=rate,
                      requests_attach=Stat.of(r.postcopy.requests for r in att).median,
                      requests_in_process=Stat.of(r.postcopy.requests for r in own).median,
                      downtime_ms_attach=Stat.of(r.downtime_ms for r in att).median,
                      downtime_ms_in_process=Stat.of(r.downtime_ms for r in own).median)
    ]


__all__ = ["run_attach_postcopy", "run_attach_precopy", "run_attach_sync", "worker_argv"]
