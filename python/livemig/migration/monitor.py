"""The one place a migration's runs report to (:class:`Monitor`): phases, rounds, the switchover,
recoveries and the end go to the caller's :class:`Progress` and event callback from here, and a
sampler thread reads the core's counters (:class:`Counts`, atomic loads through the bindings)
several times a second for the live figures (:class:`Snapshot`) and the periodic events.

Nothing here touches pages: a sample is a handful of counter reads and one popcount in C++, so the
live view costs the migration nothing measurable (bench/bench_live_view.py shows it)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from livemig.migration.events import EventCallback, MigrationEvent
from livemig.migration.progress import LiveProgress, NoProgress, Progress, Snapshot, notice
from livemig.migration.results import RoundStats

#: Seconds between samples of the live figures (the live view is redrawn this often: 5 Hz).
SAMPLE_INTERVAL_S = 0.2
#: Seconds between ``progress`` events.
EVENT_INTERVAL_S = 1.0
#: Faults per second (over the last second) above which a ``faults`` event is sent.
FAULT_THRESHOLD_PER_S = 1000.0
#: The window the rates are measured over.
RATE_WINDOW_S = 1.0


@dataclass(frozen=True)
class Counts:
    """One reading of a side's counters (cumulative since the migration started)."""

    bytes_sent: int = 0  #: source: bytes on the wire (destination: 0)
    pages_sent: int = 0  #: source: pages sent, zero pages included; destination: pages received
    zero_pages: int = 0  #: source: of pages_sent, those sent as zero runs
    remaining_pages: int = 0  #: source: dirty pages; destination: pages not here yet
    faults: int = 0  #: source: requests from the destination; destination: fault events
    push_pages: int = 0  #: source, postcopy: pages the background push took
    total_pages: int = 0


Meter = Callable[[], Counts]


