"""The guest's balloon driver against the in-process device: acknowledge, hint with the current id
only, hold until DONE, then free the pages so the guest reuses and writes them; ids wrap."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.guest import PAGE_FREE, PAGE_HELD, Guest, GuestConfig, LocalBalloonDevice
from livemig.protocol import BALLOON_CMD_DONE as CMD_DONE
from livemig.protocol import BALLOON_CMD_STOP as CMD_STOP
from livemig.protocol import BALLOON_FIRST_ROUND_ID as CMD_FIRST
from livemig.protocol import BalloonState, next_round_id

from guest_helpers import PAGE, wait_until

pytestmark = pytest.mark.timeout(60)

FAST = 200  # driver poll interval, microseconds


def make(pages: int, **kw: object) -> tuple[np.ndarray, LocalBalloonDevice, Guest]:
    r = np.zeros(pages * PAGE, dtype=np.uint8)
    dev = LocalBalloonDevice(pages)
    cfg = GuestConfig(poll_interval_us=FAST, **kw)  # type: ignore[arg-type]
    return r, dev, Guest(r, cfg, dev)


def round_done(dev: LocalBalloonDevice, stops: int) -> None:
    wait_until(lambda: dev.counters().stops >= stops, what=f"guest STOP #{stops}")


def test_round_ids() -> None:
    assert next_round_id(CMD_STOP) == CMD_FIRST == 0x80000001
    assert next_round_id(CMD_DONE) == CMD_FIRST
    assert next_round_id(0x80000001) == 0x80000002
    assert next_round_id(0xFFFFFFFF) == 0x80000000
    assert next_round_id(0x80000000) == 0x80000001
    dev = LocalBalloonDevice(8)
    with pytest.raises(ValueError, match="round id"):
        dev.host_request(1)
    dev.host_request(0xFFFFFFFF)
    assert dev.host_request_next() == 0x80000000


def test_device_semantics_without_guest() -> None:
    dev = LocalBalloonDevice(100)
    assert (dev.cmd_id, dev.state) == (CMD_STOP, BalloonState.STOP)
    a = dev.host_request_next()
    assert not dev.guest_hint(a, 0, 4)  # REQUESTED: not yet acknowledged
    assert not dev.guest_ack(a + 1)
    assert dev.guest_ack(a) and dev.state == BalloonState.START
    assert dev.guest_hint(a, 0, 4)
    assert not dev.guest_hint(a + 1, 4, 4)  # another id
    assert not dev.guest_hint(a, 98, 4)  # past the end
    b = dev.host_request_next()
    assert not dev.guest_hint(a, 10, 1)  # the old round's id
    assert dev.guest_ack(b) and dev.guest_hint(b, 10, 2)
    dev.guest_stop(b)
    assert (dev.cmd_id, dev.state) == (b, BalloonState.STOP)  # the guest ended the round; the id stays
    assert not dev.guest_hint(b, 20, 1)
    assert dev.accepted().tolist() == [[a, 0, 4], [b, 10, 2]]
    c = dev.counters()
    assert (
        c.hints_accepted,
        c.pages_hinted,
        c.hints_dropped_stale,
        c.hints_dropped_invalid,
    ) == (2, 6, 4, 1)
    assert c.hints_unacked == 2  # a before its ack, and a + 1
    assert dev.hinted_since_done().count() == 6
    dev.host_done()
    assert (dev.cmd_id, dev.state) == (CMD_DONE, BalloonState.DONE)
    assert dev.hinted_since_done().count() == 0


def test_round_hints_free_pages_and_holds_them_until_done() -> None:
    _r, dev, g = make(128, free_fraction=0.5)
    with g:
        g.start()
        a = dev.host_request_next()
        g.kick()
        round_done(dev, 1)
        assert dev.accepted().tolist() == [[a, 64, 64]]
        st = g.stats()
        assert (st.rounds, st.hints_sent, st.pages_hinted, st.pages_held, st.free_pages) == (
            1,
            1,
            64,
            64,
            0,
        )
        assert list(g.page_states()[64:]) == [PAGE_HELD] * 64
        # STOP and a further round: nothing left to hint, the held pages stay held.
        dev.host_stop()
        b = dev.host_request_next()
        round_done(dev, 2)
        assert g.stats().rounds == 2 and g.stats().pages_held == 64
        assert dev.accepted().tolist() == [[a, 64, 64]]
        assert b == a + 1
        # After the guest's own STOP the device keeps showing the round's id, in state STOP.
        assert (dev.cmd_id, dev.state) == (b, BalloonState.STOP)
        dev.host_done()
        wait_until(lambda: g.stats().done_seen == 1, what="DONE seen")
        st = g.stats()
        assert (st.pages_held, st.free_pages, st.last_cmd_id) == (0, 64, CMD_DONE)
        assert list(g.page_states()[64:]) == [PAGE_FREE] * 64
        assert dev.counters().hints_unacked == 0


def test_hints_are_runs_of_at_most_512_pages() -> None:
    _r, dev, g = make(2048 + 100, free_fraction=0.5)
    with g:
        g.start()
        dev.host_request_next()
        round_done(dev, 1)
        rows = dev.accepted()
        assert rows[:, 2].max() <= 512
        assert int(rows[:, 2].sum()) == g.stats().pages_hinted == 1074
        # Contiguous, in order, covering the free pool exactly.
        assert rows[0, 1] == 2148 - 1074
        assert (rows[1:, 1] == rows[:-1, 1] + rows[:-1, 2]).all()


def test_only_the_current_id_is_used() -> None:
    _r, dev, g = make(64, free_fraction=0.5)
    a = dev.host_request_next()
    b = dev.host_request_next()  # the host moved on before the guest ran
    with g:
        g.start()
        round_done(dev, 1)
        assert dev.accepted()[:, 0].tolist() == [b]
        c = dev.counters()
        assert (c.acks, c.hints_unacked, c.hints_dropped_stale) == (1, 0, 0)
        assert dev.state == BalloonState.STOP and g.stats().last_cmd_id == b  # the guest ended its round
        assert a != b


def test_ids_wrap() -> None:
    _r, dev, g = make(64, free_fraction=0.5, churn=5000)
    with g:
        g.start()
        dev.host_request(0xFFFFFFFE)
        round_done(dev, 1)
        dev.host_done()
        wait_until(lambda: g.stats().done_seen == 1, what="DONE")
        ids = []
        for n in (2, 3, 4):
            ids.append(dev.host_request_next())
            round_done(dev, n)
        assert ids == [0xFFFFFFFF, 0x80000000, 0x80000001]
        assert g.stats().rounds == 4
        assert set(dev.accepted()[:, 0].tolist()) <= {0xFFFFFFFE, *ids}
        assert dev.counters().hints_unacked == 0


def test_held_pages_are_not_written_until_done_then_reused() -> None:
    _r, dev, g = make(64, free_fraction=0.5, churn=4000, seed=5, hint_reserve=0.5)
    with g:
        g.start()
        dev.host_request_next()
        round_done(dev, 1)
        g.pause()
        held = np.flatnonzero(g.page_states() == PAGE_HELD)
        assert len(held) > 0
        hinted = np.frombuffer(dev.hinted_since_done().to_bytes(), np.uint8)
        assert np.array_equal(held, np.flatnonzero(np.unpackbits(hinted, bitorder="little")[:64]))
        gens0 = g.generations()[held].copy()
        alloc0 = g.stats().allocations
        g.resume()
        # Churn keeps going, but never into the held pages.
        wait_until(lambda: g.stats().allocations >= alloc0 + 200, what="200 allocations")
        g.pause()
        assert (g.page_states()[held] == PAGE_HELD).all()
        assert np.array_equal(g.generations()[held], gens0)
        assert g.verify().ok
        g.resume()
        dev.host_done()
        wait_until(lambda: g.stats().done_seen == 1, what="DONE")

        def all_rewritten() -> bool:
            g.pause()
            done = bool((g.generations()[held] > gens0).all())
            g.resume()
            return done

        wait_until(all_rewritten, what="every hinted page reused and written")
        g.pause()
        assert g.verify().ok
        assert g.stats().pages_held == 0


class DeviceModel:
    """The device's state machine in plain Python (docs/design.md "Free page hinting")."""

    def __init__(self, pages: int) -> None:
        self.pages, self.cmd, self.state, self.last = pages, CMD_STOP, "stop", 0
        self.accepted: list[tuple[int, int, int]] = []

    def request_next(self) -> int:
        self.last = next_round_id(self.last)
        self.cmd, self.state = self.last, "requested"
        return self.last

    def stop(self) -> None:
        self.cmd, self.state = CMD_STOP, "stop"

    def done(self) -> None:
        self.cmd, self.state = CMD_DONE, "done"

    def ack(self, i: int) -> bool:
        if self.cmd == i and self.state == "requested":
            self.state = "start"
            return True
        return False

    def hint(self, i: int, first: int, n: int) -> bool:
        ok = self.cmd == i and self.state == "start" and n > 0 and first + n <= self.pages
        if ok:
            self.accepted.append((i, first, n))
        return ok

    def guest_stop(self, i: int) -> None:
        # The guest ends its round: the state goes to STOP, the id it shows stays (as QEMU's does).
        if self.cmd == i and self.state == "start":
            self.state = "stop"


