"""What a migration reports: the source's :class:`MigrationResult` (the CLI's ``--json``), the
destination's :class:`DestinationSummary` (also sent back to the source as its report), and the
exception a failed migration raises."""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from livemig.errors import LivemigError, MigrationError, ProtocolError
from livemig.wire.tls import TlsReport

if TYPE_CHECKING:
    from livemig.workload.base import Workload

Mode = Literal["precopy", "postcopy"]
#: How a migration ended, for the source: "completed"; or, failed, what became of its workload:
#: "cancelled" (the destination's never ran: the source's runs on), "stale" (the destination's
#: ran: the source's stays paused for good), "uncertain" (the start command may or may not have
#: reached the destination, which could not be asked: the source's stays paused until someone
#: decides, see docs/protocol.md "The commit point"), "aborted" (the user insisted: what only the
#: source held is lost).
Outcome = Literal["completed", "cancelled", "stale", "uncertain", "aborted"]


@dataclass(frozen=True)
class RoundStats:
    """One precopy round: it sends the pages dirty at its sync; the sync after it finds what the
    workload wrote meanwhile. Every view of a round (summary, JSON, plot, live view, events)
    takes its figures from here."""

    index: int
    dirty_pages: int  #: dirty after this round's sync: what the round set out to send
    pages_sent: int  #: pages sent with data (zero pages not included)
    zero_pages: int  #: pages sent as zero runs (header only)
    bytes_sent: int  #: bytes on the wire, headers included
    seconds: float  #: the round's send pass
    bandwidth_bps: float  #: bytes_sent / seconds
    #: dirty after the sync that followed the round: what the next round (or the switchover) must send
    remaining_pages: int
    dirtied_pages: int = 0  #: pages that sync found written since this round's own sync
    dirty_rate_pps: float = 0.0  #: dirtied_pages over the time between the two syncs (pages/s)
    started_s: float = 0.0  #: when the round's sync ran, seconds since the migration started


@dataclass(frozen=True)
class LatencySummary:
    """One postcopy latency measure in microseconds, from a log-linear histogram whose buckets are
    at most 1/64 of their value wide: a quantile is within 0.8 % of the samples it stands for;
    ``max`` and the counts over 1 ms and over 10 ms are exact."""

    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    p90: float = 0.0
    p99_9: float = 0.0
    count: int = 0  #: samples
    over_1ms: int = 0  #: samples longer than 1 ms
    over_10ms: int = 0  #: samples longer than 10 ms


#: the upper bounds in microseconds of the power-of-two buckets of ``PostcopyStats.histogram``
POWER_OF_TWO_UPPER_US: tuple[float, ...] = (1.0, *(float(1 << k) for k in range(1, 32)))


@dataclass(frozen=True)
class LatencyBuckets:
    """The non-empty buckets of a latency histogram, for plots: ``counts[i]`` samples in
    [``lower_us[i]``, ``upper_us[i]``) microseconds."""

    lower_us: tuple[float, ...] = ()
    upper_us: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()

    def power_of_two(self) -> tuple[int, ...]:
        """The samples per power-of-two microsecond bucket (0: [0, 1) us; k: [2^(k-1), 2^k) us;
        32 of them, the last holding longer ones too), each fine bucket counted at its lower bound."""
        out = [0] * 32
        for lo, n in zip(self.lower_us, self.counts, strict=True):
            out[min(int(lo).bit_length(), 31)] += n
        return tuple(out)