class Monitor:
    """Reports one migration (``side``: "source" or "destination") to ``progress`` and ``events``.
    Calls to both are serialised by a lock: the migrating thread and the sampler never overlap."""

    def __init__(self, side: str, progress: Progress | None, events: EventCallback | None, *,
                 sample_interval_s: float = SAMPLE_INTERVAL_S, event_interval_s: float = EVENT_INTERVAL_S,
                 fault_threshold_per_s: float = FAULT_THRESHOLD_PER_S, page_size: int = 4096) -> None:
        self.side = side
        self.progress: Progress = progress or NoProgress()
        self.live: LiveProgress | None = progress if isinstance(progress, LiveProgress) else None
        self.events = events
        self.sample_interval_s, self.event_interval_s = sample_interval_s, event_interval_s
        self.fault_threshold_per_s = fault_threshold_per_s
        self.page_size = page_size
        self.t0 = time.perf_counter()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._meter: Meter | None = None
        self._history: deque[tuple[float, Counts]] = deque()
        self._last_event = 0.0
        # State the runs set (read by the sampler; each attribute is replaced whole).
        self.phase_name = "start"
        self.round = -1
        self.round_budget = 0
        self.round_start_sent = 0
        self.dirty_rate_pps = 0.0
        self.downtime_ms: float | None = None
        self.recoveries = 0
        self.attempts = 0
        self.paused_cause = ""
        self.ended = False
        self.sample_error: Exception | None = None  #: what stopped the sampler, if anything did

    # ---- time ----
    def now(self) -> float:
        """Seconds since the migration started."""
        return time.perf_counter() - self.t0

    def since_start(self, perf_counter: float) -> float:
        """A time.perf_counter() reading as seconds since the migration started."""
        return perf_counter - self.t0

    # ---- events ----
    def emit(self, kind: str, **data: Any) -> None:
        """Sends one event (no-op without an event callback)."""
        if self.events is None:
            return
        ev = MigrationEvent(kind, self.side, self.now(), data)
        with self._lock:
            self.events(ev)

    def start(self, meter: Meter | None, **data: Any) -> None:
        """The migration starts: the ``start`` event, and the sampler when someone shows or streams
        live figures."""
        self.emit("start", **data)
        self._meter = meter
        if meter is not None and (self.live is not None or self.events is not None):
            self._thread = threading.Thread(target=self._sample_loop, name="livemig-monitor", daemon=True)
            self._thread.start()

    def phase(self, name: str) -> None:
        """A new phase (Progress.phase too)."""
        self.phase_name = name
        with self._lock:
            self.progress.phase(name)
        self.emit("phase", phase=name)

    def round_begin(self, index: int, dirty_pages: int, budget: int, sent_so_far: int) -> None:
        """A precopy round starts sending ``budget`` pages (``dirty_pages`` dirty at its sync)."""
        self.round, self.round_budget, self.round_start_sent = index, budget, sent_so_far
        self.emit("round_begin", round=index, dirty_pages=dirty_pages)

    def round_end(self, r: RoundStats, total_pages: int) -> None:
        """A precopy round's figures are complete (after the sync that follows it)."""
        self.dirty_rate_pps = r.dirty_rate_pps
        with self._lock:
            self.progress.update(round=r.index, remaining_pages=r.remaining_pages, total_pages=total_pages,
                                 bandwidth_bps=r.bandwidth_bps)
        self.emit("round_end", **asdict(r))

    def switchover(self, mode: str, downtime_ms: float, switchover_pages: int) -> None:
        """The workload runs on the destination: the downtime is known."""
        self.downtime_ms = downtime_ms
        self.emit("switchover", mode=mode, downtime_ms=downtime_ms, switchover_pages=switchover_pages)

    def notice(self, text: str) -> None:
        """Something the user must read now, whatever the display (why a pause, what an interrupt
        does): to the Progress's ``notice`` when it has one. From any thread."""
        with self._lock:
            notice(self.progress, text)

    def paused(self, cause: str) -> None:
        """Postcopy recovery: a connection broke, the migration pauses."""
        self.attempts, self.paused_cause = 0, cause
        self.emit("paused", cause=cause, recoveries=self.recoveries)

    def resume_attempt(self, attempt: int, error: str) -> None:
        """A resume attempt failed (the pause goes on)."""
        self.attempts = attempt
        self.emit("resume_attempt", attempt=attempt, error=error)

    def resumed(self, recoveries: int, requeued_pages: int = 0) -> None:
        """The migration continues over a new connection."""
        self.recoveries, self.paused_cause = recoveries, ""
        self.emit("resumed", recoveries=recoveries, attempts=self.attempts + 1, requeued_pages=requeued_pages)

    def end(self, ok: bool, report: dict[str, Any] | None, error: str | None = None) -> None:
        """The migration is over: stops the sampler, then the ``end`` event (once)."""
        self.close()
        if self.ended:
            return
        self.ended = True
        self.emit("end", ok=ok, error=error, report=report)

    def close(self) -> None:
        """Stops the sampler (idempotent) and shows a last snapshot."""
        t = self._thread
        if t is None:
            return
        self._thread = None
        self._stop.set()
        t.join()
        if self.sample_error is None:
            self.sample()  # the last figures, as the run leaves them

    # ---- the sampler ----
    def _sample_loop(self) -> None:
        next_t = time.perf_counter()
        while True:
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 (a display's or a callback's bug must not stop a migration)
                self.sample_error = e  # kept for whoever wonders why the figures stopped
                return
            next_t += self.sample_interval_s
            if self._stop.wait(max(0.0, next_t - time.perf_counter())):
                return

    def sample(self) -> Snapshot | None:
        """Reads the counters once: shows the snapshot, and sends the periodic events when due."""
        if self._meter is None:
            return None
        c = self._meter()
        t = self.now()
        h = self._history
        h.append((t, c))
        while len(h) > 2 and t - h[1][0] >= RATE_WINDOW_S:
            h.popleft()  # keep the newest sample at least a window old (or the oldest there is)
        t_old, old = h[0]
        dt = t - t_old
        def per_s(now: int, then: int) -> float:
            return (now - then) / dt if dt > 0 else 0.0
        pages_per_s = per_s(c.pages_sent, old.pages_sent)
        rate = per_s(c.bytes_sent, old.bytes_sent) if self.side == "source" else pages_per_s * self.page_size
        faults_per_s = per_s(c.faults, old.faults)
        precopy = self.phase_name == "precopy"
        left = max(0, min(c.remaining_pages, self.round_budget - (c.pages_sent - self.round_start_sent))) if precopy else 0
        eta = left / pages_per_s if precopy and pages_per_s > 0 else None
        s = Snapshot(side=self.side, t=t, phase=self.phase_name, round=self.round, total_pages=c.total_pages,
                     bytes_sent=c.bytes_sent, pages_sent=c.pages_sent, rate_bps=rate, pages_per_s=pages_per_s,
                     dirty_rate_pps=self.dirty_rate_pps, remaining_pages=c.remaining_pages,
                     round_pages=self.round_budget, round_pages_left=left, round_eta_s=eta, faults_per_s=faults_per_s, faults=c.faults,
                     push_pages=c.push_pages, downtime_ms=self.downtime_ms, recoveries=self.recoveries,
                     attempts=self.attempts, paused_cause=self.paused_cause)
        with self._lock:
            if self.live is not None:
                self.live.snapshot(s)
        if self.events is not None and t - self._last_event >= self.event_interval_s:
            self._last_event = t
            self.emit("progress", **{k: v for k, v in asdict(s).items() if k not in ("side", "t")})
            if s.faults_per_s > self.fault_threshold_per_s:
                self.emit("faults", faults_per_s=s.faults_per_s, threshold_per_s=self.fault_threshold_per_s,
                          faults=s.faults)
        return s


__all__ = ["EVENT_INTERVAL_S", "FAULT_THRESHOLD_PER_S", "SAMPLE_INTERVAL_S", "Counts", "Meter", "Monitor"]
