"""Migrations end to end over loopback TCP, each beside a raw socket copy of the same number of
bytes measured in the same run.

The guest region is filled with non-zero content (generation 0) before the migration starts, so the
source memory is warm; the destination region is fresh, as it is in a real migration, and the raw
baseline receives into a fresh buffer too, so both pay the destination's first touch. Size: 1 GiB,
or LIVEMIG_BENCH_MIGRATION_SIZE (e.g. 256M); with --benchmark-disable (CI's smoke run) 32 MiB.
"""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import threading
import time
from typing import Any

import pytest
from bench_support import record_goal

from livemig import _core
from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally
from livemig.migration import MigrationConfig, MigrationResult


def _size(benchmark: Any) -> int:
    if getattr(benchmark, "disabled", False):
        return 32 << 20
    text = os.environ.get("LIVEMIG_BENCH_MIGRATION_SIZE", "1G").upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def raw_socket_copy_seconds(nbytes: int) -> float:
    """Seconds to move nbytes from a warm buffer over one loopback TCP stream into a fresh one."""
    src = mmap.mmap(-1, nbytes)
    src.write(b"\x5a" * min(nbytes, 1 << 20) * (nbytes // min(nbytes, 1 << 20)))
    dst = mmap.mmap(-1, nbytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        done: list[int] = []
        rx = threading.Thread(target=lambda: done.append(_core._bench.wire_raw_recv(conn.fileno(), dst)))
        t0 = time.perf_counter()
        rx.start()
        _core._bench.wire_raw_send(client.fileno(), src)
        rx.join()
        secs = time.perf_counter() - t0
        client.close()
        conn.close()
    assert len(done) == 1 and dst[nbytes - 1] == 0x5A  # every byte arrived
    src.close()
    dst.close()
    return secs


def send_seconds(r: MigrationResult) -> float:
    return sum(x.seconds for x in r.rounds)


def run(benchmark: Any, guest: GuestConfig, config: MigrationConfig, rounds: int = 3) -> list[MigrationResult]:
    size = _size(benchmark)
    results: list[MigrationResult] = []

    def once() -> None:
        result, _ = migrate_locally(guest, config, size=size, settle_s=1.0, deadline_s=300)
        assert result.ok and result.verify is not None and result.verify.mismatches == 0
        results.append(result)

    benchmark.pedantic(once, rounds=rounds, iterations=1)
    return results


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_idle_guest_throughput(benchmark: Any, postcopy: bool) -> None:
    """1 GiB of non-zero pages, idle guest, hints off: the first round's bandwidth against a raw socket
    copy of the same bytes (goal: at least 75%); downtime (precopy within its 300 ms limit, postcopy
    switchover at most 10 ms)."""
    guest = GuestConfig(workload="idle", seed=1)
    results = run(benchmark, guest, MigrationConfig(postcopy=postcopy, hints=False, verify=True))
    size = results[0].region_bytes
    raw = statistics.median(raw_socket_copy_seconds(size) for _ in range(3))
    first_round = statistics.median(r.rounds[0].seconds for r in results)
    benchmark.extra_info.update(
        region_bytes=size,
        raw_copy_gbps=size / raw / 1e9,
        first_round_gbps=results[0].rounds[0].bytes_sent / first_round / 1e9,
        throughput_ratio_vs_raw=raw / first_round,
        downtime_ms_median=statistics.median(r.downtime_ms for r in results),
        downtime_ms_each=[round(r.downtime_ms, 2) for r in results],
        total_ms_median=statistics.median(r.total_ms for r in results),
    )
    record_goal(benchmark, "first round >= 75% of a raw socket copy (throughput ratio)", raw / first_round, 0.75,
                at_most=False)
    downtime = statistics.median(r.downtime_ms for r in results)
    if postcopy:
        record_goal(benchmark, "postcopy switchover downtime <= 10 ms (ms)", downtime, 10.0, at_most=True)
    else:
        record_goal(benchmark, "precopy downtime within its 300 ms limit (ms)", downtime, 300.0, at_most=True)


def test_hints_save_bytes(benchmark: Any) -> None:
    """A guest with half its memory free: bytes sent with hints against without (same run)."""
    guest = GuestConfig(workload="random", rate=5000, free_fraction=0.5, seed=2)
    with_hints = run(benchmark, guest, MigrationConfig(hints=True, verify=True), rounds=2)
    size = _size(benchmark)
    without = [migrate_locally(guest, MigrationConfig(hints=False, verify=True), size=size, settle_s=1.0,
                               deadline_s=300)[0] for _ in range(2)]
    b_with = statistics.median(r.bytes_sent for r in with_hints)
    b_without = statistics.median(r.bytes_sent for r in without)
    benchmark.extra_info.update(bytes_with_hints=b_with, bytes_without_hints=b_without,
                                saved_fraction=1 - b_with / b_without,
                                pages_hinted=with_hints[0].hints.pages_hinted)


def test_postcopy_fault_latency_random(benchmark: Any) -> None:
    """Postcopy right after one precopy round under the random workload: fault latency p50/p99,
    beside the raw loopback ping-pong of one page (the wire's bench baseline)."""
    guest = GuestConfig(workload="random", rate=50000, seed=3)
    results = run(benchmark, guest, MigrationConfig(postcopy=True, hints=True, verify=True))
    a, b = socket.socketpair()
    server = threading.Thread(target=_core._bench.wire_raw_pingpong_server, args=(b.fileno(), 16, 4096))
    server.start()
    rtts = _core._bench.wire_raw_pingpong_client(a.fileno(), 16, 4096, 2000)
    a.close()
    server.join()
    b.close()
    lat = [r.postcopy.fault_latency_us for r in results]
    benchmark.extra_info.update(
        requests=[r.postcopy.requests for r in results],
        fault_p50_us=statistics.median(x.p50 for x in lat),
        fault_p99_us=statistics.median(x.p99 for x in lat),
        fault_max_us=max(x.max for x in lat),
        raw_pingpong_p50_us=statistics.median(rtts) / 1e3,
        downtime_ms_each=[round(r.downtime_ms, 2) for r in results],
    )
