"""Where an orchestrator reports progress: the :class:`Progress` protocol (phases and rounds, from
the migrating thread), :class:`LiveProgress` (also a :class:`Snapshot` of the live figures several
times a second, from the monitor's thread), and the snapshot itself. The CLI's display implements
both; ``migrate()``/``serve()`` accept either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The phases, in the order a migration goes through them ("paused": a postcopy recovery).
PHASES = ("connect", "precopy", "switchover", "postcopy", "paused", "complete", "verify")


@dataclass(frozen=True)
class Snapshot:
    """The live figures of one migration at one instant, read from the core's counters (atomic
    loads, never a walk over pages in Python). Rates are over the last second."""

    side: str  #: "source" or "destination"
    t: float  #: seconds since the migration started
    phase: str  #: one of PHASES ("start" before the first)
    round: int  #: the precopy round being sent (or last sent); -1 before the first
    total_pages: int
    bytes_sent: int  #: source: bytes on the wire so far, headers included (destination: 0)
    pages_sent: int  #: source: pages sent, zero pages included; destination: pages received
    rate_bps: float  #: bytes per second over the last second (destination: pages received x page size)
    pages_per_s: float  #: pages per second over the last second
    dirty_rate_pps: float  #: the pages per second the tracker found written in the last round
    remaining_pages: int  #: source: dirty pages not sent yet (what is still on the source in postcopy)
    round_pages: int  #: precopy: pages the current round set out to send (its RoundStats.dirty_pages)
    round_pages_left: int  #: precopy: pages of the current round not sent yet
    round_eta_s: float | None  #: precopy: round_pages_left at pages_per_s (None: no rate yet)
    faults_per_s: float  #: postcopy, last second: requests from the destination (source), faults (destination)
    faults: int  #: postcopy so far: requests (source) or fault events (destination)
    push_pages: int  #: postcopy: pages the background push sent so far
    downtime_ms: float | None  #: once known
    recoveries: int  #: postcopy connections resumed so far
    attempts: int  #: paused: resume attempts made in this pause
    paused_cause: str  #: paused: why


class Progress(Protocol):
    """Progress of one migration; called from the orchestrating thread."""

    def phase(self, name: str) -> None:
        """A new phase: one of PHASES."""

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        """A precopy round ended: its index, the pages it left dirty (RoundStats.remaining_pages),
        and its bandwidth (RoundStats.bandwidth_bps)."""


@runtime_checkable
class LiveProgress(Progress, Protocol):
    """A Progress that also shows the live figures."""

    def snapshot(self, s: Snapshot) -> None:
        """The live figures, at least 4 times a second while the migration runs (from the monitor's
        thread, never at the same time as another call on this object)."""


class NoProgress:
    """A Progress that shows nothing."""

    def phase(self, name: str) -> None:
        pass

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass

    def notice(self, text: str) -> None:
        pass



def notice(progress: object, text: str) -> None:
    """``progress.notice(text)`` when ``progress`` has one (a Progress may: the CLI's displays do),
    for what the user must read now whatever the display: why a migration paused, what an
    interrupt does and what it would lose. May be called from any thread."""
    say = getattr(progress, "notice", None)
    if callable(say):
        say(text)


__all__ = ["PHASES", "LiveProgress", "NoProgress", "Progress", "Snapshot", "notice"]
