"""The destination of a migration: :func:`serve` and the run behind it.

The region is made when the source connects (or the factory's), its pages land straight in place
during precopy and through userfaultfd placement in postcopy (C++ reader threads, the fault thread:
none of them needs the GIL). At switchover the workload's kind is checked against the factory, the
workload rebuilt from its device state and started; in postcopy its faults are served while the
rest arrives. The summary, with the page digests when the source verifies, goes back as the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from livemig import _core, wire
from livemig.destination import Destination
from livemig.errors import LivemigError, MigrationError, ProtocolError, WorkloadError
from livemig.memory import system_page_size
from livemig.migration import device_state
from livemig.migration.config import DestinationConfig
from livemig.migration.events import EventCallback
from livemig.migration.links import DestLink, event_summary
from livemig.migration.monitor import Counts, Monitor
from livemig.migration.progress import Progress
from livemig.migration.recovery import DestinationRecovery
from livemig.migration.results import (
    POWER_OF_TWO_UPPER_US,
    BalloonReport,
    DestinationSummary,
    LatencyBuckets,
    LatencySummary,
    Mode,
    PostcopyStats,
    PrefaultReport,
    VerifyReport,
    WorkloadCheck,
    encode_report,
)
from livemig.protocol import (
    ACK_NEVER_RAN,
    BALLOON_CMD_DONE,
    URGENT_CHANNEL,
    AckKind,
    Command,
    EventKind,
)
from livemig.workload.base import (
    Workload,
    WorkloadFactory,
    memory_complete,
    process_info,
    workload_gone,
)


def latency_summary(s: _core.LatencySnapshot) -> LatencySummary:
    """The report's figures of one latency histogram."""
    return LatencySummary(p50=s.p50_us, p99=s.p99_us, max=s.max_us, p90=s.p90_us, p99_9=s.p999_us, count=s.count,
                          over_1ms=s.over_1ms, over_10ms=s.over_10ms)


def latency_buckets(s: _core.LatencySnapshot) -> LatencyBuckets:
    """The non-empty buckets of one latency histogram, with their bounds."""
    b = s.buckets
    nz = b.nonzero()[0]
    return LatencyBuckets(lower_us=tuple(float(x) for x in s.lower_us[nz]),
                          upper_us=tuple(float(x) for x in s.upper_us[nz]), counts=tuple(int(x) for x in b[nz]))


