"""Destination benchmarks, each beside a raw baseline measured in the same run (interleaved round by
round, so machine noise hits both alike) and reported as a ratio in benchmark.extra_info.

- placement throughput, 1-page and 64-page calls: DestRegion.place (rule 1 checks, counters,
  latency bookkeeping) against a plain UFFDIO_COPY loop (_core._bench.DestRawCopy). Goal: >= 0.9 of raw.
- staged receive, 64-page runs: memcpy into a staging buffer then UFFDIO_COPY, against the same
  with UFFDIO_MOVE (the move leaves holes that the next fill must fault in again).
- fault round trip (fault, event, placement, wake) p50/p99: the engine's fault thread with a
  loopback request sink, and with local fill, against a minimal poll/read/UFFDIO_COPY handler
  (_core._bench.DestRawHandler). Goal: p50 within 1.5x of raw.

Warm memory: source buffers are written before timing; every round places into pages the previous
round dropped, in the engine and the baseline alike (UFFDIO_COPY always allocates the page).
Run: PYTHONPATH=python python -m pytest bench/bench_dest.py --benchmark-columns=median,ops -q -s
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np
import pytest
from bench_support import record_goal

from livemig import _core
from livemig.destination import Destination, postcopy_unsupported_reason

PAGE = os.sysconf("SC_PAGE_SIZE")
REGION = 64 << 20
PAGES = REGION // PAGE
RT_PAGES = 256  # faults per round-trip round (short rounds, interleaved: load shifts hit both)


_REASON = postcopy_unsupported_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"userfaultfd unavailable: {_REASON}")


def _rounds(benchmark: Any, n: int) -> int:
    return n if benchmark.enabled else 1


@pytest.fixture(scope="module")
def src() -> np.ndarray:
    # Random (not zero, not compressible) and written now: warm.
    return np.random.default_rng(7).integers(0, 256, REGION, dtype=np.uint8)


def _report(name: str, info: dict[str, Any]) -> None:
    items = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    print(f"\n[{name}] " + ", ".join(items))


@pytest.mark.parametrize("run_pages", [1, 64])
def test_place_throughput_vs_raw_copy(benchmark: Any, src: np.ndarray, run_pages: int) -> None:
    benchmark.group = f"dest place {run_pages}-page calls"
    raw = _core._bench.DestRawCopy(REGION)
    d = Destination(REGION)
    d.start_postcopy()
    # Warm-up round of each (page tables, allocator).
    raw.run(run_pages)
    _core._bench.dest_engine_place(d.region, src, run_pages)
    d.discard([(0, PAGES)])
    raw_s: list[float] = []
    eng_s: list[float] = []

    def setup() -> None:
        raw_s.append(raw.run(run_pages))  # the baseline for this round, same conditions
        d.discard([(0, PAGES)])

    def target() -> None:
        eng_s.append(_core._bench.dest_engine_place(d.region, src, run_pages))

    benchmark.pedantic(target, setup=setup, rounds=_rounds(benchmark, 11), iterations=1)
    # The work really happened: every page placed once, with the right bytes.
    assert d.received.count() == PAGES
    assert np.array_equal(d.array[:: PAGE * 97], src[:: PAGE * 97])
    c = d.counters()
    assert c.errors == 0 and c.eexist == 0
    d.stop()
    raw_med, eng_med = statistics.median(raw_s), statistics.median(eng_s)
    info = {
        "bytes": REGION,
        "run_pages": run_pages,
        "raw_GBps": REGION / raw_med / 1e9,
        "engine_GBps": REGION / eng_med / 1e9,
        "raw_us_per_page": raw_med / PAGES * 1e6,
        "engine_us_per_page": eng_med / PAGES * 1e6,
        "ratio_engine_to_raw": raw_med / eng_med,
        "rounds": len(eng_s),
    }
    benchmark.extra_info.update(info)
    record_goal(benchmark, "placement >= 0.9 of raw UFFDIO_COPY (throughput ratio)", raw_med / eng_med, 0.9,
                at_most=False)
    _report(benchmark.group, info)


def test_staged_copy_vs_move(benchmark: Any, src: np.ndarray) -> None:
    benchmark.group = "dest staged receive 64-page runs"
    run = 64
    dc, dm = Destination(REGION), Destination(REGION)
    dc.start_postcopy()
    dm.start_postcopy()
    if not dm.region.uffd_features & (1 << 16):
        pytest.skip("kernel lacks UFFD_FEATURE_MOVE (Linux 6.8)")
    _core._bench.dest_staged_place(dc.region, src, run, False)
    _core._bench.dest_staged_place(dm.region, src, run, True)
    copy_t: list[Any] = []
    move_t: list[Any] = []

    def setup() -> None:
        dc.discard([(0, PAGES)])
        dm.discard([(0, PAGES)])
        move_t.append(_core._bench.dest_staged_place(dm.region, src, run, True))

    def target() -> None:
        copy_t.append(_core._bench.dest_staged_place(dc.region, src, run, False))

    benchmark.pedantic(target, setup=setup, rounds=_rounds(benchmark, 9), iterations=1)
    for d in (dc, dm):
        assert d.received.count() == PAGES
        assert np.array_equal(d.array[:: PAGE * 89], src[:: PAGE * 89])
        d.stop()

    def med(ts: list[Any], key: str) -> float:
        return statistics.median(getattr(t, key) for t in ts)

    def total(ts: list[Any]) -> float:
        return statistics.median(t.fill_s + t.place_s for t in ts)

    info = {
        "bytes": REGION,
        "copy_fill_GBps": REGION / med(copy_t, "fill_s") / 1e9,
        "copy_place_GBps": REGION / med(copy_t, "place_s") / 1e9,
        "copy_total_GBps": REGION / total(copy_t) / 1e9,
        "move_fill_GBps": REGION / med(move_t, "fill_s") / 1e9,
        "move_place_GBps": REGION / med(move_t, "place_s") / 1e9,
        "move_total_GBps": REGION / total(move_t) / 1e9,
        "ratio_move_total_to_copy_total": total(copy_t) / total(move_t),
    }
    benchmark.extra_info.update(info)
    _report(benchmark.group, info)


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) / 1e3  # ns -> us


@pytest.mark.parametrize("kind", ["request", "local_fill"])
def test_fault_round_trip_vs_raw_handler(benchmark: Any, src: np.ndarray, kind: str) -> None:
    benchmark.group = f"dest fault round trip ({kind})"
    raw = _core._bench.DestRawHandler(RT_PAGES * PAGE)
    rt_src = src[: RT_PAGES * PAGE]
    raw.round_trips()  # warm-up
    raw_lat: list[np.ndarray] = []
    eng_lat: list[np.ndarray] = []
    hists: list[dict[str, float]] = []

    def one_engine_round() -> np.ndarray:
        d = Destination(RT_PAGES * PAGE)
        if kind == "request":
            # Requests are served at once, on the fault thread.
            _core._bench.dest_attach_loopback(d.region, rt_src)
        else:
            d.set_local_fill([(0, RT_PAGES)], 0x5A5A5A5A)
        d.start_postcopy()
        lat = _core._bench.dest_touch_pages(d.region, RT_PAGES)
        # The last placement marks received just after it woke the toucher: let it finish.
        deadline = time.monotonic() + 10
        while d.received.count() < RT_PAGES and time.monotonic() < deadline:
            time.sleep(0.001)
        c = d.counters()
        assert c.errors == 0 and d.received.count() == RT_PAGES
        if kind == "request":
            assert np.array_equal(d.array[:: PAGE * 31], rt_src[:: PAGE * 31])
        else:
            assert c.local_fills == RT_PAGES and c.requests == 0
        h = d.latency().fault
        hists.append({"p50_us": h.p50_us, "p99_us": h.p99_us, "max_us": h.max_us})
        d.stop()
        return lat

    one_engine_round()  # warm-up
    hists.clear()

    def setup() -> None:
        raw_lat.append(raw.round_trips())

    def target() -> None:
        eng_lat.append(one_engine_round())

    benchmark.pedantic(target, setup=setup, rounds=_rounds(benchmark, 41), iterations=1)
    r, e = np.concatenate(raw_lat), np.concatenate(eng_lat)
    info = {
        "faults": int(e.size),
        "raw_p50_us": _pct(r, 50),
        "raw_p99_us": _pct(r, 99),
        "engine_p50_us": _pct(e, 50),
        "engine_p99_us": _pct(e, 99),
        "ratio_p50_engine_to_raw": _pct(e, 50) / _pct(r, 50),
        "ratio_p99_engine_to_raw": _pct(e, 99) / _pct(r, 99),
        "engine_hist_p50_us_bucket": statistics.median(h["p50_us"] for h in hists),
        "engine_hist_p99_us_bucket": statistics.median(h["p99_us"] for h in hists),
    }
    benchmark.extra_info.update(info)
    record_goal(benchmark, "fault round trip p50 within 1.5x of raw (ratio)", _pct(e, 50) / _pct(r, 50), 1.5,
                at_most=True)
    _report(benchmark.group, info)
