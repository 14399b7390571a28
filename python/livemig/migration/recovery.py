"""Postcopy recovery: when a channel breaks after the destination guest started, both sides pause
instead of failing, and the source resumes over a new connection (docs/protocol.md, "Recovery").

- Destination: stops reading the broken sockets and stops sending requests, but keeps its region,
  fault thread and workload; the workload's faulting threads wait in the kernel. Its listener stays
  open; it accepts only a *resume* connection naming the paused session (anything else is
  refused), sends its received bitmap, asks again for every page requested and not yet placed,
  and tells the source its workload runs. It gives up after ``DestinationConfig.resume_deadline_s``.
- Source: keeps its engine, workload (paused) and bitmaps. It reconnects by itself with backoff
  (``MigrationConfig.auto_reconnect``) or waits for :meth:`MigrationControl.resume`, until
  ``MigrationConfig.reconnect_deadline_s``. On the received bitmap it makes every page not
  received (and not filled locally by the destination) dirty and unsent again, in C++ before it
  reads any later request, then pushes on until done. No page is lost or placed twice: the
  destination's placement drops what it already holds (rule 1).
- A destination that is gone (or restarted: it has no such paused session) is never replaced by
  the source's own workload: the destination's ran, so the source's is stale and stays paused; the
  error says so. One exception is safe: a destination that broke during switchover, before its
  workload ran, answers the resume with "never ran", and the source cancels cleanly.

:class:`SourceRecovery` and :class:`DestinationRecovery` are collaborators of the runs: they get
what they need when made, and hand back a new link; they never reach into their runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from livemig import _core, wire
from livemig.errors import ConnectionLost, LivemigError, MigrationError, ProtocolError
from livemig.migration.links import DestLink, SourceLink, shutdown_channels
from livemig.migration.progress import notice
from livemig.protocol import ACK_NEVER_RAN, AckKind, Command, EventKind

if TYPE_CHECKING:
    from collections.abc import Callable

    from livemig.migration.config import DestinationConfig, MigrationConfig
    from livemig.migration.control import MigrationControl
    from livemig.migration.monitor import Monitor

_HANDSHAKE_TIMEOUT_S = 5.0  # a resume attempt waits this long for the destination's answers
_SWITCHOVER_WAIT_S = 10.0  # a destination broken during switchover waits this long for a resume


class ChannelBroken(LivemigError):
    """A channel broke during postcopy: pause and resume, or give up."""


class NeverRan(MigrationError):
    """The destination says its workload never ran (the break came during switchover): the source
    cancels and its workload runs on."""


def stale_message(cause: str) -> str:
    return (f"{cause}; the destination workload had started, so the source workload is stale: it stays"
            " paused and is not resumed here")


def uncertain_message(cause: str) -> str:
    return (f"{cause}; the destination never answered the start command, so whether its workload runs is"
            " UNKNOWN: the source workload stays paused, never resumed here, so the two never both run."
            " Decide which one runs: if the destination said its workload never ran (or never got that far),"
            " resume the source's; otherwise it runs there and this copy is stale (docs/protocol.md,"
            " \"The commit point\")")


class SourceRecovery:
    """The source's side: reconnects and resumes a paused postcopy migration."""

    def __init__(self, config: MigrationConfig, source: _core.Source, control: MigrationControl,
                 progress: Monitor, address: str, conn: wire.Connection,
                 on_link: Callable[[SourceLink], SourceLink] | None = None) -> None:
        self.config, self.source, self.control, self.progress = config, source, control, progress
        self.on_link = on_link  #: sees every resumed link first (the live counts watch its writers)
        self.address = address
        self.session_id, self.negotiated = conn.session, conn.negotiated
        self.page_size, self.region_bytes = conn.page_size, conn.region_bytes
        self.recoveries = 0
        self.requeued_pages = 0
        self.dest_completed = False  #: the last resume found the destination complete (only its report is left)
        self.resumed_at = 0.0  #: when the last resume's answer (its workload runs) arrived (perf_counter)

    def enabled(self) -> bool:
        """Breaks may be recovered from at all."""
        return self.config.reconnect_deadline_s > 0

    def pause_and_resume(self, cause: str, link: SourceLink, uncertain: bool = False,
                         phase: str = "postcopy") -> SourceLink:
        """Pauses after a break and returns the link of a new connection; MigrationError when it
        cannot (deadline, a destination without this session, wrong secret), NeverRan when the
        destination says its workload never ran (the caller cancels). ``uncertain``: the start
        command went out but the destination never said its workload runs (the errors say so).
        ``phase``: the progress phase once resumed."""
        final = uncertain_message if uncertain else stale_message
        link.teardown()
        how = "reconnecting by itself" if self.config.auto_reconnect else "waiting for a resume command"
        notice(self.progress, f"paused: the connection broke ({cause}); {how} for up to"
                              f" {self.config.reconnect_deadline_s:g} s")
        self.progress.phase("paused")
        self.progress.paused(cause)
        ctl = self.control
        ctl._take_resume(0)  # a resume() from before this pause is stale
        ctl._set_paused(cause)
        deadline = time.monotonic() + self.config.reconnect_deadline_s
        address, last, delay, first = self.address, cause, 0.05, True
        attempts = 0
        try:
            while True:
                left = deadline - time.monotonic()
                ctl._check()  # a cancel here can only abort: the destination's workload may run
                if left <= 0:
                    raise MigrationError(final(
                        f"paused since the connection broke ({cause}); not resumed within"
                        f" {self.config.reconnect_deadline_s} s (last attempt: {last})"))
                if self.config.auto_reconnect:
                    req = ctl._take_resume(0 if first else min(delay, left))
                else:
                    req = ctl._take_resume(left)
                    if req is None:
                        continue
                first = False
                if req is not None and req[0] is not None:
                    address = req[0]
                attempts += 1
                try:
                    new = self._resume_connection(address)
                except (ConnectionLost, OSError) as e:
                    last = str(e)
                    self.progress.resume_attempt(attempts, last)
                    delay = min(delay * 2, 1.0)
                    continue
                except NeverRan:
                    raise NeverRan(
                        f"the connection broke during switchover ({cause}) and the destination says its"
                        " workload never ran: cancelled, the source workload keeps running") from None
                except ProtocolError as e:  # refused (no such session, secret) or nonsense: final
                    raise MigrationError(final(f"resume refused by {address}: {e}")) from None
                self.address = address
                self.recoveries += 1
                self.progress.resumed(self.recoveries, self.requeued_pages)
                self.progress.phase(phase)
                return new
        finally:
            ctl._set_paused(None)

    def _resume_connection(self, address: str) -> SourceLink:
        """One resume attempt: the handshake naming the paused session, then the destination's
        received bitmap (the C++ return path resyncs the source on it) and its word that its
        workload runs. Tears the attempt down on any failure."""
        caps = wire.Capabilities(self.negotiated.capabilities, 0)
        # An encrypted session resumes encrypted, whatever the new address (fresh keys: a new handshake).
        encrypt = True if self.negotiated.encryption else self.config.encrypt
        opts = wire.WireOptions(page_size=self.page_size, region_bytes=self.region_bytes, capabilities=caps,
                                secret=self.config.secret,
                                timeout=min(self.config.timeout, _HANDSHAKE_TIMEOUT_S),
                                encrypt=encrypt, tls=self.config.tls, keepalive=self.config.keepalive)
        conn = wire.connect(address, opts, resume=self.session_id)
        if (conn.negotiated.capabilities, conn.negotiated.encryption) != (self.negotiated.capabilities,
                                                                          self.negotiated.encryption):
            conn.close()
            raise ProtocolError("the resumed connection negotiated other capabilities or encryption than the"
                                " session")
        conn.timeout = self.config.timeout
        conn.main.bound_queue("source", self.config.postcopy_queue_bytes)  # a resume is postcopy
        link = SourceLink.open(conn, self.source, extras=False, resumed=True)
        if self.on_link is not None:
            link = self.on_link(link)
        try:
            self._await_resumed(link, opts.timeout)
        except BaseException:
            link.teardown()
            raise
        return link

    def _await_resumed(self, link: SourceLink, timeout: float) -> None:
        session = link.session
        session.resync_on_received_bitmap(self.negotiated.local_fill)
        session.start_return_path()
        deadline = time.monotonic() + timeout
        resynced = False
        while True:
            ev = session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise ConnectionLost(f"the destination did not answer the resume within {timeout} s")
            if ev.kind == EventKind.RECEIVED_BITMAP and ev.resynced:
                resynced = True
                self.requeued_pages += ev.requeued_pages
            elif ev.kind == EventKind.ACK and ev.ack_kind == AckKind.GUEST_RUNS:
                if ev.ack_value == ACK_NEVER_RAN:
                    raise NeverRan("never ran")
                self.dest_completed = ev.ack_value == Command.COMPLETE
                if not self.dest_completed and not resynced:
                    raise ProtocolError("the destination resumed without sending its received bitmap")
                self.resumed_at = ev.at
                return
            elif ev.kind in (EventKind.FAILED, EventKind.END):
                raise ConnectionLost(ev.text or "the destination closed the resumed connection")
            elif ev.kind == EventKind.PEER_ERROR:
                raise ProtocolError(ev.text)


