"""The source of a migration: :func:`migrate` and the run behind it.

Python decides, C++ moves pages. The source runs precopy rounds (sync, send, measure) until what is
left fits the downtime limit at the measured bandwidth, or a round limit, or the postcopy point;
then it pauses the workload, does the final sync, and either sends the rest (precopy) or hands the
workload over early and serves the destination's faults while pushing the rest (postcopy). The
workload's balloon device is driven at every round event so hinted pages are skipped, and DONE
always reaches it. docs/design.md has the rules every step keeps.
"""

from __future__ import annotations

import math
import time
from typing import Any, NoReturn

from livemig import _core, wire
from livemig.balloon import BalloonDriver
from livemig.errors import LivemigError, MigrationError, ProtocolError
from livemig.migration import device_state, oracle
from livemig.migration.config import MigrationConfig
from livemig.migration.control import MigrationControl
from livemig.migration.legacy import legacy_call
from livemig.migration.links import SourceLink, event_summary
from livemig.migration.monitor import Monitor
from livemig.migration.recovery import ChannelBroken, NeverRan, SourceRecovery
from livemig.migration.results import (
    DestinationSummary,
    DowntimeSplit,
    MigrationFailed,
    MigrationResult,
    SourceWorkloadReport,
    WorkloadInfo,
    decode_report,
    workload_check,
)
from livemig.migration.source_figures import SourceFigures, hint_stats
from livemig.protocol import ACK_NEVER_RAN, AckKind, Command, EventKind
from livemig.source import Source
from livemig.workload.base import Workload, process_info


