"""Migrations end to end: the source and destination orchestrators.

Python decides, C++ moves pages. The source runs precopy rounds (sync, send, measure) until what is
left fits the downtime limit at the measured bandwidth, or a round limit, or the postcopy point;
then it stops the guest, does the final sync, and either sends the rest (precopy) or hands the
guest over early and serves the destination's faults while pushing the rest (postcopy). The balloon
device is driven at every round event so hinted pages are skipped, and DONE always reaches the
guest. See ../shared/DESIGN.md for the rules every step keeps.
"""

from __future__ import annotations

import json
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from livemig import _core, wire
from livemig.balloon import CMD_DONE, BalloonDevice
from livemig.destination import Destination
from livemig.errors import LivemigError, MigrationError, ProtocolError
from livemig.guest import Guest, GuestConfig
from livemig.recovery import (
    ACK_SWITCHOVER,
    ChannelBroken,
    DestinationRecovery,
    MigrationControl,
    SourceRecovery,
    event_summary,
)
from livemig.source import Source

if TYPE_CHECKING:
    from livemig._core import SendStatsDict

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
    checksums: bool = False  #: offer CRC32C on every frame (costs a copy of every page)
    disable_capabilities: frozenset[str] = frozenset()  #: capabilities this side withholds
    secret: bytes | None = None  #: shared secret for the handshake
    verify: bool = False  #: prove the destination holds exactly the guest's latest memory
    timeout: float = 30.0  #: seconds a silent peer is waited for
    #: postcopy recovery: how long a broken connection is paused and resumed before giving up
    #: (0: fail at once, as without recovery)
    reconnect_deadline_s: float = 60.0
    #: reconnect by itself (to the same address); False: wait for MigrationControl.resume()
    auto_reconnect: bool = True
    #: postcopy: the most bytes of the background stream this side lets its kernel queue on the
    #: main channel (wire.Channel.bound_queue; 0: the kernel's autotuned buffers; at least 256 KiB)
    postcopy_queue_bytes: int = wire.POSTCOPY_QUEUE_BYTES

    def __post_init__(self) -> None:
        wire.check_queue_bytes(self.postcopy_queue_bytes)


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
    local_fill_pages: int = 0  #: pages the source said the destination may fill itself


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
    recoveries: int = 0  #: times a broken postcopy connection was resumed
    requeued_pages: int = 0  #: pages made dirty again on resuming (not received by the destination)
    push_bytes: int = 0  #: postcopy: bytes the background push and the served requests sent
    push_seconds: float = 0.0  #: postcopy: from the start command until nothing was left to push

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        d = asdict(self)
        if d["verify"] is None:
            del d["verify"]
        return d


class Progress(Protocol):
    """Where an orchestrator reports progress (the CLI's rich display implements it)."""

    def phase(self, name: str) -> None:
        """A new phase: "connect", "precopy", "switchover", "postcopy", "complete", "verify", "paused" (recovery)."""

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
    #: postcopy recovery: how long a broken connection is paused, the guest running and its
    #: faulting threads waiting, for the source to resume (0: fail at once)
    resume_deadline_s: float = 60.0
    #: postcopy: the most bytes of the main channel's stream this side lets its kernel queue
    #: (wire.Channel.bound_queue; 0: the kernel's autotuned buffers; at least 256 KiB)
    postcopy_queue_bytes: int = wire.POSTCOPY_QUEUE_BYTES

    def __post_init__(self) -> None:
        wire.check_queue_bytes(self.postcopy_queue_bytes)


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
    recoveries: int = 0  #: times a broken postcopy connection was resumed


@dataclass(frozen=True)
class SourceGuestReport:
    """What became of the source guest when a migration failed."""

    running: bool  #: resumed here (the destination guest never ran); False: stale, it stays paused
    done_delivered: bool  #: its balloon driver saw DONE
    held_pages: int  #: pages its balloon driver still holds back
    verify: VerifyReport | None = None  #: with ``MigrationConfig.verify``: its memory checked