class DestinationRun:
    """One incoming migration: the region, the channel readers and, after switchover, the workload."""

    def __init__(self, conn: wire.Connection, config: DestinationConfig, progress: Monitor, factory: WorkloadFactory,
                 listener: wire.Listener | None = None, wire_options: wire.WireOptions | None = None) -> None:
        self.config, self.progress, self.factory = config, progress, factory
        mine = factory.memory(conn.region_bytes, conn.page_size)
        if mine is not None:
            if mine.nbytes != conn.region_bytes or mine.page_size != conn.page_size:
                raise WorkloadError(f"the factory's memory holds {mine.nbytes} bytes of {mine.page_size}-byte pages;"
                                    f" the source sends {conn.region_bytes} bytes of {conn.page_size}-byte pages")
            self.dest = Destination.adopt(mine)
            self.region = mine
        else:
            self.dest = Destination(conn.region_bytes, page_size=conn.page_size)
            self.region = self.dest.as_region()
        if conn.negotiated.digests:
            self.dest.enable_digests()  # before the first page lands
        if config.prefault and self.region.prefaultable:
            self.dest.start_prefault()  # before the receivers start: warm memory ahead of them
        self.link = DestLink.of(conn)
        extra_fds = [ch.fileno() for ch in conn.pages]
        urgent_fd = conn.urgent.fileno() if conn.urgent is not None else -1
        self.session = _core.DestSession(self.dest.region, conn.main.fileno(), extra_fds, urgent_fd,
                                         self.link.return_path, conn.config())
        conn.read_through(self.session)  # through the channels' TLS sessions when encrypted
        self.link.route_requests(self.session)
        self.recovery = DestinationRecovery(config, listener, wire_options, self.session, progress,
                                            self.missing_pages)
        factory.prepare(self.region)
        self.workload: Workload | None = None
        self.resume_ms = 0.0  #: the start command read to the workload running (its word about to go)
        self.mode: Mode = "precopy"

    @property
    def postcopy(self) -> bool:
        return self.mode == "postcopy"

    def counts(self) -> Counts:
        """What has arrived, for the live view and the progress events (atomic loads in the core)."""
        return Counts(pages_sent=int(self.session.pages_received),
                      remaining_pages=self.dest.pages - self.dest.received.count(),
                      faults=int(self.dest.counters().faults), total_pages=self.dest.pages)

    def next_event(self) -> _core.SessionEvent:
        while True:
            seen = self.session.pages_received, self.link.conn.unread_bytes()
            ev = self.session.wait_event(self.config.timeout)
            if ev is None and (self.session.pages_received, self.link.conn.unread_bytes()) != seen:
                continue  # a source still moving pages, or bytes, is not a silent one (this side may be slow)
            if ev is not None and ev.kind == EventKind.FAILED and ev.channel == URGENT_CHANNEL and self.postcopy:
                ev = self._main_after_urgent(ev)
            cause = f"the source was silent for {self.config.timeout} s" if ev is None else event_summary(ev)
            if ev is None or ev.kind == EventKind.FAILED:
                gone = workload_gone(self.workload, 0.5) if self.postcopy else None
                if gone is not None:  # a local failure (e.g. placing into a dead process): no resume helps
                    raise MigrationError(f"{cause}: {gone}; its memory can no longer be completed")
                if self.recovery.pausable(self.postcopy):  # the workload runs on, faulting threads wait
                    self.link = self.recovery.pause_and_resume(cause, self.link)
                    continue
                if self.recovery.before_start(self.postcopy):
                    self.recovery.refuse_resume(cause, self.link)
                raise MigrationError(cause)
            if ev.kind == EventKind.PEER_ERROR:
                raise MigrationError(f"source: {ev.text}{self._incomplete()}")
            if ev.kind == EventKind.END:
                self.link.ended.add(ev.channel)
            self._note(ev)
            return ev

    def _main_after_urgent(self, failed: _core.SessionEvent) -> _core.SessionEvent:
        """The urgent socket failed (its reader, or a request sent on it): a source that aborts
        ends that channel first and says why on main, after the pages it sent there. So main is
        read first, for a second at most: its first event is acted on instead (an ERROR, main's
        own end or failure, COMPLETE); when main says nothing, ``failed`` stands (a break)."""
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None:
                break
            if ev.kind in (EventKind.FAILED, EventKind.END) and ev.channel == URGENT_CHANNEL:
                continue  # (the same channel again: its reader and its requests both report)
            return ev
        return failed

    def _note(self, ev: _core.SessionEvent) -> None:
        """Recovery's view of an event: COMMAND 1 is checked and acknowledged here."""
        if ev.kind != EventKind.COMMAND:
            return
        if ev.command == Command.SWITCHOVER:
            line, _ = device_state.KindLine.unpack_from(ev.data)
            why = self.factory.accepts(line.kind, line.version)
            if why is not None:
                raise WorkloadError(f"cannot host the source's workload: {why}")
            self.recovery.switchover_announced = True
            # Postcopy follows, and everything sent so far is applied (the queue is empty).
            self.link.conn.main.bound_queue("destination", self.config.postcopy_queue_bytes)
            self.link.return_path.send_ack(AckKind.SWITCHOVER, 0)
        elif ev.command == Command.POSTCOPY_NEXT:  # postcopy follows this round: spend the precopy window
            self.link.conn.main.bound_queue("destination", self.config.postcopy_queue_bytes)
        elif ev.command == Command.DRAIN:  # everything before it is applied (the extras ended first)
            self.link.return_path.send_ack(AckKind.DRAINED, int(self.session.pages_received))
        elif ev.command == Command.COMMITTED:
            self.recovery.source_committed = True

    def _incomplete(self) -> str:
        """Postcopy, the source gone: what this leaves here, in words ('' before postcopy). Waits
        (a second at most) for the urgent channel's END first, so its last pages count."""
        if not self.postcopy:
            return ""
        deadline = time.monotonic() + 1.0
        while self.link.conn.urgent is not None and 1 not in self.link.ended and time.monotonic() < deadline:
            ev = self.session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None or ev.kind == EventKind.FAILED:
                break
            if ev.kind == EventKind.END:
                self.link.ended.add(ev.channel)
        missing, first = self.missing_pages()
        if not missing:
            return ""
        return (f"; the workload here is INCOMPLETE: {missing:,} pages never arrived (the first: page {first}),"
                " so it is stopped")

    def start_workload(self, blob: bytes) -> None:
        """Rebuilds the workload from its device state and starts it. WorkloadError when the
        factory cannot host it (nothing ran here then)."""
        ds = device_state.unpack(blob)
        why = self.factory.accepts(ds.kind.kind, ds.kind.version)
        if why is not None:
            raise WorkloadError(f"cannot host the source's workload: {why}")
        try:
            workload = self.factory.build(ds.kind.kind, ds.kind.version, self.region, ds.state)
        except LivemigError:
            raise
        except Exception as e:
            raise WorkloadError(f"the destination's factory could not rebuild the {ds.kind.kind!r} workload:"
                                f" {type(e).__name__}: {e}") from e
        port = workload.balloon
        if port is not None:
            last = ds.balloon.get("last_round_id")
            if last:
                port.device.continue_after(int(last))
            if ds.balloon.get("cmd_id") == BALLOON_CMD_DONE:
                port.device.host_done()
        self.workload = workload
        workload.start()

    def run(self) -> DestinationSummary:
        self.session.start()
        self.progress.phase("precopy")
        blob: bytes | None = None
        while True:
            ev = self.next_event()
            if ev.kind == EventKind.DEVICE_STATE:
                blob = ev.data
            elif ev.kind == EventKind.COMMAND and ev.command in (Command.POSTCOPY_START, Command.COMPLETE):
                if blob is None:
                    raise ProtocolError("switchover without device state")
                if ev.command == Command.POSTCOPY_START:
                    self.mode = "postcopy"
                    self.progress.phase("postcopy")
                try:
                    self.start_workload(blob)
                except (LivemigError, OSError) as e:
                    self._never_ran(str(e))
                    raise
                # (timed before the ack goes: after it, this thread may wait for the GIL)
                self.resume_ms = (time.perf_counter() - ev.at) * 1e3
                self._send_resumed_ack(ev.command)
                self.progress.emit("switchover", mode=self.mode)
                port = self.workload.balloon if self.workload is not None else None
                if port is not None:
                    port.notify()  # the driver looks at the device now, not at its next poll
                if self.postcopy:
                    self._postcopy_until_complete()
                break
        return self.finish()

    def _never_ran(self, why: str) -> None:
        """The workload could not start here: the source hears that it never ran (and why), so it
        resumes its own."""
        try:
            self.link.return_path.send_ack(AckKind.GUEST_RUNS, ACK_NEVER_RAN)
            self.link.return_path.send_error(why[:4000])
        except LivemigError:
            pass

    def _send_resumed_ack(self, command: Command) -> None:
        """ACK that the workload runs. A broken connection is not fatal here: the workload runs and
        keeps running (the source never resumes its own once it sent the start command); in
        postcopy the reader reports the break and recovery acks again, in precopy the report's
        delivery waits for the source to resume and acks again (docs/protocol.md, the commit point)."""
        try:
            self.link.return_path.send_ack(AckKind.GUEST_RUNS, int(command))
        except LivemigError:
            pass

    def _postcopy_until_complete(self) -> None:
        while True:
            ev = self.next_event()
            if ev.kind == EventKind.COMMAND and ev.command == Command.COMPLETE:
                break
        # Requested pages may still be in flight on the urgent channel: it ends with END.
        if self.link.conn.urgent is not None:
            while 1 not in self.link.ended:
                self.next_event()

    def _postcopy_stats(self) -> PostcopyStats:
        c, lat = self.dest.counters(), self.dest.latency()
        fault = latency_buckets(lat.fault)
        return PostcopyStats(requests=c.requests, local_fills=c.local_fills,
                             fault_latency_us=latency_summary(lat.fault), histogram=fault.power_of_two(),
                             outstanding_requests=self.dest.requested.count(),
                             local_fill_pages=self.dest.local_fill.count(),
                             histogram_upper_us=POWER_OF_TWO_UPPER_US, faults=c.faults,
                             request_latency_us=latency_summary(lat.request), blocked_us=latency_summary(lat.blocked),
                             fault_buckets=fault, request_buckets=latency_buckets(lat.request),
                             blocked_buckets=latency_buckets(lat.blocked), blocked_total_ms=lat.blocked.sum_us / 1e3)

    def missing_pages(self) -> tuple[int, int]:
        """Pages neither received nor filled here (local fill), and the first of them (0 when none):
        in postcopy, what exists only on the source."""
        have = _core.PageBitmap(self.dest.pages)
        have.or_(self.dest.received)
        have.or_(self.dest.local_fill)
        missing = self.dest.pages - have.count()
        first = have.find_next_clear(0) if missing else None
        return missing, 0 if first is None else int(first)

    def _check_complete(self) -> None:
        """Postcopy, after COMPLETE: every page is here or fills itself here (local fill). A page
        neither would block whoever touches it for ever, the workload's own check included: say
        which instead (MigrationError)."""
        missing, first = self.missing_pages()
        if missing:
            raise MigrationError(f"the source completed but {missing} pages never arrived here (the first:"
                                 f" page {first})")

    def finish(self) -> DestinationSummary:
        assert self.workload is not None
        self.progress.phase("complete")
        if self.postcopy:
            self._check_complete()
            memory_complete(self.workload)  # (precopy: every page was in before it started)
        pc = self._postcopy_stats() if self.postcopy else PostcopyStats()
        return DestinationSummary(ok=True, mode=self.mode, region_bytes=self.dest.nbytes, postcopy=pc,
                                  workload_kind=self.workload.kind, workload_process=process_info(self.workload),
                                  resume_ms=self.resume_ms, workload=self.workload)

    def _settled(self, summary: DestinationSummary, await_reuse: bool) -> bool:
        assert self.workload is not None
        port = self.workload.balloon
        if port is not None:
            s = port.status()
            if s.pages_held > 0 or s.last_cmd_id != port.device.cmd_id:
                return False
        if await_reuse and self.postcopy and summary.postcopy.local_fill_pages:
            return self.dest.counters().local_fills >= summary.postcopy.local_fill_pages
        return True

    def settle_and_report(self, summary: DestinationSummary, verify: bool, settle_s: float,
                          await_reuse: bool) -> DestinationSummary:
        """Lets the workload run on for up to ``settle_s``: until its balloon driver saw the device's
        last command and released what it held (and, with ``await_reuse``, until it wrote every page
        it had hinted); then pauses it and, with ``verify``, has it check itself when the source
        verifies."""
        w = self.workload
        assert w is not None
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and not self._settled(summary, await_reuse):
            time.sleep(0.005)  # the workload runs at its own pace meanwhile
        w.pause(60.0)
        port = w.balloon
        if port is not None:
            s = port.status()
            summary.balloon = BalloonReport(last_cmd_id=s.last_cmd_id, done_delivered=s.done_seen,
                                            held_pages_after=s.pages_held)
        if self.postcopy:  # the faults the workload took while settling count too
            summary.postcopy = self._postcopy_stats()
        summary.placed_twice = int(self.dest.counters().placed_twice)
        summary.pages_received = int(self.session.pages_received)
        summary.prefault = self._prefault_report()
        # The workload checks itself when the source verifies (it offers `digests` only then), or
        # cannot say so (this side withheld `digests`): otherwise nobody waits for that answer, and
        # the source's migration would end only after it.
        caps = self.link.conn.negotiated
        if verify and (caps.digests or "digests" in self.config.disable_capabilities):
            self.progress.phase("verify")
            c = w.check()
            check = None if c is None else WorkloadCheck(c.ok, c.pages_checked, c.mismatches, c.detail)
            summary.verify = VerifyReport(
                pages_checked=check.pages_checked if check else 0, mismatches=check.mismatches if check else 0,
                placed_twice=summary.placed_twice, workload=check)
            summary.ok = summary.ok and summary.verify.ok
        return summary

    def _prefault_report(self) -> PrefaultReport:
        p = self.dest.prefault_stats()
        return PrefaultReport(threads=p.threads, added_threads=p.added_threads, tried=tuple(p.tried), tried_gbps=tuple(round(g, 3) for g in p.tried_gbps),
                              populated_pages=p.populated_pages, dropped_pages=p.dropped_pages, jumps=p.jumps,
                              seconds=p.seconds, finished=p.finished, failed=p.failed)

    def report_blob(self, summary: DestinationSummary) -> bytes:
        return encode_report(summary, self.dest.digests)

    def close(self) -> None:
        # The region first: unregistering wakes workload threads blocked on a fault for a page that
        # will never come (a source gone silent in postcopy); stopping the workload would wait on them.
        self.dest.stop()
        if self.workload is not None:
            self.workload.stop()
        self.link.conn.close()
        self.session.join()