class SourceRun:
    """One outgoing migration of ``workload``: its engine, the connection and the page pumps."""

    def __init__(self, workload: Workload, config: MigrationConfig, monitor: Monitor,
                 control: MigrationControl | None = None) -> None:
        self.workload, self.config, self.monitor = workload, config, monitor
        self.control = control or MigrationControl()
        region = workload.region
        self.engine = Source(region)
        self.result = MigrationResult(ok=False, mode="postcopy" if config.postcopy else "precopy",
                                      region_bytes=region.nbytes, page_size=region.page_size,
                                      workload=WorkloadInfo(kind=workload.kind, process=process_info(workload)),
                                      downtime_limit_ms=config.downtime_limit_ms)
        self.link: SourceLink | None = None
        self.balloon = BalloonDriver(None, enabled=False)
        self.recovery: SourceRecovery | None = None
        self.dest_running = False  #: the destination workload may run: the source's must never resume
        self.excepted: _core.PageBitmap | None = None  #: free pages at the final sync (the oracle skips them)
        self._acked = False
        self._t_pause = 0.0
        self._steps: list[float] = []  #: the downtime's step ends (perf_counter): sync, last pages, device state
        self._hints_before: _core.BalloonCounters | None = None
        self.figures = SourceFigures(self.engine, monitor)  #: what it sent and has left (the core's counters)

    # ---- steps ----
    def connect(self, address: str) -> None:
        self.monitor.phase("connect")
        caps = wire.Capabilities.default(extra_channels=self.config.channels - 1)
        if self.config.verify:
            caps = wire.Capabilities(caps.names | {"digests"}, caps.extra_channels)
        caps = caps.without(*self.config.disable_capabilities)
        if not self.config.checksums:
            caps = caps.without("checksums")
        opts = wire.WireOptions(page_size=self.result.page_size, region_bytes=self.result.region_bytes,
                                capabilities=caps, secret=self.config.secret, timeout=self.config.timeout,
                                encrypt=self.config.encrypt, tls=self.config.tls)
        conn = wire.connect(address, opts)
        self.link = self.figures.watch(SourceLink.open(conn, self.engine.core))
        self.result.capabilities, self.result.tls = sorted(conn.negotiated.capabilities), conn.tls_report()
        self.link.session.start_return_path()
        self.recovery = SourceRecovery(self.config, self.engine.core, self.control, self.monitor, address, conn,
                                       on_link=self.figures.watch)
        port = self.workload.balloon
        if port is not None:
            port.device.set_target(self.engine.hint_target)  # accepted hints land in D and H
            self._hints_before = port.device.counters()
            hinting = self.config.hints and conn.negotiated.hinting_allowed(postcopy_possible=self.config.postcopy)
            self.balloon = BalloonDriver(port.device, enabled=hinting, notify=port.notify)


    def _check_peer(self) -> None:
        """Fails fast when the return path reported an error or broke."""
        assert self.link is not None
        ev = self.link.session.wait_event(0)
        if ev is not None:
            if ev.kind in (EventKind.PEER_ERROR, EventKind.FAILED, EventKind.END):
                raise MigrationError(f"destination: {event_summary(ev)}")
            raise MigrationError(f"unexpected {ev.kind.name} from the destination during precopy")

    def precopy(self) -> None:
        """Rounds until the rest fits the downtime limit, or the round limit, or postcopy time.
        A round's figures are complete at the sync that follows it (RoundStats.remaining_pages)."""
        assert self.link is not None
        self.monitor.phase("precopy")
        cfg, page = self.config, self.result.page_size
        bandwidth = 0.0
        sent: tuple[int, int, _core.SendStats, float] | None = None  # the round just sent, and its sync time
        for index in range(cfg.max_rounds + 1):
            self.balloon.before_sync()
            t_sync = time.perf_counter()
            written = self.engine.sync()
            self.balloon.after_sync()
            dirty = self.engine.dirty.count()
            if sent is not None:  # the sync after a round completes its figures
                self.result.rounds.append(self.figures.round(*sent, written=written, remaining=dirty, t_next=t_sync))
            if cfg.postcopy and index >= cfg.postcopy_after:
                break  # (postcopy_after=0: no precopy round, every page comes on demand or pushed)
            if index > 0:
                fits = bandwidth > 0 and dirty * page / bandwidth * 1e3 <= cfg.downtime_limit_ms
                if not cfg.postcopy and (fits or index >= cfg.max_rounds):
                    break
                if cfg.postcopy and index >= cfg.max_rounds:
                    break
            self._check_peer()
            self.monitor.round_begin(index, dirty, dirty, self.figures.counts().pages_sent)
            self.link.round_starts(index, cfg.postcopy_after if cfg.postcopy else None)
            st = self.link.session.precopy_pass(max_seconds=3600.0, max_pages=dirty)
            bandwidth = st.bytes / st.seconds if st.seconds > 0 else bandwidth
            sent = (index, dirty, st, t_sync)
        self.result.precopy_rounds = len(self.result.rounds)

    def kind_line(self) -> device_state.KindLine:
        return device_state.KindLine(self.workload.kind, self.workload.version)

    def announce_postcopy(self) -> None:
        """Before the workload pauses for a postcopy switchover: ends the extra page channels, syncs
        once more and has the destination drop the pages sent and written since, sends COMMAND 1
        (with the workload's kind, so a destination that cannot host it refuses now, the workload
        still running) and waits for its ACK. The destination has then applied everything sent so
        far, so the downtime holds neither the pages still queued in the sockets nor more discard
        work than the workload makes in its last milliseconds. From then on a destination whose
        connection breaks before its workload ran waits for a resume to say so."""
        assert self.link is not None
        self.link.end_extras()
        self.balloon.before_sync()
        self.engine.sync()
        self.balloon.after_sync()
        stale = self.engine.take_stale_sent()
        if len(stale):
            self.link.main.send_discard(stale)
        self.link.main.send_command(Command.SWITCHOVER, self.kind_line().pack())
        self.wait_ack(Command.SWITCHOVER)
        # Everything sent is applied: from here on the push queues little ahead of a request.
        self.link.conn.main.bound_queue("source", self.config.postcopy_queue_bytes)

    def switchover(self) -> float:
        """Pauses the workload, final sync, DONE, and (precopy) sends the rest; returns the pause time."""
        assert self.link is not None
        self.monitor.phase("switchover")
        self.workload.pause(self.config.pause_timeout_s)
        t_pause = time.perf_counter()
        self.balloon.before_sync()
        self.engine.sync()
        self.balloon.final_sync()  # DONE before the device state is sent, precopy and postcopy alike
        self._steps = [time.perf_counter()]
        self.result.switchover_pages = self.engine.dirty.count()
        if self.config.verify:
            self.excepted = oracle.free_pages(self.engine.hinted, self.engine.dirty)
        if not self.config.postcopy:
            while True:
                st = self.link.session.precopy_pass(max_seconds=3600.0)
                if st.drained:
                    break
        self.link.end_extras()  # (postcopy ended them ahead of the pause: announce_postcopy)
        if not self.config.postcopy:
            self._steps.append(time.perf_counter())
        return t_pause

    def device_state(self) -> bytes:
        balloon = {"cmd_id": self.balloon.cmd_id, "last_round_id": self.balloon.last_round_id}
        return device_state.pack(self.kind_line(), balloon, self.workload.export_state())

    def wait_ack(self, command: Command) -> float:
        """Waits until the destination acknowledges ``command``: COMMAND 1 with AckKind.SWITCHOVER
        (everything before it applied); COMMAND 2/3 with AckKind.GUEST_RUNS (its workload runs).
        Returns when that word arrived (time.perf_counter() clock)."""
        assert self.link is not None
        switchover = command == Command.SWITCHOVER
        want = (AckKind.SWITCHOVER, 0) if switchover else (AckKind.GUEST_RUNS, int(command))
        deadline = time.monotonic() + self.config.timeout
        while True:
            ev = self.link.session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                what = "acknowledge the switchover" if switchover else "resume the workload"
                raise MigrationError(f"the destination did not {what} within {self.config.timeout} s")
            if ev.kind == EventKind.ACK and (ev.ack_kind, ev.ack_value) == want:
                return ev.at
            if ev.kind in (EventKind.PEER_ERROR, EventKind.FAILED, EventKind.END):
                raise MigrationError(f"destination: {event_summary(ev)}")

    def finish_precopy(self, t_pause: float) -> None:
        assert self.link is not None
        self.link.main.send_device_state(self.device_state())
        self._steps.append(time.perf_counter())
        self.link.main.send_command(Command.COMPLETE)
        resumed_at = self.wait_ack(Command.COMPLETE)
        self.dest_running = True
        self.result.downtime_ms = (resumed_at - t_pause) * 1e3
        self.result.downtime_split = DowntimeSplit.of([t_pause, *self._steps, resumed_at])
        self.monitor.switchover("precopy", self.result.downtime_ms, self.result.switchover_pages)

    def postcopy(self, t_pause: float) -> None:
        assert self.link is not None
        sets = self.engine.switchover_sets()
        main = self.link.main
        if self.link.conn.negotiated.local_fill:
            main.send_discard(sets.discard)
            main.send_local_fill(sets.local_fill, 0)  # the workload has no poison value
        else:
            self.engine.dirty_hinted_unsent()  # served on request and pushed like any other page
            main.send_discard(sets.discard)
        self._steps.append(time.perf_counter())
        main.send_device_state(self.device_state())
        self._steps.append(time.perf_counter())
        self.result.postcopy_pages_left = self.figures.start_timeline()
        main.send_command(Command.POSTCOPY_START)
        self.dest_running = True  # from here on the source workload must never resume
        self.monitor.phase("postcopy")
        self._acked = False
        self._t_pause = t_pause
        self._serve_postcopy()

    def _last_words(self) -> None:
        """A channel broke: reads what the return path still delivers (up to its own end, or a
        second), in case the destination said why: its workload never ran (NeverRan: the caller
        cancels and the source workload runs on), or an error of its own (MigrationError)."""
        assert self.link is not None
        deadline = time.monotonic() + 1.0
        never_ran, why = False, ""
        while (left := deadline - time.monotonic()) > 0:
            ev = self.link.session.wait_event(left)
            if ev is None or ev.kind in (EventKind.END, EventKind.FAILED):
                break
            if ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and ev.ack_value == ACK_NEVER_RAN:
                never_ran = True
            elif ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and not self._acked:
                self._note_running(ev.at)  # it ran before the break: the downtime is known
            elif ev.kind == EventKind.PEER_ERROR:
                why = ev.text
        if never_ran:
            raise NeverRan(f"the destination's workload never ran: {why or 'no reason given'}")
        if why:
            raise MigrationError(f"destination: {why}")

    def _note_running(self, at: float) -> None:
        """The destination said its workload runs (its ACK, read at ``at``): the downtime ends."""
        self._acked = True
        self.result.downtime_ms = (at - self._t_pause) * 1e3
        self.result.downtime_split = DowntimeSplit.of([self._t_pause, *self._steps, at])
        self.monitor.switchover("postcopy", self.result.downtime_ms, self.result.switchover_pages)

    def _resume(self, cause: str) -> None:
        """A break in postcopy: the destination's last words (even after it ran: it may have failed
        on its own, past resuming: its workload's process died, say), then pause and resume."""
        assert self.link is not None and self.recovery is not None
        self._last_words()
        if not (self.dest_running and self.recovery.enabled()):
            self.link.teardown()
            raise MigrationError(cause)
        self.link = self.recovery.pause_and_resume(cause, self.link)
        self.result.tls = self.link.conn.tls_report()  # a fresh TLS handshake, new keys

    def _serve_postcopy(self) -> None:
        """Pushes until done, then ends the urgent channel and sends COMPLETE; a break pauses and
        resumes (recovery), then pushes on."""
        while True:
            try:
                self._push_until_drained()
                assert self.link is not None
                try:
                    self.link.session.end_urgent()
                    self.link.main.send_command(Command.COMPLETE)
                except (LivemigError, OSError) as e:
                    raise ChannelBroken(str(e)) from None
                return
            except ChannelBroken as e:
                self._resume(str(e))
                if not self._acked:  # its word that the workload ran was lost with the connection
                    self._acked = True  # (it resumed: its workload runs)
                    self.result.downtime_ms = math.nan  # unknown: null in the JSON, "-" in the summary
                assert self.recovery is not None
                if self.recovery.dest_completed:
                    return  # it has every page already

    def _push_until_drained(self) -> None:
        """Serve requests and push at once: the destination workload may fault before its ack arrives."""
        assert self.link is not None
        session = self.link.session
        t_push, pushing = time.perf_counter(), True
        while True:
            try:
                st = session.postcopy_push(max_seconds=0.05)
            except (LivemigError, OSError) as e:
                raise ChannelBroken(str(e)) from None
            if pushing:
                self.result.push_bytes += int(st.bytes)
                if st.drained:
                    self.result.push_seconds += time.perf_counter() - t_push
                    pushing = False
            wait = 0.05 if st.drained else 0.0  # nothing to push: block for the ack instead
            while (ev := session.wait_event(wait)) is not None:
                wait = 0.0
                if ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and not self._acked:
                    if ev.ack_value == ACK_NEVER_RAN:
                        raise NeverRan("the destination could not start the workload")
                    if ev.ack_value == int(Command.POSTCOPY_START):
                        self._note_running(ev.at)
                elif ev.kind in (EventKind.FAILED, EventKind.END):
                    raise ChannelBroken(event_summary(ev))
                elif ev.kind == EventKind.PEER_ERROR:
                    raise MigrationError(f"destination: {event_summary(ev)}")
            if st.drained and self._acked:
                break
            if not self._acked and time.perf_counter() - self._t_pause > self.config.timeout:
                raise MigrationError(f"the destination did not resume the workload within {self.config.timeout} s")

    def say_committed(self) -> None:
        """Precopy, once the destination said its workload runs: COMMAND 4 tells it this source will
        never resume its own, so the destination keeps its workload even if the rest of the
        conversation (the report, its confirmation) is lost (docs/protocol.md, Recovery)."""
        if self.config.postcopy or not self.dest_running or self.link is None:
            return
        try:
            self.link.main.send_command(Command.COMMITTED)
        except (LivemigError, OSError):
            pass  # the report wait sees the break

    def report(self) -> DestinationSummary:
        """The destination's summary, sent once it is done (and verified, when asked), with the
        generic oracle's verdict when both sides kept digests."""
        assert self.link is not None and self.recovery is not None
        self.say_committed()
        expected = None
        if self.config.verify and self.link.conn.negotiated.digests:
            # The workload is paused for good (the destination's runs): its memory is as at switchover.
            expected = oracle.region_digests(self.workload.region)
        deadline = time.monotonic() + self.config.timeout + 60.0
        while True:
            ev = self.link.session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise MigrationError("the destination sent no report")
            if ev.kind == EventKind.REPORT:
                summary, got = decode_report(ev.data)
                try:
                    self.link.main.send_end()  # the destination waits for this word that its report arrived
                except (LivemigError, OSError):
                    pass
                self._await_end()
                if expected is not None:
                    self._judge(summary, expected, got)
                return summary
            if ev.kind in (EventKind.FAILED, EventKind.END) and self.dest_running and self.recovery.enabled():
                # The report did not come: the destination may still miss pages (postcopy) or only
                # its report was lost. Resume; push what it lacks and complete again if need be.
                self._resume(ev.text or ev.kind.name.lower())
                if not self.recovery.dest_completed:
                    self._serve_postcopy()
                deadline = time.monotonic() + self.config.timeout + 60.0
                continue
            if ev.kind in (EventKind.PEER_ERROR, EventKind.FAILED, EventKind.END):
                raise MigrationError(f"destination: {event_summary(ev)}")

    def _judge(self, summary: DestinationSummary, expected: Any, got: Any) -> None:
        if got is None:
            raise ProtocolError("the destination negotiated digests but sent none with its report")
        workload = summary.verify.workload if summary.verify is not None else None
        summary.verify = oracle.compare(expected, got, self.excepted, summary.placed_twice, workload)
        summary.ok = summary.ok and summary.verify.ok

    def _await_end(self) -> None:
        """The destination ends the return path after its report; closing first would make its END
        fail. A destination that does not end it within a second is not waited for."""
        assert self.link is not None
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            ev = self.link.session.wait_event(left)
            if ev is None or ev.kind in (EventKind.END, EventKind.FAILED, EventKind.PEER_ERROR):
                return

    def cancel(self) -> None:
        """After a failure: the source workload gets DONE and keeps running, unless the destination
        workload may already run (then the source's must not resume: it would be stale)."""
        self.balloon.cleanup()
        if not self.dest_running:
            self.workload.resume()

    def source_report(self, settle_s: float = 10.0) -> SourceWorkloadReport:
        """After cancel(): lets a resumed workload see DONE (up to ``settle_s``), then reports (and,
        with ``config.verify``, has it check itself)."""
        running = not self.dest_running
        port = self.workload.balloon
        deadline = time.monotonic() + (settle_s if self.balloon.device is not None else 0.0)  # no device: no DONE sent
        while running and port is not None and time.monotonic() < deadline:  # DONE was sent
            now = port.status()
            if now.done_seen and now.pages_held == 0:
                break
            time.sleep(0.005)  # the workload's driver runs at its own pace
        s = port.status() if port is not None else None
        pause_s = self.config.pause_timeout_s if running else None
        check = workload_check(self.workload, pause_s) if self.config.verify else None
        return SourceWorkloadReport(running=running, done_delivered=s.done_seen if s else True,
                                    held_pages=s.pages_held if s else 0, check=check)

    def close(self) -> None:
        """Connection down, tracking ended (the workload's memory is ordinary again, rule 9), hints
        routed back to the workload's device."""
        if self.link is not None:
            self.link.teardown()
        port = self.workload.balloon
        if port is not None:
            port.device.set_target(None)
        self.engine.close()
        if self.recovery is not None:
            self.result.recoveries, self.result.requeued_pages = self.recovery.recoveries, self.recovery.requeued_pages