class MigrationFailed(MigrationError):
    """A migration failed; ``source_guest`` says what became of the source guest."""

    def __init__(self, message: str, source_guest: SourceGuestReport | None = None) -> None:
        super().__init__(message)
        self.source_guest = source_guest


@dataclass(frozen=True)
class GuestImage:
    """A paused guest taken off a destination (``serve(keep_guest=...)``), to migrate it on or back
    with ``migrate(..., image=...)`` from exactly where it stopped."""

    memory: npt.NDArray[np.uint8]  #: a copy of its region
    state: bytes  #: ``Guest.export_state()``
    last_round_id: int | None = None  #: the balloon's hint round id sequence continues from here


# ---- device state: what travels with the guest at switchover ----

_DEVICE_MAGIC = b"LMDS"
_ACK_RESUMED = 0  # ack kind: the destination guest runs (value: the command it answered)


def pack_device_state(guest_state: bytes, balloon: dict[str, Any]) -> bytes:
    """The device state blob: magic, a JSON header (the balloon device), then the guest's state."""
    header = json.dumps({"balloon": balloon}).encode()
    return _DEVICE_MAGIC + struct.pack("<I", len(header)) + header + guest_state


def unpack_device_state(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack_device_state`; ProtocolError for anything else."""
    if len(blob) < 8 or blob[:4] != _DEVICE_MAGIC:
        raise ProtocolError("device state: bad magic")
    (n,) = struct.unpack_from("<I", blob, 4)
    if 8 + n > len(blob):
        raise ProtocolError("device state: header runs past the blob")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as e:
        raise ProtocolError(f"device state: bad header: {e}") from None
    return header, blob[8 + n :]


def _latency(d: dict[str, Any]) -> LatencySummary:
    return LatencySummary(p50=d.get("p50", 0.0), p99=d.get("p99", 0.0), max=d.get("max", 0.0))


def _summary_from_report(data: bytes) -> DestinationSummary:
    d = json.loads(data)
    pc = d.get("postcopy", {})
    return DestinationSummary(
        ok=d["ok"],
        mode=d["mode"],
        region_bytes=d["region_bytes"],
        postcopy=PostcopyStats(
            requests=pc.get("requests", 0),
            local_fills=pc.get("local_fills", 0),
            fault_latency_us=_latency(pc.get("fault_latency_us", {})),
            histogram=tuple(pc.get("histogram", ())),
            outstanding_requests=pc.get("outstanding_requests", 0),
            local_fill_pages=pc.get("local_fill_pages", 0),
        ),
        balloon=BalloonReport(**d.get("balloon", {})),
        verify=VerifyReport(**d["verify"]) if d.get("verify") else None,
        error=d.get("error"),
    )


# ---- the source ----


class _SourceRun(SourceRecovery):
    """One outgoing migration: the region, its guest, the connection and the page pumps."""

    def __init__(self, region_bytes: int, guest: GuestConfig, config: MigrationConfig, progress: Progress,
                 control: MigrationControl | None = None, image: GuestImage | None = None) -> None:
        self.config = config
        self.progress = progress
        page = guest.page_size
        if region_bytes <= 0 or region_bytes % page:
            raise ValueError(f"region size must be a positive multiple of {page} bytes, got {region_bytes}")
        self.source = Source(region_bytes // page, mode="kernel")
        port = _core.source_balloon_port(self.source._core)
        if image is None:
            self.guest = Guest(self.source.memory, guest, device=port)
        else:
            if image.memory.nbytes != region_bytes:
                raise ValueError(f"the guest image holds {image.memory.nbytes} bytes, not {region_bytes}")
            self.source.memory[:] = image.memory.reshape(-1).view(np.uint8)
            self.guest = Guest.from_state(self.source.memory, image.state, device=port)
        self.last_round_id = image.last_round_id if image is not None else None
        self.result = MigrationResult(ok=False, mode="postcopy" if config.postcopy else "precopy",
                                      region_bytes=region_bytes, page_size=page)
        self.conn: wire.Connection | None = None
        self.session: _core.SourceSession | None = None
        self.balloon: BalloonDevice | None = None
        self.writers: list[_core.FrameWriter] = []
        self.dest_guest_running = False
        self.control = control or MigrationControl()
        self.address = ""
        self.recoveries = 0
        self.requeued_pages = 0
        self.dest_completed = False

    # -- steps --
    def connect(self, address: str) -> None:
        self.progress.phase("connect")
        caps = wire.Capabilities.all(extra_channels=max(0, self.config.channels - 1))
        caps = caps.without(*self.config.disable_capabilities)
        if not self.config.checksums:
            caps = caps.without("checksums")
        opts = wire.WireOptions(page_size=self.result.page_size, region_bytes=self.result.region_bytes,
                                capabilities=caps, secret=self.config.secret, timeout=self.config.timeout)
        self.conn = conn = wire.connect(address, opts)
        self.address, self.session_id, self.negotiated = address, conn.session, conn.negotiated
        self.result.capabilities = sorted(conn.negotiated.capabilities)
        main = conn.writer()
        extras = [conn.writer(ch) for ch in conn.pages]
        urgent = conn.writer(conn.urgent) if conn.urgent is not None else None
        self.writers = [main, *extras, *([urgent] if urgent is not None else [])]
        self.main = main
        self.extras = extras
        self.urgent = urgent
        self.session = _core.SourceSession(self.source._core, main, extras, urgent, conn.main.fileno(), conn.config())
        self.session.start_return_path()
        hinting = self.config.hints and conn.negotiated.hinting_allowed(postcopy_possible=self.config.postcopy)
        self.balloon = BalloonDevice(self.source.hints, enabled=hinting, last_id=self.last_round_id,
                                     notify=self.guest.kick)

    def _add(self, st: SendStatsDict) -> None:
        self.result.pages_sent += st["pages"]
        self.result.zero_pages += st["zero_pages"]
        self.result.bytes_sent += st["bytes"]

    def _check_peer(self) -> None:
        """Fails fast when the return path reported an error or broke."""
        assert self.session is not None
        ev = self.session.wait_event(0)
        if ev is not None:
            kind, _a, _b, _data, _text, _at = ev
            if kind in ("peer_error", "failed", "end"):
                raise MigrationError(f"destination: {event_summary(ev)}")
            raise MigrationError(f"unexpected {kind} from the destination during precopy")

    def precopy(self) -> None:
        """Rounds until the rest fits the downtime limit, or the round limit, or postcopy time."""
        assert self.session is not None and self.balloon is not None
        self.progress.phase("precopy")
        page, total = self.result.page_size, self.source.pages
        bandwidth = 0.0
        for index in range(self.config.max_rounds + 1):
            self.balloon.before_sync()
            self.source.sync()
            self.balloon.after_sync()
            dirty = self.source.dirty.count()
            if self.config.postcopy and index >= self.config.postcopy_after:
                break  # (postcopy_after=0: no precopy round, every page comes on demand or pushed)
            if index > 0:
                fits = bandwidth > 0 and dirty * page / bandwidth * 1e3 <= self.config.downtime_limit_ms
                if not self.config.postcopy and (fits or index >= self.config.max_rounds):
                    break
                if self.config.postcopy and index >= self.config.max_rounds:
                    break
            self._check_peer()
            st = self.session.precopy_pass(max_seconds=3600.0, max_pages=dirty)
            self._add(st)
            bandwidth = st["bytes"] / st["seconds"] if st["seconds"] > 0 else bandwidth
            remaining = self.source.dirty.count()
            self.result.rounds.append(RoundStats(index, dirty, st["pages"], st["zero_pages"], st["bytes"],
                                                 st["seconds"], bandwidth, remaining))
            self.progress.update(round=index, remaining_pages=remaining, total_pages=total, bandwidth_bps=bandwidth)
        self.result.precopy_rounds = len(self.result.rounds)

    def switchover(self) -> float:
        """Stops the guest, final sync, DONE, and (precopy) sends the rest; returns the pause time."""
        assert self.session is not None and self.balloon is not None
        self.progress.phase("switchover")
        self.guest.pause()
        t_pause = time.perf_counter()
        self.balloon.before_sync()
        self.source.sync()
        self.balloon.final_sync()  # DONE before the device state is sent, precopy and postcopy alike
        if not self.config.postcopy:
            while True:
                st = self.session.precopy_pass(max_seconds=3600.0)
                self._add(st)
                if st["drained"]:
                    break
        for w in self.extras:  # (postcopy ended them ahead of the pause: announce_postcopy)
            w.send_end()
        return t_pause

    def device_state(self) -> bytes:
        assert self.balloon is not None
        balloon = {"cmd_id": self.balloon.cmd_id, "last_round_id": self.balloon.last_round_id}
        return pack_device_state(self.guest.export_state(), balloon)

    def wait_ack(self, command: int) -> float:
        """Waits until the destination acknowledges ``command``: for COMMAND_SWITCHOVER, ACK kind 1
        (everything before it applied); otherwise ACK kind 0 with the command (its guest runs).
        Returns when that word arrived (time.perf_counter() clock)."""
        assert self.session is not None
        switchover = command == wire.COMMAND_SWITCHOVER
        want = (ACK_SWITCHOVER, 0) if switchover else (_ACK_RESUMED, command)
        deadline = time.monotonic() + self.config.timeout
        while True:
            ev = self.session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                what = "acknowledge the switchover" if switchover else "resume the guest"
                raise MigrationError(f"the destination did not {what} within {self.config.timeout} s")
            kind, a, b, _data, _text, at = ev
            if kind == "ack" and (a, b) == want:
                return at
            if kind in ("peer_error", "failed", "end"):
                raise MigrationError(f"destination: {event_summary(ev)}")

    def finish_precopy(self, t_pause: float) -> None:
        self.main.send_device_state(self.device_state())
        self.main.send_command(wire.COMMAND_COMPLETE)
        resumed_at = self.wait_ack(wire.COMMAND_COMPLETE)
        self.dest_guest_running = True
        self.result.downtime_ms = (resumed_at - t_pause) * 1e3

    def postcopy(self, t_pause: float) -> None:
        assert self.session is not None and self.conn is not None
        sets = self.source.switchover_sets()
        if self.conn.negotiated.local_fill:
            self.main.send_discard(sets.discard)
            self.main.send_local_fill(sets.local_fill, 0)  # the guest has no poison value
        else:
            self.source.dirty_hinted_unsent()  # served on request and pushed like any other page
            self.main.send_discard(sets.discard)
        self.main.send_device_state(self.device_state())
        self.main.send_command(wire.COMMAND_POSTCOPY_START)
        self.dest_guest_running = True  # from here on the source guest must never resume
        self.progress.phase("postcopy")
        self._acked = False
        self._t_pause = t_pause
        self._serve_postcopy()

    def _serve_postcopy(self) -> None:
        """Pushes until done, then ends the urgent channel and sends COMPLETE; a break pauses and
        resumes (recovery), then pushes on."""
        while True:
            try:
                self._push_until_drained()
                assert self.session is not None
                try:
                    self.session.end_urgent()
                    self.main.send_command(wire.COMMAND_COMPLETE)
                except (LivemigError, OSError) as e:
                    raise self.broken(e) from None
                return
            except ChannelBroken as e:
                self.pause_and_resume(str(e))
                self._acked = True  # the destination resumed: its guest runs
                if self.dest_completed:
                    return  # it has every page already

    def _push_until_drained(self) -> None:
        """Serve requests and push at once: the destination guest may fault before its ack arrives."""
        assert self.session is not None
        t_pause = self._t_pause
        total = self.source.pages
        t_push, pushing = time.perf_counter(), True
        while True:
            try:
                st = self.session.postcopy_push(max_seconds=0.05)
            except (LivemigError, OSError) as e:
                raise self.broken(e) from None
            self._add(st)
            if pushing:
                self.result.push_bytes += int(st["bytes"])
                if st["drained"]:
                    self.result.push_seconds += time.perf_counter() - t_push
                    pushing = False
            wait = 0.05 if st["drained"] else 0.0  # nothing to push: block for the ack instead
            while (ev := self.session.wait_event(wait)) is not None:
                wait = 0.0
                kind, a, b, _data, _text, at = ev
                if kind == "ack" and a == _ACK_RESUMED and b == wire.COMMAND_POSTCOPY_START and not self._acked:
                    self._acked = True
                    self.result.downtime_ms = (at - t_pause) * 1e3
                elif kind in ("failed", "end"):
                    raise self.broken(event_summary(ev))
                elif kind == "peer_error":
                    raise MigrationError(f"destination: {event_summary(ev)}")
            remaining = self.source.dirty.count()
            self.progress.update(round=len(self.result.rounds), remaining_pages=remaining, total_pages=total,
                                 bandwidth_bps=st["bytes"] / st["seconds"] if st["seconds"] else 0.0)
            if st["drained"] and self._acked:
                break
            if not self._acked and time.perf_counter() - t_pause > self.config.timeout:
                raise MigrationError(f"the destination did not resume the guest within {self.config.timeout} s")

    def report(self) -> DestinationSummary:
        """The destination's summary, sent once it is done (and verified, when asked)."""
        assert self.session is not None
        self.say_committed()
        deadline = time.monotonic() + self.config.timeout + 60.0
        while True:
            ev = self.session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise MigrationError("the destination sent no report")
            kind, _a, _b, data, text, _at = ev
            if kind == "report":
                summary = _summary_from_report(data)
                try:
                    self.main.send_end()  # the destination waits for this word that its report arrived
                except (LivemigError, OSError):
                    pass
                self._await_end()
                return summary
            if kind in ("failed", "end") and self.recoverable():
                # The report did not come: the destination may still miss pages (postcopy) or only
                # its report was lost. Resume; push what it lacks and complete again if need be.
                self.pause_and_resume(text or kind)
                if not self.dest_completed:
                    self._serve_postcopy()
                deadline = time.monotonic() + self.config.timeout + 60.0
                continue
            if kind in ("peer_error", "failed", "end"):
                raise MigrationError(f"destination: {event_summary(ev)}")

    def _await_end(self) -> None:
        """The destination ends the return path after its report; closing first would make its END
        fail. A destination that does not end it within a second is not waited for."""
        assert self.session is not None
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None or ev[0] in ("end", "failed", "peer_error"):
                return

    def cancel(self) -> None:
        """After a failure: the source guest gets DONE and keeps running, unless the destination
        guest already runs (then the source guest must not resume: it would be stale)."""
        if self.balloon is not None:
            self.balloon.cleanup()
        if not self.dest_guest_running:
            self.guest.resume()

    def source_guest_report(self, settle_s: float = 10.0) -> SourceGuestReport:
        """After cancel(): lets a resumed guest see DONE (up to ``settle_s``), then reports (and,
        with ``config.verify``, checks) the source guest."""
        running = self.guest.running
        deadline = time.monotonic() + settle_s
        while running and self.balloon is not None and time.monotonic() < deadline:  # DONE was sent
            gs = self.guest.stats()
            if gs.done_seen > 0 and gs.pages_held == 0:
                break
            time.sleep(0.005)  # the guest's driver runs at its own pace
        gs = self.guest.stats()
        verify = None
        if self.config.verify:
            v = self.guest.verify()
            mismatches = v.mismatches
            if self.guest.workload == "increment":
                mismatches += 0 if self.guest.check_increment().ok else 1
            verify = VerifyReport(pages_checked=v.pages_checked, mismatches=mismatches, placed_twice=0)
        return SourceGuestReport(running=running, done_delivered=gs.done_seen > 0, held_pages=gs.pages_held,
                                 verify=verify)

    def close(self) -> None:
        if self.session is not None:
            self.session.interrupt()
        if self.conn is not None:
            self.conn.close()
        if self.session is not None:
            self.session.join_return_path()
        self.guest.stop()
        self.result.recoveries, self.result.requeued_pages = self.recoveries, self.requeued_pages


def migrate(
    address: str,
    region_bytes: int,
    guest: GuestConfig,
    config: MigrationConfig = MigrationConfig(),
    progress: Progress | None = None,
    control: MigrationControl | None = None,
    *,
    image: GuestImage | None = None,
) -> MigrationResult:
    """Start a guest on a fresh source region of ``region_bytes`` and migrate it to the
    destination listening at ``address``.

    Raises :class:`livemig.MigrationError` (naming the step and cause) when the migration fails; the
    source guest then keeps running and has been sent DONE, unless the destination guest had
    already started (postcopy), in which case the source guest stays paused. ``image``: migrate
    that guest (from ``serve(keep_guest=...)``) instead of a fresh one of config ``guest``.

    Postcopy recovery: a connection that breaks after the destination guest started pauses the
    migration; it resumes over a new connection (by itself, or through ``control``: see
    :class:`livemig.recovery.MigrationControl`) within ``config.reconnect_deadline_s``.
    """
    prog = progress or NoProgress()
    run = _SourceRun(region_bytes, guest, config, prog, control, image)
    t0 = time.perf_counter()
    step = "connect"
    try:
        run.guest.start()
        run.connect(address)
        step = "precopy"
        run.precopy()
        if config.postcopy:
            run.announce_postcopy()
        step = "switchover"
        t_pause = run.switchover()
        if config.postcopy:
            step = "postcopy"
            run.postcopy(t_pause)
        else:
            run.finish_precopy(t_pause)
        step = "complete"
        prog.phase("complete")
        summary = run.report()
    except (LivemigError, OSError) as e:
        run.cancel()
        guest_report = run.source_guest_report()
        run.close()
        raise MigrationFailed(f"{step}: {e}", guest_report) from e
    except BaseException:
        run.cancel()
        run.close()
        raise
    run.close()
    r = run.result
    r.total_ms = (time.perf_counter() - t0) * 1e3
    hs = run.source.counters()
    r.hints = HintStats(rounds=run.balloon.stats.rounds if run.balloon else 0,
                        pages_hinted=hs.pages_hinted, stale_dropped=hs.hints_dropped_stale)
    r.postcopy = summary.postcopy
    r.balloon = summary.balloon
    r.verify = summary.verify
    r.error = summary.error
    r.ok = summary.ok
    return r


# ---- the destination ----


class _DestinationRun(DestinationRecovery):
    """One incoming migration: the region, the channel readers and, after switchover, the guest."""

    def __init__(self, conn: wire.Connection, config: DestinationConfig, progress: Progress,
                 listener: wire.Listener | None = None, wire_options: wire.WireOptions | None = None) -> None:
        self.conn = conn
        self.config = config
        self.progress = progress
        self.dest = Destination(conn.region_bytes)
        self.return_path = conn.writer()  # the main socket's other direction
        extra_fds = [ch.fileno() for ch in conn.pages]
        urgent_fd = conn.urgent.fileno() if conn.urgent is not None else -1
        self.session = _core.DestSession(self.dest.region, conn.main.fileno(), extra_fds, urgent_fd,
                                         self.return_path, conn.config())
        self.device = _core.LocalBalloonDevice(self.dest.pages)
        # The guest is made now, its generation table touched, and gets its state at switchover:
        # importing into warm memory keeps first touches out of the downtime.
        self.prepared: Guest | None = Guest(self.dest.array, GuestConfig(fill="zero"), device=self.device)
        self.prepared.prefault()
        self.guest: Guest | None = None
        self.mode: Mode = "precopy"
        self.ended: set[int] = set()
        self.last_round_id: int | None = None
        self.listener, self.wire_options = listener, wire_options  # recovery: where a resume comes in
        self.recoveries = 0
        self.switchover_announced = False
        self.source_committed = False

    def next_event(self) -> tuple[str, int, int, bytes, str, float]:
        while True:
            seen = self.session.pages_received
            ev = self.session.wait_event(self.config.timeout)
            if ev is None and self.session.pages_received != seen:
                continue  # a slow source still moving pages is not a silent one
            cause = f"the source was silent for {self.config.timeout} s" if ev is None else event_summary(ev)
            if ev is None or ev[0] == "failed":
                if self.pausable():  # recovery: the guest runs on, faulting threads wait
                    self.pause_and_resume(cause)
                    continue
                if self.in_switchover():
                    self.refuse_resume(cause)
                raise MigrationError(cause)
            kind, a, _b, _data, text, _at = ev
            if kind == "peer_error":
                raise MigrationError(f"source: {text}")
            if kind == "end":
                self.ended.add(a)
            self.note_event(ev)
            return ev

    def resume_guest(self, blob: bytes) -> None:
        header, guest_state = unpack_device_state(blob)
        balloon = header.get("balloon", {})
        self.last_round_id = balloon.get("last_round_id")
        if balloon.get("cmd_id") == CMD_DONE:
            self.device.host_done()
        guest, self.prepared = self.prepared, None
        try:
            assert guest is not None
            guest.import_state(guest_state)
        except ValueError:  # a guest of another page size: make it from the state (or say why not)
            guest = Guest.from_state(self.dest.array, guest_state, device=self.device)
        self.guest = guest
        guest.start()

    def run(self) -> DestinationSummary:
        self.session.start()
        self.progress.phase("precopy")
        blob: bytes | None = None
        while True:
            kind, a, _b, data, _text, _at = self.next_event()
            if kind == "device_state":
                blob = data
            elif kind == "command" and a in (wire.COMMAND_POSTCOPY_START, wire.COMMAND_COMPLETE):
                if blob is None:
                    raise MigrationError("switchover without device state")
                if a == wire.COMMAND_POSTCOPY_START:
                    self.mode = "postcopy"
                    self.progress.phase("postcopy")
                self.resume_guest(blob)
                self.send_resumed_ack(a)
                assert self.guest is not None
                self.guest.kick()  # the driver looks at the device now, not at its next poll
                if self.mode == "postcopy":
                    self._postcopy_until_complete()
                break
        return self.finish()

    def _postcopy_until_complete(self) -> None:
        while True:
            kind, a, _b, _data, _text, _at = self.next_event()
            if kind == "command" and a == wire.COMMAND_COMPLETE:
                break
        # Requested pages may still be in flight on the urgent channel: it ends with END.
        if self.conn.urgent is not None:
            while 1 not in self.ended:
                self.next_event()

    def finish(self) -> DestinationSummary:
        assert self.guest is not None
        self.progress.phase("complete")
        region = self.dest
        pc = PostcopyStats()
        if self.mode == "postcopy":
            c = region.counters()
            lat = region.latency()
            outstanding = region.requested.count()  # requested and never placed
            pc = PostcopyStats(requests=c.requests, local_fills=c.local_fills,
                               fault_latency_us=LatencySummary(lat.p50_us, lat.p99_us, lat.max_us),
                               histogram=tuple(int(x) for x in lat.buckets), outstanding_requests=outstanding,
                               local_fill_pages=region.local_fill.count())
        return DestinationSummary(ok=True, mode=self.mode, region_bytes=region.nbytes, postcopy=pc)

    def _settled(self, summary: DestinationSummary, await_reuse: bool) -> bool:
        assert self.guest is not None
        gs = self.guest.stats()
        if gs.pages_held > 0 or gs.last_cmd_id != self.device.cmd_id:
            return False
        if await_reuse and self.mode == "postcopy" and summary.postcopy.local_fill_pages:
            return self.dest.counters().local_fills >= summary.postcopy.local_fill_pages
        return True

    def settle_and_report(
        self, summary: DestinationSummary, verify: bool, settle_s: float, await_reuse: bool
    ) -> DestinationSummary:
        """Lets the guest run on for up to ``settle_s``: until its balloon driver saw the device's
        last command and released what it held (and, with ``await_reuse``, until it wrote every page
        it had hinted); then pauses and checks it."""
        assert self.guest is not None
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and not self._settled(summary, await_reuse):
            time.sleep(0.005)  # the guest runs at its own pace meanwhile
        self.guest.pause()
        gs = self.guest.stats()
        summary.balloon = BalloonReport(last_cmd_id=gs.last_cmd_id, done_delivered=gs.done_seen > 0,
                                        held_pages_after=gs.pages_held)
        if self.mode == "postcopy":  # the faults the guest took while settling count too
            c, lat = self.dest.counters(), self.dest.latency()
            summary.postcopy = replace(summary.postcopy, requests=c.requests, local_fills=c.local_fills,
                                       fault_latency_us=LatencySummary(lat.p50_us, lat.p99_us, lat.max_us),
                                       histogram=tuple(int(x) for x in lat.buckets))
        if verify:
            self.progress.phase("verify")
            v = self.guest.verify()
            mismatches = v.mismatches
            if self.guest.workload == "increment":
                inc = self.guest.check_increment()
                mismatches += 0 if inc.ok else 1
            stale = sum(1 for m in v.first_mismatches
                        if m.kind == "generation" and m.found_generation < m.expected_generation)
            summary.verify = VerifyReport(pages_checked=v.pages_checked, mismatches=mismatches, placed_twice=stale)
            summary.ok = summary.ok and mismatches == 0
        return summary

    def close(self) -> None:
        # The region first: unregistering wakes guest threads blocked on a fault for a page that
        # will never come (a source gone silent in postcopy); stopping the guest would wait on them.
        self.dest.stop()
        if self.guest is not None:
            self.guest.stop()
        self.conn.close()
        self.session.join()


def serve(
    listener: wire.Listener,
    config: DestinationConfig = DestinationConfig(),
    progress: Progress | None = None,
    *,
    verify: bool = True,
    settle_s: float = 2.0,
    await_reuse: bool = False,
    wait: float | None = None,
    keep_guest: Callable[[GuestImage], None] | None = None,
) -> DestinationSummary:
    """Accept one migration on ``listener`` (waiting ``wait`` seconds for a source, None: forever),
    resume its guest here and run until the source completes; the summary (with verification)
    also goes back to the source as its report. ``settle_s`` and ``await_reuse``: see
    :meth:`_DestinationRun.settle_and_report`. ``keep_guest``: after a verified migration, called with
    the paused guest's image (to migrate it on or back)."""
    prog = progress or NoProgress()
    caps = wire.Capabilities.all(extra_channels=wire.MAX_EXTRA_CHANNELS).without(*config.disable_capabilities)
    opts = wire.WireOptions(page_size=mmap.PAGESIZE, region_bytes=config.max_region_bytes,
                            capabilities=caps, secret=config.secret, timeout=config.timeout)
    conn = listener.accept(opts, wait=wait)
    try:
        run = _DestinationRun(conn, config, prog, listener, opts)
    except BaseException:
        conn.close()
        raise
    try:
        summary = run.run()
        summary = run.settle_and_report(summary, verify, settle_s, await_reuse)
        summary.recoveries = run.recoveries
        if keep_guest is not None and summary.ok and run.guest is not None:
            keep_guest(GuestImage(run.dest.array.copy(), run.guest.export_state(), run.last_round_id))
        run.deliver_report(json.dumps(asdict(summary)).encode())
    except (LivemigError, OSError) as e:
        summary = DestinationSummary(ok=False, mode=run.mode, region_bytes=conn.region_bytes, error=str(e))
        try:
            run.return_path.send_error(str(e)[:4000])
        except LivemigError:
            pass
        run.close()
        raise MigrationError(str(e)) from e
    except BaseException:
        run.close()
        raise
    run.close()
    return summary


__all__ = [
    "BalloonReport", "DestinationConfig", "DestinationSummary", "GuestImage", "HintStats", "LatencySummary",
    "MigrationConfig", "MigrationControl", "MigrationFailed", "MigrationResult", "PostcopyStats", "Progress",
    "RoundStats", "SourceGuestReport", "VerifyReport", "migrate", "serve",
]
