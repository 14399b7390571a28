"""The source of a migration: the run behind :func:`~livemig.migration.outgoing.migrate`.

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
from dataclasses import dataclass

from livemig import _core, wire
from livemig.balloon import BalloonDriver
from livemig.errors import LivemigError, MigrationError
from livemig.migration import device_state, oracle
from livemig.migration.config import MigrationConfig
from livemig.migration.control import MigrationControl
from livemig.migration.links import SourceLink, event_summary
from livemig.migration.monitor import Monitor
from livemig.migration.recovery import ChannelBroken, NeverRan, SourceRecovery
from livemig.migration.results import (
    DestinationSummary,
    DowntimeSplit,
    DrainReport,
    MigrationResult,
    WorkloadInfo,
    decode_report,
)
from livemig.migration.source_figures import SourceFigures
from livemig.protocol import ACK_NEVER_RAN, AckKind, Command, EventKind
from livemig.source import Source
from livemig.workload.base import Workload, process_info

_SLICE_S = 0.25  # a precopy pass runs in slices this long, so a cancel is seen within one
_POLL_S = 0.1  # waits for the destination check for a cancel this often


@dataclass(frozen=True)
class PassStats:
    """One precopy pass, summed over its slices (the SendStats fields SourceFigures.round reads)."""

    pages: int
    zero_pages: int
    bytes: int
    seconds: float
    drained: bool


class SourceRun:
    """One outgoing migration of ``workload``: its engine, the connection and the page pumps."""

    def __init__(self, workload: Workload, config: MigrationConfig, monitor: Monitor,
                 control: MigrationControl | None = None) -> None:
        self.workload, self.config, self.monitor = workload, config, monitor
        self.control = control or MigrationControl()
        region = workload.region
        self.engine = Source(region)
        # The mode is what happened: postcopy once the start command went out (not the config's wish).
        self.result = MigrationResult(ok=False, mode="precopy", region_bytes=region.nbytes, page_size=region.page_size,
                                      workload=WorkloadInfo(kind=workload.kind, process=process_info(workload)),
                                      downtime_limit_ms=config.downtime_limit_ms)
        self.link: SourceLink | None = None
        self.balloon = BalloonDriver(None, enabled=False)
        self.recovery: SourceRecovery | None = None
        #: the start command (COMMAND 2 or 3) may have reached the destination: its workload may
        #: run, so the source's must never resume unless the destination says it never ran
        self.dest_may_run = False
        self.dest_ran = False  #: the destination said its workload runs (ACK 0/2 or 0/3)
        self.paused = False  #: recovering: the connection is down
        self.excepted: _core.PageBitmap | None = None  #: free pages at the final sync (the oracle skips them)
        self._excepted_into = _core.PageBitmap(self.engine.pages) if config.verify else None  # (made ahead)
        self._t_pause = 0.0
        self._steps: list[float] = []  #: the downtime's step ends (perf_counter): sync, last pages, device state
        self._hints_before: _core.BalloonCounters | None = None
        self.figures = SourceFigures(self.engine, monitor)  #: what it sent and has left (the core's counters)
        self.control._bind(monitor, self._wake, self._only_here)

    # ---- interrupts (MigrationControl.cancel, signals through it) ----
    def _wake(self) -> None:
        """From any thread: a running pass or push returns soon, so the orchestrator sees a cancel."""
        link = self.link
        if link is not None:
            link.session.interrupt()

    def _only_here(self) -> int:
        """Pages the destination lacks and only the source holds (never sent, or sent and stale)."""
        return self.engine.dirty.count() if self.dest_may_run else 0

    def _start_command(self) -> None:
        """Just before COMMAND 2 or 3: from here on the destination's workload may run. A return
        path that already failed fails the migration now, while the source's can still resume."""
        self._check_peer()
        self.control._protect()  # Cancelled instead when a cancel came first
        self.dest_may_run = True

    def _event(self, timeout: float) -> _core.SessionEvent | None:
        """The next return-path event within ``timeout`` s, looking for a cancel every _POLL_S."""
        assert self.link is not None
        deadline = time.monotonic() + timeout
        while True:
            self.control._check()
            left = deadline - time.monotonic()
            ev = self.link.session.wait_event(min(max(left, 0.0), _POLL_S))
            if ev is not None or left <= _POLL_S:
                return ev

    def _pass(self, max_pages: int | None = None) -> PassStats:
        """One precopy pass over the dirty pages (at most ``max_pages``; None: until none is left),
        in slices so a cancel is seen within one."""
        assert self.link is not None
        pages = zero = nbytes = 0
        seconds = 0.0
        while True:
            self.control._check()
            left = None if max_pages is None else max_pages - pages - zero
            if left is not None and left <= 0:
                return PassStats(pages, zero, nbytes, seconds, False)
            st = (self.link.session.precopy_pass(max_seconds=_SLICE_S) if left is None else
                  self.link.session.precopy_pass(max_seconds=_SLICE_S, max_pages=left))
            pages, zero, nbytes, seconds = pages + st.pages, zero + st.zero_pages, nbytes + st.bytes, seconds + st.seconds
            if st.drained or st.seconds < _SLICE_S:  # none left, the budget taken, or a cancel
                self.control._check()
                return PassStats(pages, zero, nbytes, seconds, bool(st.drained))

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
                                encrypt=self.config.encrypt, tls=self.config.tls,
                                keepalive=self.config.keepalive)
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
            raise MigrationError(f"unexpected {ev.kind.name} from the destination before the switchover")

    def precopy(self) -> None:
        """Rounds until the rest fits the downtime limit, or the round limit, or postcopy time.
        A round's figures are complete at the sync that follows it (RoundStats.remaining_pages)."""
        assert self.link is not None
        self.monitor.phase("precopy")
        cfg, page = self.config, self.result.page_size
        bandwidth = 0.0
        sent: tuple[int, int, PassStats, float] | None = None  # the round just sent, and its sync time
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
            st = self._pass(dirty)
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
            self.excepted = oracle.free_pages(self.engine.hinted, self.engine.dirty, self._excepted_into)
        if not self.config.postcopy:
            while not self._pass().drained:
                pass
        self.link.end_extras()  # (postcopy ended them ahead of the pause: announce_postcopy)
        if not self.config.postcopy:
            self._steps.append(time.perf_counter())
        return t_pause

    def device_state(self) -> bytes:
        balloon = {"cmd_id": self.balloon.cmd_id, "last_round_id": self.balloon.last_round_id}
        return device_state.pack(self.kind_line(), balloon, self.workload.export_state())

    def drain(self) -> None:
        """Precopy, before the pause (``precopy-drain``): END on the extra channels, COMMAND 6 and
        its ACK, so the destination applied every page sent and none is queued in the downtime."""
        assert self.link is not None
        if self.config.postcopy or not self.link.conn.negotiated.precopy_drain:
            return
        t, sent = time.perf_counter(), self.figures.counts().pages_sent
        self.link.end_extras()
        self.link.main.send_command(Command.DRAIN)
        ev = self.wait_ack(Command.DRAIN)
        self.result.drain = DrainReport(ms=(ev.at - t) * 1e3, sent_pages=sent, received_pages=ev.ack_value)

    def wait_ack(self, command: Command) -> _core.SessionEvent:
        """Waits until the destination acknowledges ``command``: COMMAND 1 with AckKind.SWITCHOVER
        and COMMAND 6 with AckKind.DRAINED (everything before it applied); COMMAND 2/3 with
        AckKind.GUEST_RUNS (its workload runs). Returns that ACK (``at``: when it arrived, on the
        time.perf_counter() clock). After the start command (the destination's workload may run) a
        silence or a break is ChannelBroken (recover, to learn whether it runs), an answer that it
        never ran is NeverRan."""
        assert self.link is not None
        kinds = {Command.SWITCHOVER: AckKind.SWITCHOVER, Command.DRAIN: AckKind.DRAINED}
        want_kind = kinds.get(command, AckKind.GUEST_RUNS)
        want_value = 0 if command == Command.SWITCHOVER else None if command == Command.DRAIN else int(command)
        broken = ChannelBroken if self.dest_may_run else MigrationError
        deadline = time.monotonic() + self.config.timeout
        while True:
            ev = self._event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                what = {Command.SWITCHOVER: "acknowledge the switchover", Command.DRAIN: "acknowledge the drain"}
                raise broken(f"the destination did not {what.get(command, 'resume the workload')}"
                             f" within {self.config.timeout} s")
            if ev.kind == EventKind.ACK and ev.ack_kind == want_kind and want_value in (None, ev.ack_value):
                return ev
            if ev.kind == EventKind.ACK and (ev.ack_kind, ev.ack_value) == (AckKind.GUEST_RUNS, ACK_NEVER_RAN):
                self._last_words(never_ran=True)
            if ev.kind == EventKind.PEER_ERROR:
                raise MigrationError(f"destination: {event_summary(ev)}")
            if ev.kind in (EventKind.FAILED, EventKind.END):
                raise broken(f"destination: {event_summary(ev)}")

    def finish_precopy(self, t_pause: float) -> None:
        """DEVICE_STATE and COMMAND 3; the destination's workload then runs. Once the command may
        have left, a break never resumes the source's workload: it recovers to learn the answer."""
        assert self.link is not None
        self.link.main.send_device_state(self.device_state())
        self._steps.append(time.perf_counter())
        self._start_command()
        try:
            try:
                self.link.main.send_command(Command.COMPLETE)
            except (LivemigError, OSError) as e:
                raise ChannelBroken(str(e)) from None
            resumed_at = self.wait_ack(Command.COMPLETE).at
        except ChannelBroken as e:
            self._resume(str(e))
            assert self.recovery is not None
            resumed_at = self.recovery.resumed_at
        self.dest_ran = True
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
        self._start_command()  # from here on the source workload must never resume on its own
        self.result.mode = "postcopy"
        self.result.postcopy_pages_left = self.figures.start_timeline()
        try:
            main.send_command(Command.POSTCOPY_START)
        except (LivemigError, OSError):
            pass  # the push sees the break too, and recovery learns whether the workload runs there
        self.monitor.phase("postcopy")
        self._t_pause = t_pause
        self._serve_postcopy()

    def _last_words(self, never_ran: bool = False) -> None:
        """A channel broke (or the destination said its workload never ran): reads what the return
        path still delivers (up to its own end, or a second), in case the destination said why: its
        workload never ran (NeverRan: the caller cancels and the source workload runs on), or an
        error of its own (MigrationError)."""
        assert self.link is not None
        deadline = time.monotonic() + 1.0
        why = ""
        while (left := deadline - time.monotonic()) > 0:
            ev = self.link.session.wait_event(left)
            if ev is None or ev.kind in (EventKind.END, EventKind.FAILED):
                break
            if ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and ev.ack_value == ACK_NEVER_RAN:
                never_ran = True
            elif ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and not self.dest_ran:
                self._note_running(ev.at)  # it ran before the break: the downtime is known
            elif ev.kind == EventKind.PEER_ERROR:
                why = ev.text
        if never_ran:
            raise NeverRan(f"the destination's workload never ran: {why or 'no reason given'}")
        if why:
            raise MigrationError(f"destination: {why}")

    def _note_running(self, at: float) -> None:
        """The destination said its workload runs (its ACK, read at ``at``): the downtime ends."""
        self.dest_ran = True
        self.result.downtime_ms = (at - self._t_pause) * 1e3
        self.result.downtime_split = DowntimeSplit.of([self._t_pause, *self._steps, at])
        self.monitor.switchover("postcopy", self.result.downtime_ms, self.result.switchover_pages)

    def _resume(self, cause: str) -> None:
        """A break once the destination's workload may run: pause, then resume over a new
        connection; the destination then says whether its workload runs (and resumes it)."""
        assert self.link is not None and self.recovery is not None
        self._last_words()  # even after it ran: it may have failed on its own (its workload's process died)
        if not (self.dest_may_run and self.recovery.enabled()):
            self.link.teardown()
            raise MigrationError(cause)
        self.paused = True
        self.link = self.recovery.pause_and_resume(cause, self.link, uncertain=not self.dest_ran,
                                                   phase="postcopy" if self.result.mode == "postcopy" else "complete")
        self.paused = False
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
                self._resume(str(e))  # (its last words first: the ack, when it came before the break)
                if not self.dest_ran:  # its word that the workload ran was lost with the connection
                    self.dest_ran = True  # (it resumed: its workload runs)
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
            self.control._check()
            wait = 0.05 if st.drained else 0.0  # nothing to push: block for the ack instead
            while (ev := session.wait_event(wait)) is not None:
                wait = 0.0
                if ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS and not self.dest_ran:
                    if ev.ack_value == ACK_NEVER_RAN:
                        self._last_words(never_ran=True)
                    if ev.ack_value == int(Command.POSTCOPY_START):
                        self._note_running(ev.at)
                elif ev.kind in (EventKind.FAILED, EventKind.END):
                    raise ChannelBroken(event_summary(ev))
                elif ev.kind == EventKind.PEER_ERROR:
                    raise MigrationError(f"destination: {event_summary(ev)}")
            if st.drained and self.dest_ran:
                break
            if not self.dest_ran and time.perf_counter() - self._t_pause > self.config.timeout:
                # It may run or not: recovery asks it (a new connection it must answer).
                raise ChannelBroken(f"the destination did not resume the workload within {self.config.timeout} s")

    def say_committed(self) -> None:
        """Precopy, once the destination said its workload runs: COMMAND 4 (this source will never
        resume its own). Informational since a source never resumes its workload once COMMAND 3
        may have arrived; sent for destinations that still wait for it (docs/protocol.md)."""
        if self.config.postcopy or not self.dest_ran or self.link is None:
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
            ev = self._event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise MigrationError("the destination sent no report")
            if ev.kind == EventKind.REPORT:
                summary, got = decode_report(ev.data)
                try:
                    self.link.main.send_end()  # the destination waits for this word that its report arrived
                except (LivemigError, OSError):
                    pass
                self.link.await_end()
                if expected is not None:
                    oracle.judge(summary, expected, got, self.excepted)
                return summary
            if ev.kind in (EventKind.FAILED, EventKind.END) and self.dest_ran and self.recovery.enabled():
                # The report did not come: the destination may still miss pages (postcopy) or only
                # its report was lost. Resume; push what it lacks and complete again if need be.
                self._resume(ev.text or ev.kind.name.lower())
                if not self.recovery.dest_completed:
                    self._serve_postcopy()
                deadline = time.monotonic() + self.config.timeout + 60.0
                continue
            if ev.kind in (EventKind.PEER_ERROR, EventKind.FAILED, EventKind.END):
                raise MigrationError(f"destination: {event_summary(ev)}")

    def cancel(self) -> None:
        """After a failure: the source workload gets DONE and keeps running, unless the destination
        workload may already run (then the source's must not resume: it would be stale)."""
        self.balloon.cleanup()
        if not self.dest_may_run:
            self.workload.resume()
            if self.link is not None and not self.paused:
                try:  # so the destination does not wait for a resume that will not come
                    self.link.end_extras()  # (the other channels end cleanly: their close is no break)
                    self.link.session.end_urgent()
                    self.link.main.send_error("the source cancelled the migration; its workload runs on")
                    self.link.close_gracefully(min(self.config.timeout, 2.0))
                except (LivemigError, OSError):
                    pass

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


__all__ = ["SourceRun"]
