"""Encrypted wire benchmarks over loopback TCP, each beside the same work in plaintext in the same
run (rounds interleaved: plaintext, TLS, plaintext, TLS, ...), reported as ratios in extra_info.

- throughput: FrameWriter.send_region through each channel's TLS session -> FrameReader into the
  destination region (received bitmap marked), one channel and three (main + 2 page channels),
  against two plaintext connections' worth of the same. Goal (for a migration): >= 50 %.
- the fault path: REQUEST on the return path, the page back on the urgent channel into the
  region, TLS against plaintext. Goal: p50 at most 10 us above plaintext.

Both connections are keyed by a shared secret and made by wire.connect / Listener.accept (the
encrypted one with encrypt=True, so TLS runs on loopback). Memory is warmed before timing. Run:
    PYTHONPATH=python python -m pytest bench/bench_tls.py --benchmark-columns=median,ops -q
"""

from __future__ import annotations

import itertools
import statistics
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from livemig import _core, wire
from livemig.benchmark.sockets import parallel
from livemig.protocol import FrameType

PAGE = 4096
MIB = 1 << 20
REGION_BYTES = 128 * MIB
NPAGES = REGION_BYTES // PAGE
ROUNDS = 5
SECRET = b"bench-tls-secret-0123456789"


def _pair(encrypt: bool) -> tuple[wire.Connection, wire.Connection]:
    caps = wire.Capabilities.all(extra_channels=2).without("checksums")
    o = wire.WireOptions(page_size=PAGE, region_bytes=REGION_BYTES, capabilities=caps, timeout=60, secret=SECRET,
                         encrypt=encrypt or None)
    with wire.Listener("127.0.0.1:0") as L:
        box: list[wire.Connection] = []
        t = threading.Thread(target=lambda: box.append(L.accept(o)))
        t.start()
        src = wire.connect(str(L.address), o)
        t.join(30)
    assert src.encrypted is encrypt and box[0].encrypted is encrypt
    return src, box[0]


@pytest.fixture(scope="module")
def pairs() -> Iterator[dict[bool, tuple[wire.Connection, wire.Connection]]]:
    out = {False: _pair(False), True: _pair(True)}
    yield out
    for s, d in out.values():
        s.close()
        d.close()


@pytest.fixture(scope="module")
def regions() -> tuple[np.ndarray, np.ndarray]:
    src = np.random.default_rng(0).integers(1, 256, size=REGION_BYTES, dtype=np.uint8)
    return src, np.full(REGION_BYTES, 0xEE, dtype=np.uint8)


def _round(pair: tuple[wire.Connection, wire.Connection], src: np.ndarray, dst: np.ndarray, n: int,
           received: _core.PageBitmap) -> Callable[[], float]:
    s, d = pair
    s_chans, d_chans = [s.main, *s.pages][:n], [d.main, *d.pages][:n]
    writers = [s.writer(c) for c in s_chans]
    readers = [d.reader(c) for c in d_chans]
    for r in readers:
        r.attach_region(dst, received)
    bounds = np.linspace(0, NPAGES, n + 1).astype(int)
    parts = [(int(a), int(b - a)) for a, b in itertools.pairwise(bounds)]

    def run() -> float:
        received.reset()
        jobs: list[Callable[[], object]] = []
        for (first, count), w, r in zip(parts, writers, readers, strict=True):
            jobs.append(lambda w=w, f=first, c=count: (w.send_region(src, [(f, c)]), w.send_end()))
            jobs.append(lambda r=r: wire.read_frame(r).type == FrameType.END or pytest.fail("no END"))
        return parallel(jobs)

    return run


@pytest.mark.benchmark(group="tls-throughput")
@pytest.mark.parametrize("channels", [1, 3])
def test_tls_throughput_beside_plaintext(benchmark, pairs, regions, channels: int) -> None:
    src, dst = regions
    received = _core.PageBitmap(NPAGES)
    plain = _round(pairs[False], src, dst, channels, received)
    tls = _round(pairs[True], src, dst, channels, received)
    plain_s: list[float] = []
    tls_s: list[float] = []
    benchmark.pedantic(lambda: tls_s.append(tls()), setup=lambda: plain_s.append(plain()), rounds=ROUNDS, iterations=1)
    # The work really happened, encrypted: every page arrived, byte for byte, through TLS.
    assert received.count() == NPAGES and np.array_equal(src, dst)
    assert pairs[True][1].main.tls is not None and pairs[True][1].main.tls.path == "userspace"
    p, t = statistics.median(plain_s), statistics.median(tls_s)
    benchmark.extra_info.update(
        baseline=f"plaintext x{channels}", baseline_median_s=p, time_ratio_vs_baseline=round(t / p, 3),
        bytes=REGION_BYTES, channels=channels, warmed=True, plaintext_gbps=round(REGION_BYTES / p / 1e9, 3),
        tls_gbps=round(REGION_BYTES / t / 1e9, 3), tls_share_of_plaintext=round(p / t, 3),
        cipher=pairs[True][0].main.tls.cipher if pairs[True][0].main.tls else "", goal="TLS >= 50% of plaintext",
    )


@pytest.mark.benchmark(group="tls-request-rtt")
def test_tls_request_round_trip_beside_plaintext(benchmark) -> None:
    """The core's fault-path loop (REQUEST out on the return path, the page back on the urgent
    socket into a region), TLS and plaintext batches alternated; p50s paired per batch."""
    plain: list[float] = []
    tls: list[float] = []

    def batch(encrypted: bool, into: list[float]) -> None:
        into.append(float(np.median(_core._bench.tls_request_round_trips(tls=encrypted, iters=500))) / 1e3)

    benchmark.pedantic(lambda: batch(True, tls), setup=lambda: batch(False, plain), rounds=ROUNDS, iterations=1)
    added = [t - p for t, p in zip(tls, plain, strict=True)]
    benchmark.extra_info.update(
        baseline="plaintext round trip p50", baseline_p50_us=statistics.median(plain), tls_p50_us=statistics.median(tls),
        added_p50_us=statistics.median(added), goal="at most 10 us above plaintext",
    )
    assert all(x > 0 for x in plain + tls)
