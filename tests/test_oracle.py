"""The generic oracle catches what it claims (docs/design.md rule 10): a page corrupted in flight,
and a page placed twice, each in a real migration, each found by the oracle alone (the buffer
workload has no check of its own)."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import threading
from typing import Any

import numpy as np
import pytest
from oracle_helpers import ZAPPED, ZappingFactory
from tamper_relay import Tampering, TamperRelay

import livemig
from livemig.guest import GuestConfig
from livemig.loopback import _destination, stop_destination
from livemig.migration import DestinationConfig, MigrationConfig, migrate
from livemig.workload import BufferWorkload, ModelGuest

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]

SIZE = 16 << 20


def _through_relay(workload: Any, config: MigrationConfig, plan: Tampering, factory: Any = None) -> tuple[Any, Any]:
    """Migrates ``workload`` through a TamperRelay to a destination in a child process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_destination, args=(q, DestinationConfig(timeout=20), 0.5, False, factory))
    proc.start()
    try:
        _, address = q.get(timeout=60)
        with TamperRelay(address, plan) as relay:
            result = migrate(relay.address, workload, config)
        kind, summary = q.get(timeout=60)
        return result, (kind, summary)
    finally:
        proc.join(30)
        stop_destination(proc)


def test_a_byte_flipped_in_flight_is_caught_by_the_digests() -> None:
    memory = livemig.memory.allocate(SIZE)
    np.frombuffer(memory, np.uint8)[:] = np.arange(SIZE, dtype=np.uint64).astype(np.uint8) | 1  # no zero pages
    plan = Tampering(flip_frame=3, flip_offset=5 * mmap.PAGESIZE + 77)
    result, (kind, dest) = _through_relay(BufferWorkload(memory), MigrationConfig(verify=True), plan)
    assert plan.flipped_page is not None  # the flip happened, on this page
    assert kind == "summary" and dest["ok"]  # the destination alone cannot tell
    v = result.verify
    assert not result.ok and v is not None and v.digests
    assert (v.mismatches, v.missing, v.first_mismatches) == (1, 0, (plan.flipped_page,))


def test_the_same_migration_untampered_verifies() -> None:
    """The control for the test above: the relay itself changes nothing."""
    memory = livemig.memory.allocate(SIZE)
    np.frombuffer(memory, np.uint8)[:] = np.arange(SIZE, dtype=np.uint64).astype(np.uint8) | 1
    result, (kind, dest) = _through_relay(BufferWorkload(memory), MigrationConfig(verify=True), Tampering())
    assert result.ok and kind == "summary" and dest["ok"]
    assert result.verify is not None and result.verify.mismatches == 0 and result.verify.placed_twice == 0


@pytest.mark.usefixtures("postcopy")
def test_a_page_placed_twice_is_counted_where_placement_happens() -> None:
    """The destination drops pages it holds as its workload starts (a rule-1 breaker), and the relay
    plays their old frame again once the workload runs: each page is placed a second time, and the
    destination's own placement count says so in the verdict. The guest writes nothing: a page it
    dirtied during the first round would be discarded at the switchover and come again in postcopy,
    so whether the drop saw it placed would depend on timing. The relay replays once the start is
    acknowledged and the destination has asked for a zapped page, which it does only after its fault
    thread handled the drops (tests/oracle_helpers.py)."""
    guest = ModelGuest(SIZE, GuestConfig(workload="idle", rate=0))
    plan = Tampering(replay_frame=0, replay_on="request")
    done = threading.Event()
    # Requests on main's return path, where the relay reads them (not on the urgent socket).
    config = MigrationConfig(postcopy=True, verify=True, disable_capabilities=frozenset({"urgent-requests"}))
    try:
        result, (_kind, dest) = _through_relay(guest, config, plan, factory=ZappingFactory)
    finally:
        done.set()
        guest.stop()
    assert plan.replayed == ZAPPED and plan.acked.is_set()  # the replay happened, after the start
    v = result.verify
    assert not result.ok and v is not None
    assert v.placed_twice == ZAPPED[1], v
    assert dest["placed_twice"] == ZAPPED[1]
