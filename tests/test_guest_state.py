"""pause() parks every guest thread; export_state/import_state carry a guest to another region."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livemig.guest import PAGE_HELD, Guest, GuestConfig, LocalBalloonDevice
from livemig.protocol import BalloonState

from guest_helpers import PAGE, wait_until

pytestmark = pytest.mark.timeout(60)

BUSY = GuestConfig(
    workload="random",
    rate=40000,
    free_fraction=0.5,
    churn=5000,
    threads=2,
    poll_interval_us=200,
    hint_reserve=0.25,
    seed=9,
)


def busy_guest(pages: int = 256) -> tuple[np.ndarray, LocalBalloonDevice, Guest]:
    r = np.zeros(pages * PAGE, dtype=np.uint8)
    dev = LocalBalloonDevice(pages)
    g = Guest(r, BUSY, dev)
    g.start()
    dev.host_request_next()
    wait_until(lambda: dev.counters().stops == 1, what="a hint round")
    wait_until(lambda: g.stats().pages_written >= 500, what="500 writes")
    return r, dev, g


def test_pause_parks_every_thread() -> None:
    r, dev, g = busy_guest()
    with g:
        g.pause()
        snap, st, states = r.copy(), g.stats(), g.page_states()
        # A new round while paused: a running driver would acknowledge it within a poll (200 us).
        dev.host_request_next()
        g.kick()
        g.pause()  # idempotent: returns at once, still parked
        # Observe a while: this sleep synchronises nothing, it gives a stray thread time to act.
        t_end = time.monotonic() + 0.1
        while time.monotonic() < t_end:
            time.sleep(0.01)
        assert np.array_equal(r, snap)
        assert g.stats() == st
        assert np.array_equal(g.page_states(), states)
        assert dev.state == BalloonState.REQUESTED
        assert not g.running
        g.resume()
        assert g.running
        wait_until(
            lambda: dev.state in (BalloonState.START, BalloonState.STOP) and dev.counters().acks == 2, what="the ack"
        )
        wait_until(lambda: g.stats().pages_written > st.pages_written, what="writes after resume")


def test_pause_resume_cycles_stay_consistent() -> None:
    _r, dev, g = busy_guest()
    with g:
        for i in range(20):
            g.pause()
            v = g.verify()
            assert v.ok, v.first_mismatches
            st = g.stats()
            assert st.allocated_pages + st.free_pages + st.pages_held == 256
            assert int(np.count_nonzero(g.page_states() == PAGE_HELD)) == st.pages_held
            g.resume()
            if i % 5 == 0:
                dev.host_request_next()
        # verify() on a running guest pauses it for the check and resumes it.
        assert g.verify().ok and g.running


def test_export_import_resumes_on_another_region() -> None:
    r, _dev, g = busy_guest()
    with g:
        g.pause()
        state = g.export_state()
        st, gens, states = g.stats(), g.generations(), g.page_states()
        assert st.pages_held > 0
        r2 = r.copy()  # the migration: memory to the destination's region
        snap = r.copy()
        dev2 = LocalBalloonDevice(256)
        with Guest.from_state(r2, state, dev2) as g2:
            assert g2.config == g.config == BUSY
            assert g2.stats() == st
            assert np.array_equal(g2.generations(), gens)
            assert np.array_equal(g2.page_states(), states)
            assert g2.verify().ok
            assert g2.export_state() == state
            # The destination's device ends the migration with DONE: the driver frees its pages.
            dev2.host_done()
            g2.start()
            wait_until(
                lambda: g2.stats().done_seen == st.done_seen + 1, what="DONE on the destination"
            )
            assert g2.stats().pages_held == 0
            wait_until(
                lambda: g2.stats().pages_written >= st.pages_written + 1000,
                what="writes on the destination",
            )
            g2.pause()
            v = g2.verify()
            assert v.ok and v.pages_checked == g2.stats().allocated_pages
            assert int((g2.generations() >= gens).sum()) == 256  # generations only grow
        # The source guest, paused, never wrote again.
        assert np.array_equal(r, snap)


def test_increment_continues_after_import() -> None:
    r = np.zeros(64 * PAGE, dtype=np.uint8)
    with Guest(r, GuestConfig(workload="increment", rate=50000)) as g:
        g.start()
        wait_until(lambda: g.stats().passes >= 1, what="a pass")
        g.pause()
        state = g.export_state()
        r2 = r.copy()
    with Guest.from_state(r2, state) as g2:
        passes = g2.stats().passes
        g2.start()
        wait_until(lambda: g2.stats().passes >= passes + 2, what="two more passes")
        g2.pause()
        assert g2.check_increment().ok
        assert g2.verify().ok


@pytest.mark.parametrize(("rate", "writes"), [(0, 0), (2000, 5), (0, 20000)], ids=["none", "few", "all"])
def test_generation_table_travels_sparse_or_dense(rate: float, writes: int) -> None:
    """A guest that wrote few of its pages sends only their generations (16 bytes each), one that
    wrote most of them the whole table (8 bytes a page); either way the table arrives exact."""
    pages = 1024
    config = GuestConfig(workload="random", rate=rate, seed=3)
    r = np.zeros(pages * PAGE, dtype=np.uint8)
    with Guest(np.zeros(pages * PAGE, np.uint8), config) as fresh:
        base = len(fresh.export_state())  # the same state with an empty table
    with Guest(r, config) as g:
        if writes:
            g.start()
            wait_until(lambda: g.stats().pages_written >= writes, what=f"{writes} writes")
        g.pause()
        gens = g.generations()
        state = g.export_state()
    written = int((gens > 0).sum())
    assert len(state) == base + (16 * written if written < pages // 2 else 8 * pages)
    with Guest.from_state(r.copy(), state) as g2:
        assert np.array_equal(g2.generations(), gens)
        assert g2.verify().ok


def test_state_errors() -> None:
    _r, _dev, g = busy_guest(64)
    with g:
        with pytest.raises(ValueError, match="paused or stopped"):
            g.export_state()
        g.pause()
        state = g.export_state()
        with pytest.raises(ValueError, match="stop"):
            g.import_state(state)
        g.stop()
        g.import_state(state)  # a stopped guest takes it back
        assert g.verify().ok
    with pytest.raises(ValueError, match="truncated|checksum"):
        Guest.from_state(np.zeros(64 * PAGE, np.uint8), state[:-100])
    bad = bytearray(state)
    bad[200] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        Guest.from_state(np.zeros(64 * PAGE, np.uint8), bytes(bad))
    with pytest.raises(ValueError, match="multiple|pages"):
        Guest.from_state(np.zeros(32 * PAGE, np.uint8), state)
    with pytest.raises(ValueError, match="magic"):
        Guest.from_state(np.zeros(64 * PAGE, np.uint8), b"x" * 100)
    with pytest.raises(ValueError, match="version"):
        Guest.from_state(np.zeros(64 * PAGE, np.uint8), state[:8] + b"\x09" + state[9:])


def test_prepared_guest_takes_a_state_later() -> None:
    """The destination's way: a guest made ahead (no fill, table touched) imports the state at
    switchover and resumes exactly where the source stopped; prefault changes no generation."""
    r, _dev, g = busy_guest()
    with g:
        with pytest.raises(ValueError, match="paused or stopped"):
            g.prefault()
        g.pause()
        gens = g.generations()
        g.prefault()
        assert np.array_equal(g.generations(), gens)
        state = g.export_state()
        r2 = r.copy()
    with Guest(r2, GuestConfig(fill="zero"), LocalBalloonDevice(256)) as g2:
        g2.prefault()
        assert np.array_equal(r2, r)  # no fill: the region is left as it is
        g2.import_state(state)
        assert g2.config == BUSY
        assert np.array_equal(g2.generations(), gens)
        assert g2.verify().ok


@pytest.mark.parametrize("writes", [5, 20000], ids=["sparse", "dense"])
def test_import_replaces_a_table_that_was_written(writes: int) -> None:
    """A guest whose own writes left generations imports another guest's state: the table becomes
    exactly the state's (every entry of its own cleared, sparse or dense), and exporting it again
    gives the same bytes (the set of written pages travels with it)."""
    pages = 1024
    with Guest(np.zeros(pages * PAGE, np.uint8), GuestConfig(workload="random", rate=2000, seed=3)) as src:
        src.start()
        wait_until(lambda: src.stats().pages_written >= 5, what="5 writes")
        src.pause()
        gens, state = src.generations(), src.export_state()
    r = np.zeros(pages * PAGE, np.uint8)
    with Guest(r, GuestConfig(workload="random", rate=0 if writes > 5 else 2000, seed=9)) as g:
        g.start()
        wait_until(lambda: g.stats().pages_written >= writes, what=f"{writes} writes")
        g.stop()
        own = g.generations()
        assert (own > 0).sum() > 0 and not np.array_equal(own > 0, gens > 0)
        g.import_state(state)
        assert np.array_equal(g.generations(), gens)
        assert g.export_state() == state


def test_page_sets_travel_as_runs_when_that_is_smaller() -> None:
    """The allocated and held sets travel as runs when those are fewer bytes than their bitmaps:
    a guest with every page allocated and none held sends a few bytes whatever its size, while one
    whose churn scattered its free pages sends the bitmaps; both arrive exact."""
    sizes = {}
    for pages in (1 << 12, 1 << 16):
        with Guest(np.zeros(pages * PAGE, np.uint8), GuestConfig(workload="idle", seed=1)) as g:
            g.pause()
            sizes[pages] = len(g.export_state())
    assert sizes[1 << 16] == sizes[1 << 12]  # one run each, not 2 x pages/8 bytes
    r, _dev, g = busy_guest(4096)
    with g:
        g.pause()
        states, state = g.page_states(), g.export_state()
        assert len(state) >= sizes[1 << 12] + 4096 // 8  # scattered free pages: a bitmap (runs would be more)
        with Guest.from_state(r.copy(), state) as g2:
            assert np.array_equal(g2.page_states(), states)
            assert g2.verify().ok
