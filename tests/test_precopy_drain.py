"""The drain before a precopy pause (capability ``precopy-drain``, docs/protocol.md "Switchover,
in frame order"): the extra channels END and COMMAND 6 goes out while the workload runs; the
workload pauses only once the destination answered that it applied everything sent. So the only
pages that travel in the downtime are the final dirty set. Checked on the wire by a relay that logs
the main channel's frames both ways (tests/step_relay.py), the destination in a child process."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from step_relay import Direction, StepRelay

from livemig import migration
from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig, MigrationResult
from livemig.protocol import AckKind, Command, FrameType
from livemig.workload import ModelGuest

from recovery_helpers import _dest_answer, reap_destination, start_destination

SIZE = 16 << 20
GUEST = GuestConfig(workload="random", rate=20000.0, seed=21)

Logged = tuple[Direction, FrameType, int, int]


def _migrate(dest: DestinationConfig) -> tuple[MigrationResult, list[Logged]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = start_destination(ctx, q, dest, settle_s=0.5)
    try:
        _, address = q.get(timeout=60)
        with StepRelay(address) as relay, ModelGuest(SIZE, GUEST) as w:
            result = migration.migrate(relay.address, w, MigrationConfig(channels=3, verify=True, timeout=10))
            kind, payload = _dest_answer(q, proc, 60)
            log = list(relay.log)
        assert kind == "summary", payload
        return result, log
    finally:
        reap_destination(proc, q)


def _at(log: list[Logged], direction: Direction, ftype: FrameType, *, count: int | None = None,
        arg: int | None = None) -> int:
    """Index of the first frame that matches (ValueError when none does)."""
    for i, (d, t, c, a) in enumerate(log):
        if d == direction and t == ftype and count in (None, c) and arg in (None, a):
            return i
    raise ValueError(f"no {direction} {ftype.name} (count {count}, arg {arg}) in the log")


@pytest.mark.timeout(120)
def test_the_downtime_carries_only_the_final_dirty_set() -> None:
    result, log = _migrate(DestinationConfig(timeout=10))
    assert "precopy-drain" in result.capabilities and result.ok
    assert result.verify is not None and result.verify.mismatches == 0
    drain = _at(log, "to_destination", FrameType.COMMAND, arg=int(Command.DRAIN))
    drained = _at(log, "to_source", FrameType.ACK, count=int(AckKind.DRAINED))
    state = _at(log, "to_destination", FrameType.DEVICE_STATE)
    complete = _at(log, "to_destination", FrameType.COMMAND, arg=int(Command.COMPLETE))
    assert drain < drained < state < complete
    # The source waited for the answer: nothing went to the destination between the two.
    assert all(d == "to_source" for d, *_ in log[drain + 1:drained])
    # The destination had applied every page sent on every channel (the extras' included) ...
    assert result.drain is not None and result.drain.received_pages == result.drain.sent_pages > 0
    assert log[drained][3] == result.drain.received_pages  # (what the ACK carried)
    # ... so what main carries from there to the device state is the final dirty set, and no more.
    after = sum(c for d, t, c, _ in log[drained:state] if t in (FrameType.PAGES, FrameType.ZERO))
    assert after == result.switchover_pages
    assert result.downtime_split.last_pages_ms >= 0 and result.downtime_ms > 0


@pytest.mark.timeout(120)
def test_a_destination_without_the_capability_gets_no_drain() -> None:
    result, log = _migrate(DestinationConfig(timeout=10, disable_capabilities=frozenset({"precopy-drain"})))
    assert "precopy-drain" not in result.capabilities and result.drain is None
    assert result.verify is not None and result.verify.mismatches == 0
    assert not any(t == FrameType.COMMAND and a == int(Command.DRAIN) for _, t, _, a in log)
    assert not any(t == FrameType.ACK and c == int(AckKind.DRAINED) for _, t, c, _ in log)
    _at(log, "to_destination", FrameType.DEVICE_STATE)  # the switchover itself went as before
