"""Migrations end to end: the source and destination orchestrators.

Python decides, C++ moves pages. The source runs precopy rounds (sync, send, measure) until what is
left fits the downtime limit at the measured bandwidth, or a round limit, or the postcopy point;
then it stops the guest, does the final sync, and either sends the rest (precopy) or hands the
guest over early and serves the destination's faults while pushing the rest (postcopy). The balloon
device is driven at every round event so hinted pages are skipped, and DONE always reaches the
guest. See ../shared/DESIGN.md for the rules every step keeps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

Mode = Literal["precopy", "postcopy"]


@dataclass(frozen=True)
class MigrationConfig:
    """How a migration runs (the source's choices; the destination follows)."""

    postcopy: bool = False  #: switch to postcopy after ``postcopy_after`` precopy rounds
    postcopy_after: int = 1  #: precopy rounds before postcopy starts
    max_rounds: int = 30  #: precopy rounds before switchover is forced
    downtime_limit_ms: float = 300.0  #: switch over once the rest fits this at the measured rate
    hints: bool = True  #: free page hinting (off under postcopy against a peer without hints-postcopy)
    channels: int = 1  #: page channels in precopy (1: the main channel only)
    disable_capabilities: frozenset[str] = frozenset()  #: capabilities this side withholds
    secret: bytes | None = None  #: shared secret for the handshake
    verify: bool = False  #: prove the destination holds exactly the guest's latest memory
    timeout: float = 30.0  #: seconds a silent peer is waited for


@dataclass(frozen=True)
class RoundStats:
    """One precopy round."""

    index: int
    dirty_pages: int  #: dirty after this round's sync, before sending
    pages_sent: int
    zero_pages: int
    bytes_sent: int
    seconds: float
    bandwidth_bps: float  #: bytes per second on the wire this round
    remaining_pages: int  #: dirty after the round (what the next round or switchover must send)


@dataclass(frozen=True)
class LatencySummary:
    """Fault latency in microseconds (power-of-two buckets: p50/p99 are bucket upper bounds)."""

    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class PostcopyStats:
    requests: int = 0  #: page requests the destination sent
    local_fills: int = 0  #: faults resolved on the destination without a request
    fault_latency_us: LatencySummary = field(default_factory=LatencySummary)
    histogram: tuple[int, ...] = ()  #: faults per power-of-two microsecond bucket
    outstanding_requests: int = 0  #: requested pages never placed (must be 0)


@dataclass(frozen=True)
class HintStats:
    rounds: int = 0
    pages_hinted: int = 0
    stale_dropped: int = 0


@dataclass(frozen=True)
class BalloonReport:
    last_cmd_id: int = 0  #: the command id the destination guest's driver saw last
    done_delivered: bool = False  #: the destination guest saw DONE
    held_pages_after: int = 0  #: pages the destination guest still held back (must be 0)


@dataclass(frozen=True)
class VerifyReport:
    pages_checked: int = 0
    mismatches: int = 0
    placed_twice: int = 0


@dataclass
class MigrationResult:
    """What a migration did; ``to_json()`` is the CLI's ``--json`` object."""

    ok: bool
    mode: Mode
    region_bytes: int
    page_size: int
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    precopy_rounds: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    postcopy: PostcopyStats = field(default_factory=PostcopyStats)
    hints: HintStats = field(default_factory=HintStats)
    balloon: BalloonReport = field(default_factory=BalloonReport)
    verify: VerifyReport | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)  #: negotiated
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        d = asdict(self)
        if d["verify"] is None:
            del d["verify"]
        return d


class Progress(Protocol):
    """Where an orchestrator reports progress (the CLI's rich display implements it)."""

    def phase(self, name: str) -> None:
        """A new phase: "connect", "precopy", "switchover", "postcopy", "complete", "verify"."""

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        """Progress within a phase."""


class NoProgress:
    """A Progress that shows nothing."""

    def phase(self, name: str) -> None:
        pass

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass


@dataclass(frozen=True)
class DestinationConfig:
    """How a destination accepts migrations."""

    disable_capabilities: frozenset[str] = frozenset()  #: capabilities this side withholds
    secret: bytes | None = None  #: shared secret the source must prove
    max_region_bytes: int = 0  #: largest region accepted (0: up to physical memory)
    timeout: float = 30.0  #: seconds a silent peer is waited for


@dataclass
class DestinationSummary:
    """What the destination saw of one migration (also sent back to the source as its report)."""

    ok: bool
    mode: Mode
    region_bytes: int
    postcopy: PostcopyStats = field(default_factory=PostcopyStats)
    balloon: BalloonReport = field(default_factory=BalloonReport)
    verify: VerifyReport | None = None
    error: str | None = None


def migrate(
    address: str,
    region_bytes: int,
    guest: Any,
    config: MigrationConfig = MigrationConfig(),
    progress: Progress | None = None,
) -> MigrationResult:
    """Start a guest (a :class:`livemig.guest.GuestConfig`) on a fresh source region of
    ``region_bytes``, and migrate it to the destination listening at ``address``.

    Raises :class:`livemig.MigrationError` (with the step and cause) when the migration fails; the
    source guest is then intact and has been sent DONE.
    """
    raise NotImplementedError


def serve(
    listener: Any, config: DestinationConfig = DestinationConfig(), progress: Progress | None = None
) -> DestinationSummary:
    """Accept one migration on ``listener`` (a :class:`livemig.wire.Listener`), resume its guest
    here and run until the source completes; the summary also goes back to the source."""
    raise NotImplementedError
