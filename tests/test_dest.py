"""Destination: userfaultfd placement, the fault thread, local fills, discard, counters.

Real userfaultfd throughout. Anything that can block on a fault runs in a forked child with a
deadline (dest_helpers.run_in_child); faulting is done by C++ threads (_core._bench.dest_touch_threads)
that block without the GIL, so Python threads can place pages meanwhile."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import LivemigError, UnsupportedError, _core
from livemig.destination import DestCounters, Destination, FaultLatencies, LatencyStats
from livemig.memory import Region

from dest_helpers import PAGE, needs_uffd, run_in_child

MADV_DONTNEED = 4


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition the kernel/fault thread makes true asynchronously; fail after timeout."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.0005)


def pages_of(arr: np.ndarray, first: int, n: int = 1) -> np.ndarray:
    return arr[first * PAGE : (first + n) * PAGE]


def random_ref(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8)


def touch_async(d: Destination, rows: list[list[int]]) -> tuple[threading.Thread, list[Any]]:
    """Start C++ threads faulting on pages (one per row) from a Python thread; returns it and a box
    that receives the bytes read."""
    box: list[Any] = []
    t = threading.Thread(
        target=lambda: box.append(_core._bench.dest_touch_threads(d.region, np.array(rows, np.uint64)))
    )
    t.start()
    return t, box


# ---- precopy (no userfaultfd: nothing can block) ----


def test_precopy_place_overwrites_and_marks_received() -> None:
    d = Destination(8 * PAGE)
    assert d.state == "precopy" and d.pages == 8 and d.page_size == PAGE
    a, b = random_ref(2, 1), random_ref(2, 2)
    assert d.place(3, a) == 2
    assert d.place(3, b) == 2  # precopy resends dirtied pages: newer versions overwrite
    assert np.array_equal(pages_of(d.array, 3, 2), b)
    d.array[0:PAGE] = 7
    d.mark_received(0, 1)
    assert d.place_fill(6, 1, 0x01020304) == 1
    assert np.all(pages_of(d.array, 6).view(np.uint32) == 0x01020304)
    assert [d.received.test(i) for i in range(8)] == [1, 0, 0, 1, 1, 0, 1, 0]
    assert d.discard([(3, 2), (5, 1)]) == 2
    assert not d.received.test(3) and not d.received.test(4)
    assert np.all(pages_of(d.array, 3, 2) == 0)  # dropped: fresh zero pages
    assert d.memoryview.nbytes == 8 * PAGE and not d.memoryview.readonly
    d.stop()
    assert d.state == "stopped"
    with pytest.raises(LivemigError, match="stopped"):
        d.place(0, a[:PAGE])


def test_argument_errors() -> None:
    with pytest.raises(ValueError):
        Destination(PAGE + 1)
    with pytest.raises(ValueError):
        Destination(0)
    d = Destination(4 * PAGE)
    with pytest.raises(IndexError):
        d.place(4, np.zeros(PAGE, np.uint8))
    with pytest.raises(IndexError):
        d.place(3, np.zeros(2 * PAGE, np.uint8))
    with pytest.raises(ValueError, match="whole number of 4096-byte pages"):
        d.place(0, b"x" * 100)
    with pytest.raises(ValueError):
        d.discard([(-1, 2)])
    with pytest.raises(IndexError):
        d.set_local_fill([(2, 3)], 1)
    with pytest.raises(ValueError):
        d.discard(np.zeros((2, 3), np.uint64))


def test_unregistrable_region_gives_documented_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"\0" * (4 * PAGE))
    with f.open("r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 4 * PAGE)
    d = Destination.adopt(Region(mm))
    with pytest.raises(UnsupportedError, match="file-backed") as ei:
        d.start_postcopy()
    assert ei.value.feature == "register"
    assert d.state == "precopy"  # nothing half started: still usable as plain memory
    assert d.place(1, np.full(PAGE, 9, np.uint8)) == 1
    assert mm[PAGE] == 9


# ---- postcopy (children with deadlines) ----


def _concurrent_faults_and_placer(seed: int, memfd: bool) -> dict[str, Any]:
    n = 512
    rng = np.random.default_rng(seed)
    ref = random_ref(n, seed)
    d = Destination(n * PAGE, memfd=memfd)
    d.start_postcopy()
    touch = rng.integers(0, n, size=(4, 150)).astype(np.uint64)
    background = [int(p) for p in rng.choice(n, size=100, replace=False)]
    done = threading.Event()

    def placer() -> None:
        bg = list(background)
        while not done.is_set() or bg:
            for first, cnt in d.drain_requests():
                d.place(int(first), pages_of(ref, int(first), int(cnt)))
            if bg:
                p = bg.pop()
                d.place(p, pages_of(ref, p))
            else:
                d.wait_requests(0.01)

    t = threading.Thread(target=placer)
    t.start()
    got = _core._bench.dest_touch_threads(d.region, touch)
    done.set()
    t.join()
    assert np.array_equal(got, ref.reshape(n, PAGE)[touch.astype(np.int64), 0])
    expected = {int(p) for p in touch.flat} | set(background)
    received = {i for i in range(n) if d.received.test(i)}
    assert received == expected
    rows = np.array(sorted(expected))
    assert np.array_equal(d.array.reshape(n, PAGE)[rows], ref.reshape(n, PAGE)[rows])
    c = d.counters()
    assert c.placed == len(expected)  # each page placed exactly once
    assert c.eexist == 0 and c.errors == 0 and c.local_fills == 0
    assert c.requested_pages <= len({int(p) for p in touch.flat})
    assert d.requested.count() == 0
    lat = d.latency()
    assert 0 < lat.fault.count <= c.faults
    assert int(lat.fault.buckets.sum()) == lat.fault.count
    assert lat.fault.p50_us <= lat.fault.p90_us <= lat.fault.p99_us <= lat.fault.p999_us <= lat.fault.max_us
    # Every fault event's thread was woken and timed once (stale ones too); every timed request
    # was one sent.
    assert lat.blocked.count == c.faults and lat.blocked.sum_us > 0
    assert lat.request.count <= c.requested_pages
    d.stop()
    return {"faults": c.faults, "requests": c.requests}


@needs_uffd
@pytest.mark.timeout(60)
@pytest.mark.parametrize("memfd", [False, True], ids=["anon", "memfd"])
def test_concurrent_faults_while_placing(memfd: bool) -> None:
    r = run_in_child(_concurrent_faults_and_placer, 11, memfd)
    assert r["faults"] > 0 and r["requests"] > 0


def _same_page_twice() -> None:
    n = 256
    a = np.full(n * PAGE, 0xAA, np.uint8)
    b = np.full(n * PAGE, 0xBB, np.uint8)
    d = Destination(n * PAGE)
    d.start_postcopy()
    assert d.place(3, pages_of(a, 3)) == 1
    assert d.place(3, pages_of(b, 3)) == 0
    assert d.counters().duplicates == 1
    # Two threads place every page at once, one page per call, different data.
    wins = {0: np.zeros(n, np.int64), 1: np.zeros(n, np.int64)}
    barrier = threading.Barrier(2)

    def racer(k: int, src: np.ndarray) -> None:
        barrier.wait()
        for p in range(n):
            wins[k][p] = d.place(p, pages_of(src, p))

    ts = [threading.Thread(target=racer, args=(k, s)) for k, s in ((0, a), (1, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = wins[0] + wins[1]
    assert total[3] == 0 and np.all(np.delete(total, 3) == 1)  # each page placed once
    pages = d.array.reshape(n, PAGE)
    for p in range(n):
        assert np.all(pages[p] == (0xBB if wins[1][p] else 0xAA))  # whole page, the winner's
    c = d.counters()
    assert c.placed == n and c.duplicates + c.eexist == 1 + n + 1 and c.errors == 0
    assert d.received.count() == n
    # Runs of 64 pages racing on a fresh region: every page wholly from one side.
    d2 = Destination(n * PAGE)
    d2.start_postcopy()
    placed = [0, 0]

    def runs(k: int, src: np.ndarray) -> None:
        barrier.wait()
        for p in range(0, n, 64):
            placed[k] += d2.place(p, pages_of(src, p, 64))

    ts = [threading.Thread(target=runs, args=(k, s)) for k, s in ((0, a), (1, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(placed) == n
    pages = d2.array.reshape(n, PAGE)
    assert all(np.all(pages[p] == pages[p][0]) and pages[p][0] in (0xAA, 0xBB) for p in range(n))
    c2 = d2.counters()
    assert c2.placed == n and c2.duplicates + c2.eexist == n and c2.errors == 0
    d.stop()
    d2.stop()


@needs_uffd
@pytest.mark.timeout(60)
def test_same_page_placed_twice_never_corrupt() -> None:
    run_in_child(_same_page_twice)


def _eexist_on_present_page() -> None:
    d = Destination(4 * PAGE)
    d.array[:PAGE] = 5  # written straight into memory in precopy, never marked received
    d.start_postcopy()
    assert d.place(0, np.full(PAGE, 6, np.uint8)) == 0
    c = d.counters()
    assert c.eexist == 1 and c.placed == 0 and c.duplicates == 0
    assert d.received.test(0)
    assert np.all(pages_of(d.array, 0) == 5)  # never placed over
    assert d.place(0, np.full(PAGE, 6, np.uint8)) == 0
    assert d.counters().duplicates == 1  # now dropped before the kernel
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
def test_eexist_marks_received_without_overwriting() -> None:
    run_in_child(_eexist_on_present_page)


def _partial_copy_continues() -> None:
    d = Destination(8 * PAGE)
    d.array[3 * PAGE : 4 * PAGE] = 0x33  # present, not received: the run's copy stops here
    d.array[5 * PAGE : 6 * PAGE] = 0x55
    d.start_postcopy()
    data = np.full(8 * PAGE, 0xEE, np.uint8)
    assert d.place(0, data) == 6  # 0-2, 4, 6-7: partial copies continue past each EEXIST
    pages = d.array.reshape(8, PAGE)
    assert [int(pages[p][0]) for p in range(8)] == [0xEE] * 3 + [0x33, 0xEE, 0x55, 0xEE, 0xEE]
    assert all(np.all(pages[p] == pages[p][0]) for p in range(8))
    c = d.counters()
    assert c.eexist == 2 and c.placed == 6 and c.errors == 0
    assert d.received.count() == 8
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
def test_partial_copy_continues_where_it_stopped() -> None:
    run_in_child(_partial_copy_continues)


def _place_move() -> None:
    d = Destination(8 * PAGE)
    d.place(1, np.full(PAGE, 1, np.uint8))
    d.start_postcopy()
    staging = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(staging, np.uint8)
    for k in range(4):
        view[k * PAGE : (k + 1) * PAGE] = 0x40 + k
    assert _core._bench.dest_place_move(d.region, 0, staging) == 3  # page 1 was received: dropped
    assert [int(d.array[p * PAGE]) for p in range(4)] == [0x40, 1, 0x42, 0x43]
    assert view[PAGE] == 0x41  # the dropped page stays in the staging buffer
    c = d.counters()
    assert c.placed == 4 and c.duplicates == 1  # 1 precopy placement + 3 moved
    m = Destination(8 * PAGE, memfd=True)
    m.start_postcopy()
    with pytest.raises(UnsupportedError, match="anonymous"):
        _core._bench.dest_place_move(m.region, 0, staging)
    m.stop()
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
def test_place_move_from_staging_buffer() -> None:
    run_in_child(_place_move)


def _local_fill(memfd: bool) -> None:
    for value in (0xDEADBEEF, 0):
        d = Destination(64 * PAGE, memfd=memfd)
        d.place(5, np.full(PAGE, 3, np.uint8))  # precopy-received: never filled
        d.set_local_fill([(0, 16), (40, 4)], value)
        d.start_postcopy()
        pages = list(range(16)) + [40, 41, 42, 43]
        got = _core._bench.dest_touch_threads(d.region, np.array([pages[:10], pages[10:]], np.uint64))
        assert got[0][5] == 3
        for p in pages:
            if p != 5:
                assert np.all(pages_of(d.array, p).view(np.uint32) == value), p
        assert np.all(pages_of(d.array, 5) == 3)
        # Counters move just after the placement that woke the toucher.
        wait_until(lambda: d.counters().local_fills == len(pages) - 1)  # noqa: B023 (called in this iteration)
        c = d.counters()
        assert c.requests == 0 and len(d.drain_requests()) == 0 and c.errors == 0
        assert (c.zero if value == 0 else c.filled) == len(pages) - 1
        assert d.received.count() == len(pages)
        d.stop()


@needs_uffd
@pytest.mark.timeout(30)
@pytest.mark.parametrize("memfd", [False, True], ids=["anon", "memfd"])
def test_local_fill_pages_resolve_without_request(memfd: bool) -> None:
    run_in_child(_local_fill, memfd)


def _removed_page_faults_again(memfd: bool) -> None:
    d = Destination(16 * PAGE, memfd=memfd)
    d.start_postcopy()
    one, two, three = (np.full(PAGE, v, np.uint8) for v in (1, 2, 3))
    assert d.place(2, one) == 1 and d.array[2 * PAGE] == 1
    assert d.discard([(2, 1)]) == 1
    assert not d.received.test(2) and d.counters().discarded == 1
    t, box = touch_async(d, [[2]])
    assert d.wait_requests(10)
    assert d.drain_requests().tolist() == [[2, 1]]
    assert d.place(2, two) == 1
    t.join(10)
    assert box[0][0][0] == 2 and np.all(pages_of(d.array, 2) == 2)
    # The guest drops the page itself: the REMOVE event clears its received bit.
    libc = ctypes.CDLL(None, use_errno=True)
    addr = d.array.ctypes.data + 2 * PAGE
    advice = 9 if memfd else MADV_DONTNEED  # MADV_REMOVE for shared memory
    assert libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE), advice) == 0
    wait_until(lambda: not d.received.test(2))
    assert d.counters().removed == 1
    t, box = touch_async(d, [[2]])
    assert d.wait_requests(10)
    assert d.drain_requests().tolist() == [[2, 1]]
    assert d.place(2, three) == 1
    t.join(10)
    assert box[0][0][0] == 3 and d.counters().errors == 0
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
@pytest.mark.parametrize("memfd", [False, True], ids=["anon", "memfd"])
def test_removed_page_faults_again_and_is_placed_again(memfd: bool) -> None:
    run_in_child(_removed_page_faults_again, memfd)


def _stale_received_bit_is_repaired() -> None:
    d = Destination(8 * PAGE)
    d.mark_received(4, 1)  # claims page 4 although nothing was written: it is missing
    d.start_postcopy()
    assert d.place(4, np.full(PAGE, 8, np.uint8)) == 0  # dropped: R says received
    t, box = touch_async(d, [[4]])
    assert d.wait_requests(10)  # the fault thread saw R set and the page absent: R cleared
    assert d.drain_requests().tolist() == [[4, 1]]
    assert not d.received.test(4) and d.counters().removed == 1
    assert d.place(4, np.full(PAGE, 9, np.uint8)) == 1
    t.join(10)
    assert box[0].tolist() == [[9]]
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
def test_fault_on_page_with_stale_received_bit_is_served() -> None:
    run_in_child(_stale_received_bit_is_repaired)


def _one_request_per_page() -> None:
    d = Destination(16 * PAGE)
    d.start_postcopy()
    t, box = touch_async(d, [[7], [7], [8], [8], [7]])
    wait_until(lambda: d.counters().faults == 5)
    assert d.drain_requests().tolist() in ([[7, 2]], [[7, 1], [8, 1]], [[8, 1], [7, 1]])
    assert d.requested.test(7) and d.requested.test(8)
    assert d.place(7, np.full(2 * PAGE, 4, np.uint8)) == 2
    t.join(10)
    assert not t.is_alive() and box[0].tolist() == [[4], [4], [4], [4], [4]]
    c = d.counters()
    assert c.requested_pages == 2 and d.requested.count() == 0 and len(d.drain_requests()) == 0
    lat = d.latency()
    # Two pages waited on; five threads blocked (three on page 7, two on page 8); two requests.
    assert lat.fault.count == 2 and lat.blocked.count == 5 and lat.request.count == 2
    assert lat.blocked.sum_us >= lat.fault.max_us and lat.request.max_us <= lat.fault.max_us
    d.stop()


@needs_uffd
@pytest.mark.timeout(30)
def test_concurrent_faults_on_one_page_make_one_request() -> None:
    run_in_child(_one_request_per_page)


def _stop_wakes_waiters() -> None:
    d = Destination(16 * PAGE)
    d.start_postcopy()
    t, box = touch_async(d, [[5], [6]])
    wait_until(lambda: d.counters().faults == 2)
    d.stop()
    t.join(10)
    assert not t.is_alive() and box[0].tolist() == [[0], [0]]  # unregistered: zero pages
    assert d.state == "stopped"
    with pytest.raises(LivemigError):
        d.place(5, np.zeros(PAGE, np.uint8))
    d.stop()  # idempotent


@needs_uffd
@pytest.mark.timeout(30)
def test_stop_wakes_every_waiter_and_joins() -> None:
    run_in_child(_stop_wakes_waiters)


def test_counters_and_latency_types() -> None:
    d = Destination(PAGE)
    assert isinstance(d.counters(), DestCounters) and d.counters().faults == 0
    lat = d.latency()
    assert isinstance(lat, FaultLatencies)
    for m in (lat.fault, lat.request, lat.blocked):
        assert isinstance(m, LatencyStats) and m.count == 0 and m.p50_us == 0 and m.over_1ms == 0
        assert len(m.buckets) == len(LatencyStats.lower_us) == len(LatencyStats.upper_us)
    lo, hi = LatencyStats.lower_us, LatencyStats.upper_us
    assert lo[0] == 0 and np.array_equal(lo[1:], hi[:-1]) and hi[-1] == 2**40 / 1e3
    lo_ns, width_ns = np.rint(lo * 1e3), np.rint((hi - lo) * 1e3)
    assert np.all(width_ns[lo_ns >= 128] * 64 <= lo_ns[lo_ns >= 128])  # 1/64 wide at most


# ---- property test against a plain model ----

N_PROP = 48
_first, _count = st.integers(0, N_PROP - 1), st.integers(1, 8)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("place"), _first, _count, st.integers(0, 255)),
        st.tuples(st.just("zero"), _first, _count, st.just(0)),
        st.tuples(st.just("fill"), _first, _count, st.integers(1, 2**32 - 1)),
        st.tuples(st.just("discard"), _first, _count, st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops)
def _model_check(seq: list[tuple[str, int, int, int]]) -> None:
    d = Destination(N_PROP * PAGE)
    d.start_postcopy()
    model: dict[int, np.ndarray] = {}  # received page -> its content
    for op, first, n, v in seq:
        n = min(n, N_PROP - first)
        fresh = [p for p in range(first, first + n) if p not in model]
        if op == "discard":
            assert d.discard([(first, n)]) == n - len(fresh)
            for p in range(first, first + n):
                model.pop(p, None)
            continue
        if op == "place":
            data = np.full(n * PAGE, v, np.uint8)
            assert d.place(first, data) == len(fresh)
            page = np.full(PAGE, v, np.uint8)
        elif op == "zero":
            assert d.place_zero(first, n) == len(fresh)
            page = np.zeros(PAGE, np.uint8)
        else:
            assert d.place_fill(first, n, v) == len(fresh)
            page = np.full(PAGE // 4, v, np.uint32).view(np.uint8)
        for p in fresh:
            model[p] = page
        assert {i for i in range(N_PROP) if d.received.test(i)} == set(model)
    for p, content in model.items():
        assert np.array_equal(pages_of(d.array, p), content)
    c = d.counters()
    assert c.eexist == 0 and c.errors == 0 and c.faults == 0
    d.stop()


@needs_uffd
@pytest.mark.timeout(90)
def test_placement_matches_model() -> None:
    run_in_child(_model_check, deadline=80)