@dataclass(frozen=True)
class PostcopyStats:
    requests: int = 0  #: page requests the destination sent
    local_fills: int = 0  #: faults resolved on the destination without a request
    #: fault event read to its page placed (one sample per page a fault waited on)
    fault_latency_us: LatencySummary = field(default_factory=LatencySummary)
    histogram: tuple[int, ...] = ()  #: fault_latency_us per power-of-two bucket (bucket k: up to histogram_upper_us[k])
    outstanding_requests: int = 0  #: requested pages never placed (must be 0)
    local_fill_pages: int = 0  #: pages the source said the destination may fill itself
    #: each ``histogram`` bucket's upper bound in microseconds (1, 2, 4, ...: the coarse view)
    histogram_upper_us: tuple[float, ...] = ()
    faults: int = 0  #: fault events the destination read (one per faulting thread and page)
    #: request sent to the page placed (one sample per requested page; QEMU's trace measure)
    request_latency_us: LatencySummary = field(default_factory=LatencySummary)
    #: faulting thread blocked: fault event read to its wake (one sample per fault event, stale ones
    #: and local fills included; QEMU's blocktime counts the same waits)
    blocked_us: LatencySummary = field(default_factory=LatencySummary)
    fault_buckets: LatencyBuckets = field(default_factory=LatencyBuckets)
    request_buckets: LatencyBuckets = field(default_factory=LatencyBuckets)
    blocked_buckets: LatencyBuckets = field(default_factory=LatencyBuckets)
    blocked_total_ms: float = 0.0  #: the blocked samples summed: thread time lost to faults


@dataclass
class PrefaultReport:
    """What the destination's prefault did (``DestinationConfig.prefault``; all zero when off)."""

    threads: int = 0  #: threads its calibration chose
    added_threads: int = 0  #: threads it added as the receivers caught up with it
    tried: tuple[int, ...] = ()  #: thread counts the calibration tried, in order
    tried_gbps: tuple[float, ...] = ()  #: the populate rate each reached, GB/s
    populated_pages: int = 0  #: pages it made present ahead of the receivers
    dropped_pages: int = 0  #: populated but not received by the postcopy switchover: made missing again
    jumps: int = 0  #: times a thread found the receivers ahead and jumped past them
    seconds: float = 0.0  #: from its start until it finished (or was stopped)
    finished: bool = False  #: every page was populated or reached by the receivers first
    failed: bool = False  #: the kernel refused MADV_POPULATE_WRITE (the receivers fault pages in)


@dataclass
class DowntimeSplit:
    """The downtime's steps on the source's clock, in ms (they add up to the downtime)."""

    final_sync_ms: float = 0.0  #: pause to the dirty set harvested (balloon DONE included)
    last_pages_ms: float = 0.0  #: sending the final dirty set (precopy; postcopy: DISCARD, LOCAL_FILL)
    device_state_ms: float = 0.0  #: packing and sending the device state
    resume_ms: float = 0.0  #: the start command to the destination's word that its workload runs

    @classmethod
    def of(cls, t: list[float]) -> DowntimeSplit:
        """From the steps' ends (seconds): pause, sync, last pages, device state, the word (else zeros)."""
        if len(t) != 5:
            return cls()
        ms = [max(0.0, (b - a) * 1e3) for a, b in itertools.pairwise(t)]
        return cls(final_sync_ms=ms[0], last_pages_ms=ms[1], device_state_ms=ms[2], resume_ms=ms[3])


@dataclass(frozen=True)
class DrainReport:
    """Precopy's drain before the pause (capability ``precopy-drain``): COMMAND 6 to its ACK."""

    ms: float = 0.0  #: from the extra channels' END to the destination's word, the workload running
    sent_pages: int = 0  #: pages (zero runs included) the source had sent when it asked
    received_pages: int = 0  #: pages the destination had received when it answered


@dataclass(frozen=True)
class PostcopyTimeline:
    """The source's view of postcopy in bins of ``bin_seconds`` from the start command (C++
    counters, core.Timeline): requests from the destination, pages taken to answer them, pages the
    background push took, and the dirty pages still on the source at each bin."""

    bin_seconds: float = 0.01
    start_s: float = 0.0  #: when postcopy started, seconds since the migration started
    requests: tuple[int, ...] = ()
    request_pages: tuple[int, ...] = ()
    push_pages: tuple[int, ...] = ()
    left_pages: tuple[int, ...] = ()
    left_at_start: int = 0  #: dirty pages on the source when postcopy started


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
class WorkloadCheck:
    """A workload's own check of its memory (the second oracle)."""

    ok: bool
    pages_checked: int = 0
    mismatches: int = 0
    detail: str = ""


