"""Migrations through a fault relay: the destination in a spawned process (its guest may block on
faults), the relay and the source here, a deadline on everything."""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fault_relay import FaultRelay
from livemig import migration
from livemig.guest import GuestConfig
from livemig.loopback import _destination
from livemig.migration import (
    DestinationConfig,
    MigrationConfig,
    MigrationControl,
    MigrationFailed,
    MigrationResult,
    NoProgress,
)


@dataclass
class Outcome:
    """How one migration ended, on both sides."""

    result: MigrationResult | None = None  #: the source's result when migrate() returned
    error: MigrationFailed | None = None  #: the source's error when it raised
    dest_ok: bool = False  #: the destination returned a summary (else it raised)
    dest: dict[str, Any] | str = field(default_factory=dict)  #: its summary, or its error text
    cuts: int = 0  #: cuts the relay made
    connections: int = 0  #: connections it relayed


class PhaseHook(NoProgress):
    """A Progress that calls ``on_phase(name)`` at every phase (e.g. to arm a cut)."""

    def __init__(self, on_phase: Callable[[str], None]) -> None:
        self.on_phase = on_phase
        self.phases: list[str] = []

    def phase(self, name: str) -> None:
        self.phases.append(name)
        self.on_phase(name)


def run_through_relay(
    guest: GuestConfig,
    config: MigrationConfig,
    *,
    size: int = 16 << 20,
    dest: DestinationConfig | None = None,
    cuts: Iterable[int] = (),
    rate_bps: float = 0.0,
    progress: Callable[[FaultRelay], migration.Progress] | None = None,
    control: MigrationControl | None = None,
    settle_s: float = 1.0,
    deadline_s: float = 60.0,
    kill_destination: Callable[[mp.process.BaseProcess, FaultRelay], None] | None = None,
) -> Outcome:
    """Migrates a fresh guest through a FaultRelay to a destination in a child process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    dest = dest or DestinationConfig(timeout=10, resume_deadline_s=10)
    proc = ctx.Process(target=_destination, args=(q, dest, settle_s, False))
    proc.start()
    out = Outcome()
    try:
        _, address = q.get(timeout=deadline_s)
        with FaultRelay(address, cuts=cuts, rate_bps=rate_bps) as relay:
            prog = progress(relay) if progress else None
            if kill_destination is not None:
                kill_destination(proc, relay)
            try:
                out.result = migration.migrate(relay.address, size, guest, config, prog, control)
            except MigrationFailed as e:
                out.error = e
            out.cuts, out.connections = relay.cuts_done, relay.connections
            try:
                kind, payload = q.get(timeout=deadline_s)
            except queue.Empty:
                kind, payload = "error", "the destination did not answer"
            out.dest_ok, out.dest = kind == "summary", payload
        proc.join(deadline_s)
        return out
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        q.close()
        q.join_thread()


def assert_completed(out: Outcome) -> None:
    """Both sides completed and the destination holds exactly the guest's latest memory."""
    assert out.error is None, f"{out.error}; destination: {out.dest}"
    r = out.result
    assert r is not None and r.ok, r
    assert out.dest_ok and isinstance(out.dest, dict) and out.dest["ok"], out.dest
    assert r.verify is not None and r.verify.pages_checked > 0
    assert r.verify.mismatches == 0 and r.verify.placed_twice == 0, r.verify
    assert r.postcopy.outstanding_requests == 0 or r.mode == "precopy"
    assert r.balloon.done_delivered and r.balloon.held_pages_after == 0, r.balloon


def assert_cancelled_intact(out: Outcome) -> None:
    """The source cancelled: its guest runs on, saw DONE, and its memory checks out; the
    destination failed (its guest never ran)."""
    assert out.error is not None, "migration completed"
    g = out.error.source_guest
    assert g is not None and g.running, out.error
    assert g.done_delivered and g.held_pages == 0, g
    assert g.verify is not None and g.verify.mismatches == 0 and g.verify.pages_checked > 0, g
    assert not out.dest_ok, out.dest