class DestinationRecovery:
    """The destination's side: waits, its workload running, for the source to resume."""

    def __init__(self, config: DestinationConfig, listener: wire.Listener | None,
                 wire_options: wire.WireOptions | None, session: _core.DestSession, progress: Monitor,
                 missing: Callable[[], tuple[int, int]] | None = None) -> None:
        self.config, self.listener, self.wire_options = config, listener, wire_options
        self.session, self.progress = session, progress
        #: (pages neither received nor filled here, the first of them): what only the source holds
        self._missing_of = missing or (lambda: (0, 0))
        self.recoveries = 0
        self.switchover_announced = False  #: COMMAND 1 arrived: a postcopy switchover follows
        self.source_committed = False  #: COMMAND 4 arrived (informational: the source saw this workload run)

    def _missing(self) -> int:
        return self._missing_of()[0]

    def _can_wait(self) -> bool:
        return self.listener is not None and self.wire_options is not None and self.config.resume_deadline_s > 0

    def pausable(self, postcopy: bool) -> bool:
        """A break now pauses: the workload runs here (postcopy) and a listener can take a resume."""
        return postcopy and self._can_wait()

    def before_start(self, postcopy: bool) -> bool:
        """The connection broke before the workload ran here: the source may have sent its start
        command (COMMAND 2 or 3) and cannot know whether it arrived, so it may try to resume; it
        must learn 'never ran' (a source that knows it never sent it says so with an ERROR, and
        is not waited for)."""
        return not postcopy and self._can_wait()

    def drop(self, link: DestLink) -> None:
        """Shuts the sockets down (waking a reader or a request send blocked on them), stops sending
        requests, joins the readers, then closes the sockets: no thread touches an fd after it is
        closed (a new connection may get its number). A best-effort ERROR on the way out goes to
        memory from then on."""
        shutdown_channels(link.conn)
        self.session.detach()
        self.session.join()
        while self.session.wait_event(0) is not None:
            pass  # the old connection's leftovers: the source says it all again after resuming
        link.conn.close()
        link.return_path = _core.FrameWriter(-1, link.conn.config())

    def _accept_resume(self, cause: str, deadline: float, link: DestLink) -> wire.Connection:
        """Waits for the source's resume connection until ``deadline`` (time.monotonic());
        MigrationError then."""
        assert self.listener is not None and self.wire_options is not None
        last = cause
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"paused since the connection broke ({cause}); the source did not resume"
                                     f" within {self.config.resume_deadline_s:g} s (last: {last})")
            try:
                return self.listener.accept(self.wire_options, wait=left,
                                            resume=(link.conn.session, link.conn.negotiated))
            except (ConnectionLost, ProtocolError, OSError) as e:  # timeout, a stranger, a dead attempt
                last = str(e)

    def pause_and_resume(self, cause: str, link: DestLink) -> DestLink:
        """The connection broke in postcopy: the workload keeps running, faulting threads wait;
        returns the resumed link (or raises MigrationError at the deadline)."""
        self.drop(link)
        missing = self._missing()
        notice(self.progress, f"paused: the connection broke ({cause}); the workload runs here"
                              + (f" but {missing:,} pages are still only on the source (its threads that touch"
                                 " one wait)" if missing else "")
                              + f"; waiting up to {self.config.resume_deadline_s:g} s for the source to resume")
        self.progress.phase("paused")
        self.progress.paused(cause)
        deadline = time.monotonic() + self.config.resume_deadline_s
        while True:
            try:
                conn = self._accept_resume(cause, deadline, link)
            except MigrationError as e:
                missing, first = self._missing_of()
                if not missing:
                    raise
                raise MigrationError(
                    f"{e}. The workload here is INCOMPLETE: {missing:,} pages never arrived (the first: page"
                    f" {first}) and exist only on the source, which is gone; a thread that touches one would"
                    " wait for ever, so the workload is stopped") from None
            conn.main.bound_queue("destination", self.config.postcopy_queue_bytes)
            new = DestLink.of(conn)
            urgent_fd = conn.urgent.fileno() if conn.urgent is not None else -1
            try:
                conn.read_through(self.session)  # the new connection's TLS sessions (fresh keys)
                self.session.reattach(conn.main.fileno(), [], urgent_fd, new.return_path)
            except LivemigError as e:  # the new connection broke already: wait for another
                cause = str(e)
                conn.close()
                continue
            break
        self.recoveries += 1
        try:
            new.return_path.send_ack(AckKind.GUEST_RUNS, int(Command.POSTCOPY_START))
        except LivemigError:
            pass  # the reader sees the break too: the next event pauses again
        self.progress.resumed(self.recoveries)
        self.progress.phase("postcopy")
        return new

    def refuse_resume(self, cause: str, link: DestLink) -> None:
        """The connection broke (or the source fell silent) before the workload ran here: says it
        never ran (a source still reading learns it at once), then waits (until the deadline) for a
        source that may try to resume, tells it the workload never ran, and raises."""
        try:  # a source still listening on this connection learns it at once
            link.return_path.send_ack(AckKind.GUEST_RUNS, ACK_NEVER_RAN)
            link.return_path.send_error(f"the destination workload never ran: {cause}"[:4000])
        except LivemigError:
            pass
        self.drop(link)
        try:
            conn = self._accept_resume(cause, time.monotonic() + min(self.config.resume_deadline_s, _SWITCHOVER_WAIT_S),
                                       link)
        except MigrationError:
            raise MigrationError(f"the connection broke before the workload ran here: {cause}") from None
        try:
            w = conn.writer()
            w.send_ack(AckKind.GUEST_RUNS, ACK_NEVER_RAN)
            w.send_error("the destination workload never ran; the migration is cancelled")
        except LivemigError:
            pass
        finally:
            conn.close()
        raise MigrationError(f"the connection broke before the workload ran here ({cause});"
                             " the source was told to keep its workload")

    def _report_confirmed(self) -> bool:
        """Waits for the source's END on main: it has the report."""
        deadline = time.monotonic() + self.config.timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None or ev.kind == EventKind.PEER_ERROR or (ev.kind == EventKind.FAILED and ev.channel == 0):
                return False
            if ev.kind == EventKind.END and ev.channel == 0:
                return True
            if ev.kind == EventKind.COMMAND and ev.command == Command.COMMITTED:
                self.source_committed = True
            # other channels closing (the source closes them all once it has the report): not the word
        return False

    def deliver_report(self, blob: bytes, link: DestLink, postcopy: bool) -> DestLink:
        """Sends the report and waits until the source confirms it (END on main). If it gets lost,
        waits for the source to resume and sends it again. Past the deadline the workload here runs
        on: it is the only one (a source never resumes its own once it sent the start command,
        unless told it never ran). Returns the link in use at the end."""
        deadline: float | None = None
        while True:
            try:
                link.return_path.send_device_state(blob)
                link.return_path.send_end()
                if self._report_confirmed():
                    return link
                cause = "the source did not confirm the report"
            except LivemigError as e:
                cause = str(e)
            conn: wire.Connection | None = None
            if self._can_wait():
                self.drop(link)
                self.progress.phase("paused")
                if deadline is None:
                    deadline = time.monotonic() + self.config.resume_deadline_s
                try:
                    conn = self._accept_resume(cause, deadline, link)
                except MigrationError:
                    conn = None
            if conn is None:
                notice(self.progress, f"the source never confirmed the report ({cause}); the workload here"
                                      " runs on: it is the only one")
                return link
            link = DestLink.of(conn)
            self.source_committed = True  # a source resumes only once it saw this workload run
            try:
                conn.read_through(self.session)
                self.session.reattach(conn.main.fileno(), [], -1 if conn.urgent is None else conn.urgent.fileno(),
                                      link.return_path, resync=False)
                self.recoveries += 1
                link.return_path.send_ack(AckKind.GUEST_RUNS, int(Command.COMPLETE))
            except LivemigError:
                pass  # dropped on the next round
            self.progress.phase("complete")


__all__ = ["ChannelBroken", "DestinationRecovery", "NeverRan", "SourceRecovery", "stale_message",
           "uncertain_message"]
