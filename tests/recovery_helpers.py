"""Migrations through a fault relay: the destination in a spawned process (its guest may block on
faults), the relay and the source here, a deadline on everything."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from livemig.workload import ModelGuest

from fault_relay import FaultRelay


@dataclass
class Outcome:
    """How one migration ended, on both sides."""

    result: MigrationResult | None = None  #: the source's result when migrate() returned
    error: MigrationFailed | None = None  #: the source's error when it raised
    dest_ok: bool = False  #: the destination returned a summary (else it raised)
    dest_kind: str = ""  #: "summary", "error" or "killed" (it died without a word; dest: exit code)
    dest: dict[str, Any] | str = field(default_factory=dict)  #: its summary, or its error text
    cuts: int = 0  #: cuts the relay made
    cut_times: list[float] = field(default_factory=list)  #: when (time.monotonic())
    source_ended_at: float = 0.0  #: when migrate() returned or raised (time.monotonic())
    connections: int = 0  #: connections it relayed
    to_destination: int = 0  #: bytes the relay forwarded to the destination (every connection)
    to_source: int = 0  #: bytes it forwarded back
    #: bytes forwarded each way per connection, in the order they were made
    per_connection: list[dict[str, int]] = field(default_factory=list)

    def cuts_during_migration(self) -> int:
        """Cuts made before the source was done (a cut after it cannot test anything)."""
        return sum(1 for t in self.cut_times if t < self.source_ended_at)


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
    progress: Callable[[FaultRelay, mp.process.BaseProcess], migration.Progress] | None = None,
    control: MigrationControl | None = None,
    settle_s: float = 5.0,
    deadline_s: float = 60.0,
    events: migration.EventCallback | None = None,
    await_reuse: bool = False,
) -> Outcome:
    """Migrates a fresh guest through a FaultRelay to a destination in a child process
    (``settle_s``/``await_reuse``: :func:`livemig.serve`'s)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    dest = dest or DestinationConfig(timeout=10, resume_deadline_s=10)
    proc = start_destination(ctx, q, dest, settle_s, await_reuse)
    out = Outcome()
    try:
        _, address = q.get(timeout=deadline_s)
        with FaultRelay(address, cuts=cuts, rate_bps=rate_bps) as relay:
            prog = progress(relay, proc) if progress else None
            try:
                with ModelGuest(size, guest) as w:
                    out.result = migration.migrate(relay.address, w, config, prog, control, events=events)
            except MigrationFailed as e:
                out.error = e
            out.source_ended_at = time.monotonic()
            out.cuts, out.connections = relay.cuts_done, relay.connections
            out.to_destination, out.to_source = relay.forwarded("to_destination"), relay.forwarded("to_source")
            out.per_connection = [dict(c) for c in relay.per_connection]
            kind, payload = _dest_answer(q, proc, deadline_s)
            out.dest_ok, out.dest_kind, out.dest = kind == "summary", kind, payload
            out.cut_times = list(relay.cut_times)
        proc.join(deadline_s)
        return out
    finally:
        reap_destination(proc, q)


def reap_destination(proc: mp.process.BaseProcess, q: Any) -> None:
    """A destination child that is still there is killed; then it is joined and its queue closed."""
    if proc.is_alive():
        proc.kill()
    proc.join()
    q.close()
    q.join_thread()


def start_destination(ctx: Any, q: Any, dest: DestinationConfig, settle_s: float = 5.0,
                      await_reuse: bool = False) -> mp.process.BaseProcess:
    """A destination serving one migration in a spawned process; it puts ("address", a) on ``q``,
    then ("summary", dict) or ("error", text)."""
    proc = ctx.Process(target=_destination, args=(q, dest, settle_s, await_reuse))
    proc.start()
    return proc  # type: ignore[no-any-return]


def _dest_answer(q: Any, proc: mp.process.BaseProcess, deadline_s: float) -> tuple[str, Any]:
    """The destination's ("summary", dict) or ("error", text); ("killed", exit code) when it died
    without a word."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            return q.get(timeout=0.1)  # type: ignore[no-any-return]
        except queue.Empty:
            if not proc.is_alive():
                try:
                    return q.get(timeout=1.0)  # type: ignore[no-any-return]
                except queue.Empty:
                    return "killed", proc.exitcode
    return "error", "the destination did not answer"


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


def assert_cancelled_intact(out: Outcome, hinting_started: bool = True) -> None:
    """The source cancelled: its guest runs on, saw DONE (when a hint round had started), and
    its memory checks out; the destination failed (its guest never ran)."""
    assert out.error is not None, "migration completed"
    g = out.error.source_workload
    assert g is not None and g.running, out.error
    assert g.done_delivered == hinting_started and g.held_pages == 0, g
    assert g.check is not None and g.check.ok and g.check.mismatches == 0 and g.check.pages_checked > 0, g
    assert not out.dest_ok, out.dest
