"""The source's figures as they happen, from the core's counters: every writer's lock-free counts
(:meth:`SourceFigures.counts`: the live view, the progress events and the report's totals alike),
the postcopy timeline (a core Timeline on the scanner), and each precopy round's RoundStats once the
sync after it ran."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from livemig import _core
from livemig.migration.monitor import Counts, Monitor
from livemig.migration.results import HintStats, MigrationResult, PostcopyTimeline, RoundStats

if TYPE_CHECKING:
    from livemig.migration.config import MigrationConfig
    from livemig.migration.links import SourceLink
    from livemig.migration.source_run import PassStats
    from livemig.source import Source
    from livemig.workload.base import BalloonPort

#: The postcopy timeline's bins: 10 ms each, ten minutes' worth (later events land in the last bin).
TIMELINE_BIN_S = 0.01
TIMELINE_BINS = 60_000


class SourceFigures:
    """What one outgoing migration has sent and has left."""

    def __init__(self, engine: Source, monitor: Monitor) -> None:
        self.engine, self.monitor = engine, monitor
        self.writers: list[_core.FrameWriter] = []  #: every writer of every connection
        self.timeline: _core.Timeline | None = None  #: postcopy: the scanner's timeline
        self.left_at_start = 0  #: postcopy: dirty pages when the start command went

    def watch(self, link: SourceLink) -> SourceLink:
        """Counts ``link``'s writers from now on; returns it."""
        self.writers += [link.main, *link.extras, *([link.urgent] if link.urgent is not None else [])]
        return link

    def counts(self) -> Counts:
        """Everything every writer sent so far (atomic loads in the core: any thread, any time)."""
        nbytes = pages = zero = 0
        for w in list(self.writers):
            s = w.sent
            nbytes += s.bytes
            pages += s.pages + s.zero_pages
            zero += s.zero_pages
        tl = self.timeline
        return Counts(bytes_sent=nbytes, pages_sent=pages, zero_pages=zero, remaining_pages=self.engine.dirty.count(),
                      faults=self.engine.core.counters().scanner.requests,
                      push_pages=tl.total(_core.TimelineSeries.PUSH_PAGES) if tl is not None else 0,
                      total_pages=self.engine.pages)

    def start_timeline(self) -> int:
        """Postcopy starts now: the scanner counts into a new timeline. Returns the dirty pages left."""
        self.left_at_start = self.engine.dirty.count()
        tl = _core.Timeline(TIMELINE_BIN_S, TIMELINE_BINS)
        self.engine.core.set_timeline(tl)
        tl.start()
        self.timeline = tl
        return self.left_at_start

    def start_fields(self, address: str, config: MigrationConfig, result: MigrationResult,
                     workload_kind: str) -> dict[str, Any]:
        """The ``start`` event's fields."""
        keys = ("postcopy", "postcopy_after", "max_rounds", "downtime_limit_ms", "hints", "channels", "verify")
        mode = "postcopy" if config.postcopy else "precopy"  # asked for (result.mode: what happens)
        return {"address": address, "mode": mode, "region_bytes": result.region_bytes,
                "page_size": result.page_size, "pages": self.engine.pages, "workload": workload_kind,
                "config": {k: getattr(config, k) for k in keys}}

    def finish(self, result: MigrationResult) -> MigrationResult:
        """Puts the totals every writer counted (page passes, requests and control frames alike) and
        the postcopy timeline into ``result``; returns it."""
        c = self.counts()
        result.bytes_sent, result.pages_sent, result.zero_pages = c.bytes_sent, c.pages_sent - c.zero_pages, c.zero_pages
        result.timeline = self.timeline_result()
        return result

    def timeline_result(self) -> PostcopyTimeline | None:
        """The postcopy timeline as the report holds it (None without postcopy)."""
        tl = self.timeline
        if tl is None:
            return None
        S = _core.TimelineSeries

        def series(k: _core.TimelineSeries) -> tuple[int, ...]:
            return tuple(int(x) for x in tl.series(k))

        return PostcopyTimeline(bin_seconds=tl.bin_seconds, start_s=self.monitor.since_start(tl.started_at),
                                requests=series(S.REQUESTS), request_pages=series(S.REQUEST_PAGES),
                                push_pages=series(S.PUSH_PAGES), left_pages=series(S.LEFT_PAGES),
                                left_at_start=self.left_at_start)

    def round(self, index: int, dirty: int, st: _core.SendStats | PassStats, t_sync: float, *, written: int,
              remaining: int, t_next: float) -> RoundStats:
        """Round ``index`` (``dirty`` pages at its sync at ``t_sync``, sent as ``st``) is complete: the
        sync after it (at ``t_next``) found ``written`` pages written and left ``remaining`` dirty.
        Its figures go to the monitor (progress, events) and are returned (the report)."""
        interval = t_next - t_sync
        r = RoundStats(index, dirty, int(st.pages), int(st.zero_pages), int(st.bytes), st.seconds,
                       st.bytes / st.seconds if st.seconds > 0 else 0.0, remaining, dirtied_pages=written,
                       dirty_rate_pps=written / interval if interval > 0 else 0.0,
                       started_s=self.monitor.since_start(t_sync))
        self.monitor.round_end(r, self.engine.pages)
        return r


__all__ = ["TIMELINE_BINS", "TIMELINE_BIN_S", "SourceFigures"]


def hint_stats(port: BalloonPort | None, before: _core.BalloonCounters | None, rounds: int) -> HintStats:
    """What the workload's balloon device took during this migration (``before``: its counters then)."""
    if port is None or before is None:
        return HintStats(rounds=rounds)
    now = port.device.counters()
    return HintStats(rounds=rounds, pages_hinted=int(now.pages_hinted - before.pages_hinted),
                     stale_dropped=int(now.hints_dropped_stale - before.hints_dropped_stale))