def workload_check(w: Workload, pause_s: float | None = None) -> WorkloadCheck | None:
    """``w``'s own check (paused for it first and resumed after, given ``pause_s``), or None when it
    has none; one that is gone (an attached process died) checks nothing."""
    try:
        if pause_s is not None:
            w.pause(pause_s)
        c = w.check()
        if pause_s is not None:
            w.resume()
    except LivemigError as e:
        return WorkloadCheck(False, 0, 0, f"no check: {e}")
    return None if c is None else WorkloadCheck(c.ok, c.pages_checked, c.mismatches, c.detail)


@dataclass(frozen=True)
class VerifyReport:
    """The generic oracle (docs/design.md rule 10): the destination's pages as of the switchover
    against the source's, digest by digest, and placements counted where they happen; plus the
    workload's own check on the destination."""

    pages_checked: int = 0  #: pages compared (or checked by the workload, without digests)
    mismatches: int = 0  #: pages that differ (digests), or the workload's own mismatches
    placed_twice: int = 0  #: postcopy placements of a page already placed (the destination's count)
    excepted: int = 0  #: pages not compared: hinted free and never sent (their content is the guest's)
    missing: int = 0  #: of the mismatches, pages the destination never got
    first_mismatches: tuple[int, ...] = ()  #: the first few mismatching pages
    digests: bool = False  #: the digest comparison ran (both sides had the digests capability)
    workload: WorkloadCheck | None = None  #: the destination workload's own check

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.placed_twice == 0 and (self.workload is None or self.workload.ok)


@dataclass(frozen=True)
class InterruptReport:
    """What the user's interrupts (signals, MigrationControl.cancel) did to a migration."""

    requests: int  #: interrupts received
    #: what they did: "cancelled" (before the destination's workload could run), "finished" (it
    #: could: the migration went on to its end, whether that end was success or not: see ``ok``),
    #: "aborted" (a second interrupt soon after: the pages only the source held are lost)
    outcome: Literal["cancelled", "finished", "aborted"]
    lost_pages: int = 0  #: aborted: pages that existed only on the source
    lost_runs: tuple[tuple[int, int], ...] = ()  #: the first of those, as (first page, pages)
    exact: bool = True  #: False when aborted while paused: the destination may lack a few more


@dataclass
class WorkloadInfo:
    """What was migrated."""

    kind: str = ""
    stats: dict[str, int | float] = field(default_factory=dict)
    process: dict[str, Any] = field(default_factory=dict)  #: an attached process: pid, name, role, memfd


@dataclass
class MigrationResult:
    """What a migration did; ``to_json()`` is the CLI's ``--json`` object."""

    ok: bool
    mode: Mode
    region_bytes: int
    page_size: int
    total_ms: float = 0.0
    #: from the workload's pause to the destination's word that its own runs (NaN, null in the
    #: JSON, when that word was lost with a broken connection)
    downtime_ms: float = 0.0
    downtime_split: DowntimeSplit = field(default_factory=DowntimeSplit)  #: the downtime's steps
    #: of downtime_split.resume_ms, the destination's own work on its clock (the start command read
    #: to its word sent: the workload rebuilt from the device state and started)
    destination_resume_ms: float = 0.0
    drain: DrainReport | None = None  #: precopy: the drain before the pause (None: not negotiated)
    precopy_rounds: int = 0
    bytes_sent: int = 0  #: bytes every channel carried to the destination, frame headers included
    pages_sent: int = 0  #: pages sent with data (precopy rounds, switchover, push and requests)
    zero_pages: int = 0  #: pages sent as zero runs (header only)
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
    workload: WorkloadInfo = field(default_factory=WorkloadInfo)
    #: bytes_sent over total_ms: the whole migration's average (the summary's "throughput")
    throughput_bps: float = 0.0
    #: dirty at the final sync with the workload paused: precopy sends them within the downtime,
    #: postcopy leaves them (with every page never sent) to the push and the faults
    switchover_pages: int = 0
    postcopy_pages_left: int = 0  #: postcopy: dirty pages on the source when the start command went
    downtime_limit_ms: float = 0.0  #: the limit precopy aimed at (MigrationConfig.downtime_limit_ms)
    timeline: PostcopyTimeline | None = None  #: postcopy: the source's timeline
    tls: TlsReport = field(default_factory=TlsReport)  #: encryption on the (last) connection
    prefault: PrefaultReport = field(default_factory=PrefaultReport)  #: the destination's, from its report
    outcome: Outcome = "completed"  #: how it ended (failed runs: what became of the source workload)
    interrupt: InterruptReport | None = None  #: what interrupts did, when there were any

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        d = asdict(self)
        for key in ("verify", "timeline", "interrupt", "drain"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class DestinationSummary:
    """What the destination saw of one migration (also sent back to the source as its report).
    ``workload``: the rebuilt workload (not part of the report)."""

    ok: bool
    mode: Mode
    region_bytes: int
    postcopy: PostcopyStats = field(default_factory=PostcopyStats)
    balloon: BalloonReport = field(default_factory=BalloonReport)
    verify: VerifyReport | None = None
    error: str | None = None
    recoveries: int = 0  #: times a broken postcopy connection was resumed
    placed_twice: int = 0  #: postcopy placements of a page already placed (rule 1: 0)
    workload_kind: str = ""
    pages_received: int = 0  #: pages read from the source (zero pages included), every connection
    tls: TlsReport = field(default_factory=TlsReport)  #: encryption on the (last) connection
    prefault: PrefaultReport = field(default_factory=PrefaultReport)
    workload_process: dict[str, Any] = field(default_factory=dict)  #: an attached process: pid, name, ...
    resume_ms: float = 0.0  #: the start command read to the workload running (its word about to go)
    workload: Workload | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the listener's ``--json`` output, and the report's header)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "workload":
                continue
            v = getattr(self, f.name)
            d[f.name] = asdict(v) if is_dataclass(v) and not isinstance(v, type) else v
        if d["verify"] is None:
            del d["verify"]
        return d