def serve(
    listener: wire.Listener,
    config: DestinationConfig | None = None,
    progress: Progress | None = None,
    *,
    factory: WorkloadFactory | None = None,
    verify: bool = True,
    settle_s: float = 2.0,
    await_reuse: bool = False,
    wait: float | None = None,
    keep: Callable[[Workload], None] | None = None,
    events: EventCallback | None = None,
) -> DestinationSummary:
    """Accepts one migration on ``listener`` (waiting ``wait`` seconds for a source, None: forever),
    rebuilds its workload here with ``factory`` (default: :class:`StandardFactory`), runs until the
    source completes, and returns the summary (also sent back to the source as its report), whose
    ``workload`` is the rebuilt workload (a buffer workload's memory is the caller's from then on).
    ``settle_s``/``await_reuse``: see :meth:`DestinationRun.settle_and_report`. ``keep``: called
    with the paused workload after a verified migration, before it is stopped. ``progress`` and
    ``events``: as for :func:`migrate` (the events' ``side`` is "destination"; ``start`` comes
    once a source connected)."""
    config = config or DestinationConfig()
    if factory is None:
        from livemig.workload.factory import (
            StandardFactory,  # the default hosts every kind this build knows
        )

        factory = StandardFactory()
    fac = factory
    caps = wire.Capabilities.all(extra_channels=wire.MAX_EXTRA_CHANNELS).without(*config.disable_capabilities)
    opts = wire.WireOptions(page_size=system_page_size(), region_bytes=config.max_region_bytes,
                            capabilities=caps, secret=config.secret, timeout=config.timeout,
                            encrypt=config.encrypt, tls=config.tls, keepalive=config.keepalive)
    conn = listener.accept(opts, wait=wait)
    monitor = Monitor("destination", progress, events, page_size=conn.page_size)
    try:
        run = DestinationRun(conn, config, monitor, fac, listener, opts)
    except BaseException as e:
        conn.close()
        monitor.end(False, None, str(e))
        raise
    monitor.start(run.counts, region_bytes=conn.region_bytes, page_size=conn.page_size,
                  pages=run.dest.pages, capabilities=sorted(conn.negotiated.capabilities))
    try:
        summary = run.run()
        summary = run.settle_and_report(summary, verify, settle_s, await_reuse)
        summary.tls = run.link.conn.tls_report()
        summary.recoveries = run.recovery.recoveries
        if keep is not None and summary.ok and run.workload is not None:
            keep(run.workload)
        run.link = run.recovery.deliver_report(run.report_blob(summary), run.link, run.postcopy)
    except (LivemigError, OSError) as e:
        monitor.close()
        try:
            run.link.return_path.send_error(str(e)[:4000])
        except LivemigError:
            pass
        run.close()
        monitor.end(False, None, str(e))
        raise MigrationError(str(e)) from e
    except BaseException as e:
        monitor.close()
        run.close()
        monitor.end(False, None, f"{type(e).__name__}: {e}")
        raise
    monitor.close()
    run.close()
    monitor.end(summary.ok, summary.to_json(), summary.error)
    return summary


__all__ = ["DestinationRun", "serve"]