ops = st.lists(
    st.one_of(
        st.just(("request",)),
        st.just(("stop",)),
        st.just(("done",)),
        st.tuples(st.just("ack"), st.integers(-1, 1)),
        st.tuples(st.just("hint"), st.integers(-1, 1), st.integers(0, 40), st.integers(0, 10)),
        st.tuples(st.just("guest_stop"), st.integers(-1, 1)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([0, 0xFFFFFFFD]))
def test_device_matches_model(seq: list[tuple[Any, ...]], start: int) -> None:
    dev, model = LocalBalloonDevice(40), DeviceModel(40)
    if start:
        dev.host_request(start)
        model.last, model.cmd, model.state = start, start, "requested"
    for op in seq:
        # Guest ops name an id relative to the last round: the current one, or a stale/future one.
        rel = model.last + op[1] if len(op) > 1 else 0
        rel &= 0xFFFFFFFF
        if op[0] == "request":
            assert dev.host_request_next() == model.request_next()
        elif op[0] == "stop":
            dev.host_stop()
            model.stop()
        elif op[0] == "done":
            dev.host_done()
            model.done()
        elif op[0] == "ack":
            assert dev.guest_ack(rel) == model.ack(rel)
        elif op[0] == "hint":
            assert dev.guest_hint(rel, op[2], op[3]) == model.hint(rel, op[2], op[3])
        else:
            dev.guest_stop(rel)
            model.guest_stop(rel)
        assert (dev.cmd_id, dev.state.name.lower()) == (model.cmd, model.state)
    assert [tuple(r) for r in dev.accepted().tolist()] == model.accepted