@dataclass(frozen=True)
class SourceWorkloadReport:
    """What became of the source workload when a migration failed."""

    running: bool  #: resumed here (the destination never ran it); False: stale, it stays paused
    done_delivered: bool  #: its balloon driver saw DONE (True when it has no balloon)
    held_pages: int  #: pages its balloon driver still holds back
    check: WorkloadCheck | None = None  #: with ``MigrationConfig.verify``: its own check


class MigrationFailed(MigrationError):
    """A migration failed; ``source_workload`` says what became of the source workload,
    ``outcome`` which case that is, ``mode`` how far it got (postcopy once the start command was
    sent), ``interrupt`` what the user's interrupts did."""

    def __init__(self, message: str, source_workload: SourceWorkloadReport | None = None, *,
                 outcome: Outcome = "cancelled", mode: Mode = "precopy",
                 interrupt: InterruptReport | None = None) -> None:
        super().__init__(message)
        self.source_workload = source_workload
        self.outcome: Outcome = outcome
        self.mode: Mode = mode
        self.interrupt = interrupt


# ---- the report: the destination's summary, and its page digests, back to the source ----

_REPORT_MAGIC = b"LMRP"
_REPORT_VERSION = 1
_REPORT_HEAD = struct.Struct("<4sHHIQ")  # magic, version, reserved, JSON bytes, digest count


def encode_report(summary: DestinationSummary, digests: npt.NDArray[np.uint64] | None) -> bytes:
    """The report blob: a header, the summary as JSON, then the page digests (little-endian u64)."""
    body = json.dumps(summary.to_json()).encode()
    d = b"" if digests is None else np.ascontiguousarray(digests, dtype="<u8").tobytes()
    n = 0 if digests is None else len(digests)
    return _REPORT_HEAD.pack(_REPORT_MAGIC, _REPORT_VERSION, 0, len(body), n) + body + d


def _latency(d: dict[str, Any]) -> LatencySummary:
    names = {f.name for f in fields(LatencySummary)}
    return LatencySummary(**{k: v for k, v in d.items() if k in names})


def _buckets(d: dict[str, Any]) -> LatencyBuckets:
    return LatencyBuckets(lower_us=tuple(d.get("lower_us", ())), upper_us=tuple(d.get("upper_us", ())),
                          counts=tuple(d.get("counts", ())))


_TLS_FIELDS = frozenset(f.name for f in fields(TlsReport))
_PREFAULT_FIELDS = frozenset(f.name for f in fields(PrefaultReport))


