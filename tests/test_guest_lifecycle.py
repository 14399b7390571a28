"""A stateful property test: any sequence of lifecycle calls (start, pause, resume, stop, export and
import into a fresh region) and host device commands keeps the guest consistent: the page sets
partition the region, every page the device accepted since DONE is held, and verify() passes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from livemig.guest import PAGE_HELD, Guest, GuestConfig, LocalBalloonDevice

from guest_helpers import PAGE

PAGES = 64
CFG = GuestConfig(
    workload="random",
    rate=20000,
    free_fraction=0.5,
    churn=5000,
    threads=2,
    poll_interval_us=100,
    hint_reserve=0.25,
)


class GuestLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.region = np.zeros(PAGES * PAGE, dtype=np.uint8)
        self.dev = LocalBalloonDevice(PAGES)
        self.guest = Guest(self.region, CFG, self.dev)

    @rule()
    def start(self) -> None:
        self.guest.start()

    @rule()
    def pause(self) -> None:
        self.guest.pause()

    @rule()
    def resume(self) -> None:
        self.guest.resume()

    @rule()
    def stop(self) -> None:
        self.guest.stop()

    @rule()
    def request(self) -> None:
        self.dev.host_request_next()
        self.guest.kick()

    @rule()
    def host_stop(self) -> None:
        self.dev.host_stop()

    @rule()
    def done(self) -> None:
        self.dev.host_done()
        self.guest.kick()

    @rule()
    def migrate(self) -> None:
        """Pause, move memory and state to a fresh region and device that show DONE, go on there."""
        self.guest.pause()
        state = self.guest.export_state()
        region = self.region.copy()
        dev = LocalBalloonDevice(PAGES)
        dev.host_done()
        self.guest.stop()
        self.region, self.dev = region, dev
        self.guest = Guest.from_state(region, state, dev)
        self.guest.start()

    @invariant()
    def consistent(self) -> None:
        was_running = self.guest.running
        self.guest.pause()
        st = self.guest.stats()
        states = self.guest.page_states()
        assert st.allocated_pages + st.free_pages + st.pages_held == PAGES
        assert int(np.count_nonzero(states == PAGE_HELD)) == st.pages_held
        hinted = np.unpackbits(
            np.frombuffer(self.dev.hinted_since_done().to_bytes(), np.uint8), bitorder="little"
        )[:PAGES]
        assert (states[hinted == 1] == PAGE_HELD).all()
        v = self.guest.verify()
        assert v.ok, v.first_mismatches
        assert self.dev.counters().hints_unacked == 0
        if was_running:
            self.guest.resume()

    def teardown(self) -> None:
        self.guest.stop()


GuestLifecycle.TestCase.settings = settings(max_examples=50, stateful_step_count=20, deadline=None)
TestGuestLifecycle = pytest.mark.timeout(120)(GuestLifecycle.TestCase)