def migrate(address: str, workload: Workload | int, *args: Any, **kwargs: Any) -> MigrationResult:
    """Migrates ``workload`` to the destination listening at ``address``:
    ``migrate(address, workload, config=MigrationConfig(), progress=None, control=None, events=None)``.

    The workload is started if it does not run. Raises :class:`MigrationFailed` (naming the step
    and cause) when the migration fails; the source workload then keeps running and has been sent
    DONE, unless the destination's had already started (postcopy), in which case the source's
    stays paused. After success the source workload stays paused: its memory is stale.

    ``progress``: a :class:`Progress` (phases, rounds), or a :class:`LiveProgress` that also gets
    the live figures several times a second. ``events``: a callable taking each
    :class:`MigrationEvent` (e.g. an :class:`EventStream` to iterate over, or an
    :class:`EventWriter` for NDJSON); the last is ``end``, with the report or the error.

    Postcopy recovery: a connection that breaks after the destination workload started pauses the
    migration; it resumes over a new connection (by itself, or through ``control``: see
    :class:`livemig.migration.MigrationControl`) within ``config.reconnect_deadline_s``.
    """
    if isinstance(workload, int):
        workload, args = legacy_call((workload, *args), kwargs)
    names = ("config", "progress", "control", "events")
    params: dict[str, Any] = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in params:
            raise TypeError(f"migrate() got an unexpected or repeated argument {k!r}")
        params[k] = v
    config: MigrationConfig = params.get("config") or MigrationConfig()
    monitor = Monitor("source", params.get("progress"), params.get("events"), page_size=workload.region.page_size)
    run = SourceRun(workload, config, monitor, params.get("control"))
    step = "connect"
    monitor.start(run.figures.counts, **run.figures.start_fields(address, config, run.result, workload.kind))
    try:
        workload.start()
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
        monitor.phase("complete")
        summary = run.report()
    except NeverRan as e:
        run.dest_running = False
        _fail(run, monitor, f"{step}: {e}", e)
    except (LivemigError, OSError) as e:
        _fail(run, monitor, f"{step}: {e}", e)
    except BaseException as e:
        monitor.end(False, None, f"{step}: {type(e).__name__}: {e}")
        run.cancel()
        run.close()
        raise
    monitor.close()
    r = run.figures.finish(run.result)
    run.close()
    r.total_ms = (time.perf_counter() - monitor.t0) * 1e3
    r.throughput_bps = r.bytes_sent / (r.total_ms / 1e3) if r.total_ms > 0 else 0.0
    r.hints = hint_stats(workload.balloon, run._hints_before, run.balloon.stats.rounds)
    r.postcopy, r.balloon, r.verify, r.error, r.ok, r.prefault = (
        summary.postcopy, summary.balloon, summary.verify, summary.error, summary.ok, summary.prefault)
    r.workload.stats = workload.stats()
    monitor.end(r.ok, r.to_json(), r.error)
    return r


def _fail(run: SourceRun, monitor: Monitor, message: str, cause: BaseException) -> NoReturn:
    """Cancels ``run`` after a failure, sends the end event, raises MigrationFailed."""
    monitor.close()
    run.cancel()
    report = run.source_report()
    run.close()
    monitor.end(False, None, message)
    raise MigrationFailed(message, report) from cause


__all__ = ["SourceRun", "migrate"]