def _prefault(d: dict[str, Any]) -> PrefaultReport:
    known = {k: v for k, v in d.items() if k in _PREFAULT_FIELDS}
    return PrefaultReport(**{**known, "tried": tuple(d.get("tried", ())), "tried_gbps": tuple(d.get("tried_gbps", ()))})


def decode_report(blob: bytes) -> tuple[DestinationSummary, npt.NDArray[np.uint64] | None]:
    """Inverse of :func:`encode_report`; ProtocolError for anything else."""
    if len(blob) < _REPORT_HEAD.size:
        raise ProtocolError("report: shorter than its header")
    magic, version, _reserved, nbody, ndig = _REPORT_HEAD.unpack_from(blob)
    if magic != _REPORT_MAGIC:
        raise ProtocolError("report: bad magic")
    if version != _REPORT_VERSION:
        raise ProtocolError(f"report: version {version}, this side reads version {_REPORT_VERSION}")
    end = _REPORT_HEAD.size + nbody
    if end + 8 * ndig != len(blob):
        raise ProtocolError("report: its lengths do not add up to its size")
    try:
        d = json.loads(blob[_REPORT_HEAD.size:end])
        pc = d.get("postcopy", {})
        v = d.get("verify")
        verify = None
        if v:
            wl = v.get("workload")
            verify = VerifyReport(
                pages_checked=v.get("pages_checked", 0), mismatches=v.get("mismatches", 0),
                placed_twice=v.get("placed_twice", 0), excepted=v.get("excepted", 0), missing=v.get("missing", 0),
                first_mismatches=tuple(v.get("first_mismatches", ())), digests=bool(v.get("digests", False)),
                workload=WorkloadCheck(**wl) if wl else None)
        summary = DestinationSummary(
            ok=bool(d["ok"]), mode=d["mode"], region_bytes=int(d["region_bytes"]),
            postcopy=PostcopyStats(
                requests=pc.get("requests", 0), local_fills=pc.get("local_fills", 0),
                fault_latency_us=_latency(pc.get("fault_latency_us", {})),
                histogram=tuple(pc.get("histogram", ())), outstanding_requests=pc.get("outstanding_requests", 0),
                local_fill_pages=pc.get("local_fill_pages", 0),
                histogram_upper_us=tuple(float(x) for x in pc.get("histogram_upper_us", ())),
                faults=pc.get("faults", 0), request_latency_us=_latency(pc.get("request_latency_us", {})),
                blocked_us=_latency(pc.get("blocked_us", {})), fault_buckets=_buckets(pc.get("fault_buckets", {})),
                request_buckets=_buckets(pc.get("request_buckets", {})),
                blocked_buckets=_buckets(pc.get("blocked_buckets", {})),
                blocked_total_ms=pc.get("blocked_total_ms", 0.0)),
            balloon=BalloonReport(**d.get("balloon", {})), verify=verify, error=d.get("error"),
            recoveries=d.get("recoveries", 0), placed_twice=d.get("placed_twice", 0),
            workload_kind=d.get("workload_kind", ""), pages_received=d.get("pages_received", 0),
            tls=TlsReport(**{k: v for k, v in d.get("tls", {}).items() if k in _TLS_FIELDS}),
            prefault=_prefault(d.get("prefault", {})),
            workload_process=dict(d.get("workload_process", {})), resume_ms=float(d.get("resume_ms", 0.0)))
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"report: bad summary: {e}") from None
    digests = np.frombuffer(blob, dtype="<u8", count=ndig, offset=end).astype(np.uint64) if ndig else None
    return summary, digests


__all__ = [
    "BalloonReport",
    "DestinationSummary",
    "DowntimeSplit",
    "DrainReport",
    "HintStats",
    "InterruptReport",
    "LatencyBuckets",
    "LatencySummary",
    "MigrationFailed",
    "MigrationResult",
    "Mode",
    "Outcome",
    "PostcopyStats",
    "PostcopyTimeline",
    "PrefaultReport",
    "RoundStats",
    "SourceWorkloadReport",
    "VerifyReport",
    "WorkloadCheck",
    "WorkloadInfo",
    "decode_report",
    "encode_report",
    "workload_check",
]
