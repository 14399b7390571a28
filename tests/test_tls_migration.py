"""Encrypted migrations end to end (the destination in a child process, a man in the middle on the
path): a byte flipped after the handshake fails a precopy cleanly and pauses a postcopy, which
resumes with fresh keys and completes with every page verified (the generic oracle: page digests,
no page placed twice), so no corrupted page was ever placed; and a cut in postcopy resumes over a
new TLS handshake."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
from tls_helpers import SECRET
from tls_relay import Attack, TlsRelay

from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig, MigrationFailed, migrate
from livemig.workload import ModelGuest

from fault_relay import FaultRelay
from recovery_helpers import (
    PhaseHook,
    _dest_answer,
    assert_completed,
    reap_destination,
    run_through_relay,
    start_destination,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]

SIZE = 16 << 20
INCREMENT = GuestConfig(workload="increment", rate=20000)
SLOW_LINK = 40e6  # bytes/s: the cut finds the migration in postcopy (as in test_recovery)
DEST = DestinationConfig(timeout=10, resume_deadline_s=15, secret=SECRET, encrypt=True)


def _through_mitm(config: MigrationConfig, attack: Attack) -> tuple[Any, Any, TlsRelay]:
    """Migrates a fresh model guest through a TlsRelay to a destination in a child process;
    returns the source's result (or MigrationFailed), the destination's (kind, payload), the relay."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = start_destination(ctx, q, DEST, settle_s=2.0)
    try:
        _, address = q.get(timeout=60)
        with TlsRelay(address, attack) as relay:
            try:
                with ModelGuest(SIZE, INCREMENT) as w:
                    out: Any = migrate(relay.address, w, config)
            except MigrationFailed as e:
                out = e
            answer = _dest_answer(q, proc, 60)
        proc.join(30)
        return out, answer, relay
    finally:
        reap_destination(proc, q)


def test_a_flipped_byte_fails_precopy_cleanly_on_both_sides() -> None:
    attack = Attack(flip_page_record=40)
    out, (kind, dest), _ = _through_mitm(MigrationConfig(secret=SECRET, encrypt=True, verify=True, timeout=10), attack)
    assert attack.flipped.is_set()
    assert isinstance(out, MigrationFailed), out
    g = out.source_workload  # the source's guest runs on, intact
    assert g is not None and g.running and g.check is not None and g.check.ok, g
    assert kind == "error" and "altered in transit" in dest, dest  # the destination says why


@pytest.mark.usefixtures("postcopy")
def test_a_flipped_byte_in_postcopy_pauses_resumes_with_new_keys_and_no_bad_page_is_placed() -> None:
    """postcopy_after=0: every page comes after the switchover, so the flip lands in postcopy.
    The destination refuses the record, pauses (its guest runs on), the source resumes over a new
    connection with a fresh TLS handshake, and the generic oracle finds every page the source's."""
    attack = Attack(flip_page_record=30)
    config = MigrationConfig(secret=SECRET, encrypt=True, verify=True, postcopy=True, postcopy_after=0, timeout=10,
                             reconnect_deadline_s=15)
    out, (kind, dest), relay = _through_mitm(config, attack)
    assert attack.flipped.is_set()
    assert not isinstance(out, MigrationFailed), f"{out}; destination: {dest}"
    assert out.ok and out.recoveries >= 1 and kind == "summary" and dest["recoveries"] >= 1, (out, dest)
    v = out.verify
    assert v is not None and v.digests and v.pages_checked == SIZE // 4096, v
    assert (v.mismatches, v.placed_twice) == (0, 0), v
    # The resume ran TLS again: a new connection whose plaintext HELLO is followed by a ClientHello.
    resumed = [c for c in relay.captured[1:] if c[10:11] == b"\x01" and c[16 + 1:16 + 2] == b"\x03"]
    assert resumed, "no resume connection seen"
    hello_len = int.from_bytes(resumed[0][12:16], "little")
    assert resumed[0][16 + hello_len] == 0x16  # a TLS handshake record: fresh keys, no resumption
    assert out.tls.enabled and out.tls.keying == "psk" and out.tls.handshake_ms > 0


@pytest.mark.usefixtures("postcopy")
def test_a_cut_in_postcopy_resumes_over_a_fresh_tls_handshake() -> None:
    def cut_in_postcopy(relay: FaultRelay, _proc: Any) -> PhaseHook:
        def on_phase(name: str) -> None:
            if name == "postcopy" and relay.cuts_done == 0:
                relay.arm_cut_after("to_source", 24 * 8)

        return PhaseHook(on_phase)

    config = MigrationConfig(postcopy=True, verify=True, reconnect_deadline_s=20, timeout=10, secret=SECRET,
                             encrypt=True)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=cut_in_postcopy, dest=DEST)
    assert out.cuts == 1
    assert_completed(out)
    assert out.result is not None and out.result.recoveries == 1
    assert out.result.tls.enabled and out.result.tls.keying == "psk"
    assert isinstance(out.dest, dict) and out.dest["tls"]["enabled"] and out.dest["recoveries"] == 1
