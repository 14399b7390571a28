"""Failures and postcopy recovery, end to end: real processes, sockets (through a cutting relay),
userfaultfd and dirty tracking. A precopy failure cancels (the source guest runs on, intact, and
got DONE); a postcopy break pauses both sides and resumes with no page lost or placed twice."""

from __future__ import annotations

import pytest
from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig

from fault_relay import FaultRelay
from recovery_helpers import PhaseHook, assert_cancelled_intact, assert_completed, run_through_relay

INCREMENT = GuestConfig(workload="increment", rate=20000.0, free_fraction=0.5, seed=7)
SLOW_LINK = 40e6  # bytes/s: a 16 MiB round takes long enough for the guest to dirty it all again


def cut_in_postcopy(after_bytes_to_source: int):  # type: ignore[no-untyped-def]
    """Arms a cut once the destination said that much after postcopy began (its ACK, then requests)."""

    def make(relay: FaultRelay) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "postcopy" and relay.cuts_done == 0:
                relay.arm_cut_after("to_source", after_bytes_to_source)

        return PhaseHook(on_phase)

    return make


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_postcopy_cut_pauses_and_resumes_automatically(hints: bool) -> None:
    config = MigrationConfig(postcopy=True, hints=hints, verify=True, reconnect_deadline_s=20, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=cut_in_postcopy(24 * 8))
    assert out.cuts == 1
    assert_completed(out)
    assert out.result is not None
    assert out.result.recoveries == 1
    assert isinstance(out.dest, dict) and out.dest["recoveries"] == 1
    assert out.connections >= 2 * 2  # main + urgent, twice
