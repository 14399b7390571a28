"""Hint sink, sent bitmap, scanner and switchover sets on the source (docs/design.md rules 2 to 7).

These use explicit-mode sources where kernel tracking is not the point, so they run anywhere.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import _core
from livemig.source import RunFlag, Source

from source_helpers import bits, device_for, make_source, runs_to_pages

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.timeout(60)
ID = 0x80000001  # the first round id
CMD_STOP, CMD_DONE = 0, 1
# Device states (livemig.balloon.BalloonState).
STOP, REQUESTED, START, DONE = 0, 1, 2, 3


def _started(src: Source, cmd_id: int = ID) -> _core.LocalBalloonDevice:
    """A balloon device into ``src`` with round ``cmd_id`` started and acknowledged."""
    dev = device_for(src)
    dev.host_request(cmd_id)
    assert dev.state == REQUESTED and dev.cmd_id == cmd_id
    assert dev.guest_ack(cmd_id)
    assert dev.state == START
    return dev


def _snapshot(src: Source) -> tuple[bytes, bytes, bytes]:
    return src.dirty.to_bytes(), src.sent.to_bytes(), src.hinted.to_bytes()


def test_round_ids_and_states() -> None:
    assert _core.balloon_next_round_id(0xFFFFFFFF) == 0x80000000
    assert _core.balloon_next_round_id(0x80000000) == 0x80000001
    src = Source.allocate(16, mode="explicit")
    h = device_for(src)
    assert (h.state, h.cmd_id) == (STOP, CMD_STOP)
    with pytest.raises(ValueError):
        h.host_request(CMD_DONE)
    assert not h.guest_ack(ID)  # nothing requested
    h.host_request(ID)
    assert h.guest_ack(ID)
    h.guest_stop(ID + 1)
    assert h.state == START and h.counters().stops_stale == 1
    h.guest_stop(ID)
    assert h.state == STOP and h.counters().stops == 1
    h.host_done()
    assert (h.state, h.cmd_id) == (DONE, CMD_DONE)


def test_stale_hints_change_nothing() -> None:
    src = Source.allocate(256, mode="explicit")
    src.dirty.clear_range(0, 128)
    h = device_for(src)
    before = _snapshot(src)
    assert not h.guest_hint(ID, 0, 10)  # no round yet
    h.host_request(ID)
    assert not h.guest_hint(ID, 0, 10)  # REQUESTED, not acknowledged
    h.guest_ack(ID)
    assert not h.guest_hint(ID + 1, 0, 10)  # wrong id
    assert not h.guest_hint(CMD_STOP, 0, 10)
    h.host_stop()
    assert not h.guest_hint(ID, 0, 10)  # round over
    assert not h.guest_hint(ID, 250, 10)  # outside the region
    assert _snapshot(src) == before
    c = h.counters()
    counts = (c.hints_accepted, c.pages_hinted, c.hints_dropped_stale, c.hints_dropped_invalid)
    assert counts == (0, 0, 5, 1)


def test_accepted_hint_clears_dirty_sets_hinted() -> None:
    src = Source.allocate(256, mode="explicit")
    dev = _started(src)
    assert dev.guest_hint(ID, 100, 50)
    assert bits(src.dirty) == set(range(256)) - set(range(100, 150))
    assert bits(src.hinted) == set(range(100, 150))
    c = dev.counters()
    assert (c.hints_accepted, c.pages_hinted) == (1, 50)


def test_hinted_page_written_afterwards_is_sent() -> None:
    src = make_source(64)
    src.sync()
    dev = _started(src)
    assert dev.guest_hint(ID, 0, 64)
    dev.host_stop()
    src.memory[40 * PAGE] = 1
    assert src.sync() == 1
    runs = src.next_batch(64)
    assert runs_to_pages(runs) == [40]
    assert int(runs[0][2]) == RunFlag.DIRTY_TAKEN | RunFlag.SENT_WAS_CLEAR
    assert not src.hinted.test(40)


def test_background_scan_sets_sent_and_clears_dirty_in_order() -> None:
    src = Source.allocate(200, mode="explicit")
    src.dirty.clear_range(50, 60)
    runs = src.next_batch(100)
    assert runs_to_pages(runs) == list(range(50)) + list(range(60, 110))
    assert all(int(f) == RunFlag.DIRTY_TAKEN | RunFlag.SENT_WAS_CLEAR for _, _, f in runs)
    assert bits(src.sent) == set(range(50)) | set(range(60, 110))
    assert not any(src.dirty.test(p) for p in range(110))
    assert src.cursor == 110
    # Wraps around once, then nothing is left.
    assert runs_to_pages(src.next_batch(1000)) == list(range(110, 200))
    assert len(src.next_batch(1000)) == 0
    # Re-dirtied sent pages go again, flagged as already sent.
    src.dirty.set_range(5, 7)
    runs = src.next_batch(10)
    assert runs.tolist() == [[5, 2, int(RunFlag.DIRTY_TAKEN)]]


def test_requests_served_or_dropped_by_rule_2() -> None:
    src = Source.allocate(1024, mode="explicit")
    # Page 10 hinted (clean, unsent); pages 0..99 otherwise delivered by a first batch.
    dev = _started(src)
    assert dev.guest_hint(ID, 10, 1)
    dev.host_stop()
    taken = src.next_batch(99)
    assert 10 not in runs_to_pages(taken) and len(runs_to_pages(taken)) == 99
    assert src.request(10)  # hinted, unsent: served
    assert src.request(20)  # delivered (S set, D clear): dropped
    src.dirty.set(30)
    assert src.request(30)  # delivered but dirty again: served
    assert src.request(500)  # never sent: served
    assert not src.request(1024)  # outside
    runs = src.next_batch(64)
    assert runs.tolist() == [
        [10, 1, RunFlag.URGENT | RunFlag.SENT_WAS_CLEAR],
        [30, 1, RunFlag.URGENT | RunFlag.DIRTY_TAKEN],
        [500, 1, RunFlag.URGENT | RunFlag.DIRTY_TAKEN | RunFlag.SENT_WAS_CLEAR],
    ]
    c = src.counters().scanner
    counts = (c.requests, c.request_pages_served, c.request_pages_dropped, c.requests_invalid)
    assert counts == (4, 3, 1, 1)
    # Rule 6: the background scan continues just after the last requested page.
    assert src.cursor == 501
    assert runs_to_pages(src.next_batch(3)) == [501, 502, 503]
    # A second request for page 10, now delivered, is dropped; the scan still moves near it.
    src.request(10)
    assert runs_to_pages(src.next_batch(1)) == [100]
    assert src.counters().scanner.request_pages_dropped == 2


def test_urgent_batch_respects_max_pages() -> None:
    src = Source.allocate(64, mode="explicit")
    src.request(0, 10)
    first = src.next_batch(4)
    assert runs_to_pages(first) == [0, 1, 2, 3]
    assert all(int(f) & RunFlag.URGENT for _, _, f in first)
    assert src.pending_requests == 6
    assert runs_to_pages(src.next_batch(100)) == list(range(4, 10))
    assert runs_to_pages(src.next_batch(100)) == list(range(10, 64))


def test_failed_send_puts_taken_bits_back() -> None:
    src = Source.allocate(300, mode="explicit")
    dev = _started(src)
    dev.guest_hint(ID, 5, 3)
    dev.host_stop()
    src.next_batch(40)  # pages 0..42 minus 5..7 delivered
    src.dirty.set_range(20, 25)  # sent and dirty again
    src.request(6)  # hinted, unsent
    urgent = src.next_batch(10)
    before = _snapshot(src)
    runs = src.next_batch(100)
    assert set(runs_to_pages(runs)) == set(range(20, 25)) | set(range(43, 138))
    src.send_failed(runs)
    assert _snapshot(src) == before
    src.send_failed(urgent)
    assert not src.sent.test(6) and not src.dirty.test(6)  # back to hinted, unsent
    assert src.counters().scanner.pages_put_back == 101
    with pytest.raises(IndexError):
        src.send_failed(np.array([[299, 2, 2]], dtype=np.uint64))


def _ranges(pages: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


page_sets = st.sets(st.integers(0, 299), max_size=120)


blocks_st = st.lists(st.tuples(st.integers(0, 299), st.integers(1, 130)), max_size=4)


@settings(max_examples=150, deadline=None)
@given(d=page_sets, s=page_sets, h=page_sets, blocks=blocks_st)
def test_switchover_sets_match_model(
    d: set[int], s: set[int], h: set[int], blocks: list[tuple[int, int]]
) -> None:
    for start, n in blocks:  # long runs too, crossing words
        d |= set(range(start, min(300, start + n)))
    src = Source.allocate(300, mode="explicit")
    src.dirty.reset()
    for bm, which in ((src.dirty, d), (src.sent, s), (src.hinted, h)):
        for p in which:
            bm.set(p)
    sets = src.switchover_sets()
    assert sets.discard.tolist() == _ranges(d & s)
    assert sets.local_fill.tolist() == _ranges(h - d - s)
    assert src.dirty_hinted_unsent() == len(h - s - d)
    assert bits(src.dirty) == d | (h - s)


@settings(max_examples=100, deadline=None)
@given(d=page_sets, s=page_sets, h=page_sets)
def test_take_stale_sent_matches_model(d: set[int], s: set[int], h: set[int]) -> None:
    """Ahead of switchover: D&S comes back as runs and is marked unsent; the switchover's own
    discard set is then empty until the guest writes again."""
    src = Source.allocate(300, mode="explicit")
    src.dirty.reset()
    for bm, which in ((src.dirty, d), (src.sent, s), (src.hinted, h)):
        for p in which:
            bm.set(p)
    assert src.take_stale_sent().tolist() == _ranges(d & s)
    assert bits(src.sent) == s - d and bits(src.dirty) == d and bits(src.hinted) == h
    sets = src.switchover_sets()
    assert sets.discard.tolist() == []
    assert sets.local_fill.tolist() == _ranges(h - d - s)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("dirty"), st.integers(0, 199), st.integers(1, 70)),
            st.tuples(st.just("request"), st.integers(0, 199), st.integers(1, 3)),
            st.tuples(st.just("batch"), st.integers(1, 90), st.booleans()),
        ),
        max_size=25,
    )
)
def test_scanner_matches_model(ops: list[tuple[str, int, object]]) -> None:
    """Every page taken had D or was requested, is S afterwards, and failed sends restore D and S
    exactly; requests obey rule 2 (plain Python model)."""
    n_pages = 200
    src = Source.allocate(n_pages, mode="explicit")
    d, s = set(range(n_pages)), set()
    for op in ops:
        if op[0] == "dirty":
            start, n = op[1], int(op[2])  # type: ignore[call-overload]
            src.dirty.set_range(start, min(n_pages, start + n))
            d |= set(range(start, min(n_pages, start + n)))
        elif op[0] == "request":
            start, n = op[1], int(op[2])  # type: ignore[call-overload]
            src.request(start, min(n, n_pages - start))
        else:
            runs = src.next_batch(op[1])
            pages = runs_to_pages(runs)
            assert len(pages) == len(set(pages)) <= op[1]
            for first, npages, flags in runs.tolist():
                for p in range(first, first + npages):
                    assert bool(flags & RunFlag.DIRTY_TAKEN) == (p in d)
                    assert bool(flags & RunFlag.SENT_WAS_CLEAR) == (p not in s)
                    if not flags & RunFlag.URGENT:
                        assert p in d
                    assert src.sent.test(p) and not src.dirty.test(p)
            if op[2]:
                src.send_failed(runs)
            else:
                d -= set(pages)
                s |= set(pages)
        assert bits(src.dirty) == d and bits(src.sent) == s


@settings(max_examples=100, deadline=None)
@given(d=page_sets, s=page_sets, h=page_sets, r=page_sets, local_fill=st.booleans())
def test_resync_with_received_matches_model(
    d: set[int], s: set[int], h: set[int], r: set[int], local_fill: bool
) -> None:
    src = Source.allocate(300, mode="explicit")
    src.dirty.reset()
    for bm, which in ((src.dirty, d), (src.sent, s), (src.hinted, h)):
        for p in which:
            bm.set(p)
    received = _core.PageBitmap(300)
    for p in r:
        received.set(p)
    local = (h - d - s) if local_fill else set()
    lost = set(range(300)) - r - local
    assert src.resync_with_received(received, local_fill=local_fill) == len(lost)
    assert bits(src.dirty) == d | lost
    assert bits(src.sent) == s - lost
    with pytest.raises(ValueError):
        src.resync_with_received(_core.PageBitmap(299), local_fill=False)


@pytest.mark.timeout(20)
def test_wait_for_request_wakes_on_request_and_on_wake() -> None:
    src = Source.allocate(64, mode="explicit")
    assert not src.wait_for_request(0.0)
    ready = threading.Event()
    results: list[bool] = []

    def waiter() -> None:
        ready.set()
        results.append(src.wait_for_request(10.0))

    t = threading.Thread(target=waiter)
    t.start()
    ready.wait()
    src.request(7)
    t.join(15)
    assert results == [True]
    assert runs_to_pages(src.next_batch(8)) == [7]
    results.clear()
    t = threading.Thread(target=waiter)
    ready.clear()
    t.start()
    ready.wait()
    src.wake()  # before or while the waiter blocks: either way it returns at once
    t.join(15)
    assert results == [False]
