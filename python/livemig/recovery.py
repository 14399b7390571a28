"""Postcopy recovery: when a channel breaks after the destination guest started, both sides pause
instead of failing, and the source resumes over a new connection (docs/protocol.md, "Recovery").

- Destination: stops reading the broken sockets and stops sending requests, but keeps its region,
  fault thread and guest; the guest's faulting threads wait in the kernel. Its listener stays
  open; it accepts only a *resume* connection naming the paused session (anything else is
  refused), sends its received bitmap, asks again for every page requested and not yet placed,
  and tells the source its guest runs. It gives up after ``DestinationConfig.resume_deadline_s``.
- Source: keeps its region, guest (paused) and bitmaps. It reconnects by itself with backoff
  (``MigrationConfig.auto_reconnect``) or waits for :meth:`MigrationControl.resume`, until
  ``MigrationConfig.reconnect_deadline_s``. On the received bitmap it makes every page not
  received (and not filled locally by the destination) dirty and unsent again, in C++ before it
  reads any later request, then pushes on until done. No page is lost or placed twice: the
  destination's placement drops what it already holds (rule 1).
- A destination that is gone (or restarted: it has no such paused session) is never replaced by
  the source's own guest: the destination guest ran, so the source guest is stale and stays
  paused; the error says so. One exception is safe: a destination that broke during switchover,
  before its guest ran, answers the resume with "never ran", and the source cancels cleanly.

These mixins hold the recovery paths of ``migration._SourceRun`` and ``migration._DestinationRun``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livemig import _core, wire
from livemig.errors import ConnectionLost, LivemigError, MigrationError, ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Self

    from livemig.balloon import BalloonDevice
    from livemig.migration import DestinationConfig, MigrationConfig, MigrationResult, Progress
    from livemig.source import Source

ACK_RESUMED = 0  # ack kind: the destination guest runs (value: the command it answered; 0: it never ran)
ACK_SWITCHOVER = 1  # ack kind: the destination got COMMAND_SWITCHOVER (a postcopy switchover follows)
_NEVER_RAN = 0
_HANDSHAKE_TIMEOUT_S = 5.0  # a resume attempt waits this long for the destination's answers
_SWITCHOVER_WAIT_S = 10.0  # a destination broken during switchover waits this long for a resume


class MigrationControl:
    """Steers a running :func:`livemig.migrate` from another thread: see whether it is paused
    (postcopy, connection broken) and resume it, optionally towards a new address. With
    ``MigrationConfig(auto_reconnect=False)`` the source waits for :meth:`resume`; otherwise a
    call makes the next reconnect attempt happen at once."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused: str | None = None
        self._pauses = 0
        self._pending: tuple[str | None] | None = None

    @property
    def paused(self) -> str | None:
        """Why the migration is paused (the broken connection's error), or None while it runs."""
        with self._cv:
            return self._paused

    def wait_paused(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s until the migration is paused; True when it is."""
        with self._cv:
            return self._cv.wait_for(lambda: self._paused is not None, timeout)

    def resume(self, address: str | None = None) -> None:
        """Resumes a paused migration over a new connection to ``address`` (None: the same one).
        Without a pause under way it is kept for the next one."""
        with self._cv:
            self._pending = (address,)
            self._cv.notify_all()

    # -- for the source run --
    def _set_paused(self, cause: str | None) -> None:
        with self._cv:
            if cause is not None:
                self._pauses += 1
            self._paused = cause
            self._cv.notify_all()

    def _take_resume(self, timeout: float) -> tuple[str | None] | None:
        """Waits up to ``timeout`` for a resume() and consumes it."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending is not None, max(0.0, timeout))
            pending, self._pending = self._pending, None
            return pending


class ChannelBroken(LivemigError):
    """A channel broke during postcopy: pause and resume, or give up."""


class _NeverRan(Exception):
    """The destination answered a resume: its guest never ran (the break came during switchover)."""


def shutdown_channels(conn: wire.Connection) -> None:
    """Shuts every socket of ``conn`` down (waking threads blocked on them) without closing."""
    for ch in conn.channels():
        try:
            ch.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def stale_message(cause: str) -> str:
    return (f"{cause}; the destination guest had started, so the source guest is stale: it stays paused"
            " and is not resumed here")


class SourceRecovery:
    """The source's side of postcopy recovery (a mixin of ``migration._SourceRun``)."""

    config: MigrationConfig
    progress: Progress
    source: Source
    balloon: BalloonDevice | None
    result: MigrationResult
    conn: wire.Connection | None
    session: _core.SourceSession | None
    writers: list[_core.FrameWriter]
    main: _core.FrameWriter
    extras: list[_core.FrameWriter]
    urgent: _core.FrameWriter | None
    dest_guest_running: bool
    address: str
    control: MigrationControl
    session_id: bytes
    negotiated: wire.Negotiated
    recoveries: int
    requeued_pages: int
    dest_completed: bool  #: the last resume found the destination complete (it only resends its report)

    wait_ack: Callable[[int], float]  # migration._SourceRun's

    def recoverable(self) -> bool:
        """A break now pauses (the destination guest may run) instead of failing."""
        return self.dest_guest_running and self.config.reconnect_deadline_s > 0

    def announce_postcopy(self) -> None:
        """Before the guest pauses for a postcopy switchover: ends the extra page channels, syncs
        once more and has the destination drop the pages sent and written since, sends
        COMMAND_SWITCHOVER and waits for its ACK. The destination has then applied everything sent
        so far, so the downtime holds neither the pages still queued in the sockets nor more
        discard work than the guest makes in its last milliseconds (the extra channels end first:
        a page still in flight on one must not land after the discard). And from then on a
        destination whose connection breaks before its guest ran waits for a resume to say so, so
        the source can tell "never ran" (cancel cleanly) from "runs" (resume) after a break that
        follows the start command."""
        assert self.session is not None and self.balloon is not None
        for w in self.extras:
            w.send_end()
        self.extras = []
        self.balloon.before_sync()
        self.source.sync()
        self.balloon.after_sync()
        stale = self.source.take_stale_sent()
        if len(stale):
            self.main.send_discard(stale)
        self.main.send_command(wire.COMMAND_SWITCHOVER)
        self.wait_ack(wire.COMMAND_SWITCHOVER)
        # Everything sent is applied: from here on the push queues little ahead of a request.
        assert self.conn is not None
        self.conn.main.bound_queue("source", self.config.postcopy_queue_bytes)

    def say_committed(self) -> None:
        """Precopy, once the destination said its guest runs: COMMAND 4 tells it this source will
        never resume its own guest, so the destination keeps its guest even if the rest of the
        conversation (the report, its confirmation) is lost. Best effort: without it, the
        destination stops its guest unless this source resumes (docs/protocol.md, Recovery)."""
        if self.config.postcopy or not self.dest_guest_running:
            return
        try:
            self.main.send_command(wire.COMMAND_COMMITTED)
        except (LivemigError, OSError):
            pass  # the report wait sees the break

    def _teardown_connection(self) -> None:
        """Drops the broken connection: pumps stopped, return path joined, sockets closed (in
        that order, so no thread writes to a closed fd that a new connection may reuse)."""
        if self.session is not None:
            self.session.interrupt()
        if self.conn is not None:
            shutdown_channels(self.conn)
        if self.session is not None:
            self.session.join_return_path()
        if self.conn is not None:
            self.conn.close()
        self.session = None
        self.conn = None

    def pause_and_resume(self, cause: str) -> None:
        """Pauses after a break and resumes over a new connection; MigrationError when it cannot
        (deadline, a destination without this session, wrong secret) or when the destination
        says its guest never ran (then ``dest_guest_running`` is False: the caller cancels)."""
        self._teardown_connection()
        if not self.recoverable():
            raise MigrationError(cause)
        self.progress.phase("paused")
        ctl = self.control
        ctl._take_resume(0)  # a resume() from before this pause is stale
        ctl._set_paused(cause)
        deadline = time.monotonic() + self.config.reconnect_deadline_s
        address, last, delay, first = self.address, cause, 0.05, True
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MigrationError(stale_message(
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
                try:
                    self._resume_connection(address)
                except (ConnectionLost, OSError) as e:
                    self._teardown_connection()
                    last = str(e)
                    delay = min(delay * 2, 1.0)
                    continue
                except _NeverRan:
                    self._teardown_connection()
                    self.dest_guest_running = False
                    raise MigrationError(
                        f"the connection broke during switchover ({cause}) and the destination says its guest"
                        " never ran: cancelled, the source guest keeps running") from None
                except ProtocolError as e:  # refused (no such session, secret) or nonsense: final
                    self._teardown_connection()
                    raise MigrationError(stale_message(f"resume refused by {address}: {e}")) from None
                self.address = address
                self.recoveries += 1
                break
        finally:
            ctl._set_paused(None)
        self.progress.phase("postcopy")

    def _resume_connection(self, address: str) -> None:
        """One resume attempt: the handshake naming the paused session, then the destination's
        received bitmap (the C++ return path resyncs the source on it) and its word that its
        guest runs."""
        caps = wire.Capabilities(self.negotiated.capabilities, 0)
        opts = wire.WireOptions(page_size=self.result.page_size, region_bytes=self.result.region_bytes,
                                capabilities=caps, secret=self.config.secret,
                                timeout=min(self.config.timeout, _HANDSHAKE_TIMEOUT_S))
        conn = wire.connect(address, opts, resume=self.session_id)
        if conn.negotiated.capabilities != self.negotiated.capabilities:
            conn.close()
            raise ProtocolError("the resumed connection negotiated other capabilities than the session")
        conn.timeout = self.config.timeout
        conn.main.bound_queue("source", self.config.postcopy_queue_bytes)  # a resume is postcopy
        self.conn = conn
        main = conn.writer()
        urgent = conn.writer(conn.urgent) if conn.urgent is not None else None
        self.session = session = _core.SourceSession(self.source._core, main, [], urgent, conn.main.fileno(),
                                                     conn.config())
        self.main, self.extras, self.urgent = main, [], urgent
        self.writers = [main, *([urgent] if urgent is not None else [])]
        session.resync_on_received_bitmap(self.negotiated.local_fill)
        session.start_return_path()
        deadline = time.monotonic() + opts.timeout
        resynced = False
        while True:
            ev = session.wait_event(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise ConnectionLost(f"the destination did not answer the resume within {opts.timeout} s")
            kind, a, b, _data, text, _at = ev
            if kind == "received_bitmap" and b == 1:
                resynced = True
                self.requeued_pages += a
            elif kind == "ack" and a == ACK_RESUMED:
                if b == _NEVER_RAN:
                    raise _NeverRan()
                self.dest_completed = b == wire.COMMAND_COMPLETE
                if self.dest_completed:
                    return  # it holds every page: only its report is still to come
                if not resynced:
                    raise ProtocolError("the destination resumed without sending its received bitmap")
                return
            elif kind in ("failed", "end"):
                raise ConnectionLost(text or "the destination closed the resumed connection")
            elif kind == "peer_error":
                raise ProtocolError(text)

    def broken(self, e: BaseException | str) -> ChannelBroken:
        return ChannelBroken(str(e))


class DestinationRecovery:
    """The destination's side of postcopy recovery (a mixin of ``migration._DestinationRun``)."""

    conn: wire.Connection
    config: DestinationConfig
    progress: Progress
    session: _core.DestSession
    return_path: _core.FrameWriter
    mode: str
    ended: set[int]
    listener: wire.Listener | None
    wire_options: wire.WireOptions | None
    recoveries: int
    switchover_announced: bool
    source_committed: bool  #: the source saw this guest run and will never resume its own

    def pausable(self) -> bool:
        """A break now pauses: the guest runs here (postcopy) and a listener can take a resume."""
        return (self.mode == "postcopy" and self.listener is not None and self.wire_options is not None
                and self.config.resume_deadline_s > 0)

    def in_switchover(self) -> bool:
        """A postcopy switchover was announced but the guest has not run: the source cannot know
        whether its start command arrived, so it may try to resume; it must learn 'never ran'."""
        return (self.mode == "precopy" and self.switchover_announced and self.listener is not None
                and self.wire_options is not None and self.config.resume_deadline_s > 0)

    def note_event(self, ev: tuple[Any, ...]) -> None:
        """Recovery's view of an event: COMMAND_SWITCHOVER is acknowledged here."""
        if ev[0] == "command" and ev[1] == wire.COMMAND_SWITCHOVER:
            self.switchover_announced = True
            # Postcopy follows, and everything sent so far is applied (the queue is empty).
            self.conn.main.bound_queue("destination", self.config.postcopy_queue_bytes)
            self.return_path.send_ack(ACK_SWITCHOVER, 0)
        elif ev[0] == "command" and ev[1] == wire.COMMAND_COMMITTED:
            self.source_committed = True

    def _drop_connection(self) -> None:
        """Shuts the sockets down (waking a reader or a request send blocked on them), stops
        sending requests, joins the readers, then closes the sockets: no thread touches an fd
        after it is closed (a new connection may get its number)."""
        shutdown_channels(self.conn)
        self.session.detach()
        self.session.join()
        while self.session.wait_event(0) is not None:
            pass  # the old connection's leftovers: the source says it all again after resuming
        self.conn.close()
        # Nothing may write to the closed fd (a new connection may get its number): a best-effort
        # ERROR on the way out goes to memory instead.
        self.return_path = _core.FrameWriter(-1, self.conn.config())

    def _accept_resume(self, cause: str, deadline: float) -> wire.Connection:
        """Waits for the source's resume connection until ``deadline`` (time.monotonic());
        MigrationError then."""
        assert self.listener is not None and self.wire_options is not None
        last = cause
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"paused since the connection broke ({cause}); the source did not resume"
                                     f" in time (last: {last})")
            try:
                return self.listener.accept(self.wire_options, wait=left,
                                            resume=(self.conn.session, self.conn.negotiated))
            except (ConnectionLost, ProtocolError, OSError) as e:  # timeout, a stranger, a dead attempt
                last = str(e)

    def pause_and_resume(self, cause: str) -> None:
        """The connection broke in postcopy: the guest keeps running, faulting threads wait;
        resumes over the source's new connection (or raises MigrationError at the deadline)."""
        self._drop_connection()
        self.progress.phase("paused")
        deadline = time.monotonic() + self.config.resume_deadline_s
        while True:
            conn = self._accept_resume(cause, deadline)
            conn.main.bound_queue("destination", self.config.postcopy_queue_bytes)
            writer = conn.writer()
            urgent_fd = conn.urgent.fileno() if conn.urgent is not None else -1
            try:
                self.session.reattach(conn.main.fileno(), [], urgent_fd, writer)
            except LivemigError as e:  # the new connection broke already: wait for another
                cause = str(e)
                conn.close()
                continue
            break
        self.conn = conn
        self.return_path = writer
        self.ended = set()
        self.recoveries += 1
        try:
            writer.send_ack(ACK_RESUMED, wire.COMMAND_POSTCOPY_START)
        except LivemigError:
            pass  # the reader sees the break too: the next event pauses again
        self.progress.phase("postcopy")

    def refuse_resume(self, cause: str) -> None:
        """The connection broke during switchover, before the guest ran here: waits (until the
        deadline) for a source that may try to resume, tells it the guest never ran, and raises."""
        self._drop_connection()
        try:
            conn = self._accept_resume(cause, time.monotonic() + min(self.config.resume_deadline_s, _SWITCHOVER_WAIT_S))
        except MigrationError:
            raise MigrationError(f"the connection broke during switchover, before the guest ran here: {cause}")
        try:
            w = conn.writer()
            w.send_ack(ACK_RESUMED, _NEVER_RAN)
            w.send_error("the destination guest never ran; the migration is cancelled")
        except LivemigError:
            pass
        finally:
            conn.close()
        raise MigrationError(f"the connection broke during switchover, before the guest ran here ({cause});"
                             " the source was told to keep its guest")

    def _report_confirmed(self) -> bool:
        """Waits for the source's END on main: it has the report."""
        deadline = time.monotonic() + self.config.timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None or ev[0] == "peer_error" or (ev[0] == "failed" and ev[1] == 0):
                return False
            if ev[0] == "end" and ev[1] == 0:
                return True
            if ev[0] == "command" and ev[1] == wire.COMMAND_COMMITTED:
                self.source_committed = True
            # other channels closing (the source closes them all once it has the report): not the word
        return False

    def deliver_report(self, blob: bytes) -> None:
        """Sends the report and waits until the source confirms it (END on main). If it gets lost,
        waits for the source to resume and sends it again. Past the deadline: in postcopy, or once
        the source said it committed (COMMAND 4: it saw this guest run), the guest here is the
        only one and runs on; otherwise (precopy) the source may have cancelled and resumed its own
        guest, so this one must not run (MigrationError)."""
        deadline: float | None = None
        while True:
            try:
                self.return_path.send_device_state(blob)
                self.return_path.send_end()
                if self._report_confirmed():
                    return
                cause = "the source did not confirm the report"
            except LivemigError as e:
                cause = str(e)
            if self.listener is None or self.wire_options is None or self.config.resume_deadline_s <= 0:
                conn = None
            else:
                self._drop_connection()
                self.progress.phase("paused")
                if deadline is None:
                    deadline = time.monotonic() + self.config.resume_deadline_s
                try:
                    conn = self._accept_resume(cause, deadline)
                except MigrationError:
                    conn = None
            if conn is None:
                if self.mode == "postcopy" or self.source_committed:
                    return  # the guest here holds every page and is the only one
                raise MigrationError(f"the source never confirmed the end of the migration ({cause}); it may"
                                     " have cancelled and resumed its own guest, so this one is stopped")
            writer = conn.writer()
            self.source_committed = True  # a source resumes only once it saw this guest run
            try:
                self.session.reattach(conn.main.fileno(), [], -1 if conn.urgent is None else conn.urgent.fileno(),
                                      writer, resync=False)
                self.conn, self.return_path = conn, writer
                self.recoveries += 1
                writer.send_ack(ACK_RESUMED, wire.COMMAND_COMPLETE)
            except LivemigError:
                self.conn, self.return_path = conn, writer  # dropped on the next round
            self.progress.phase("complete")

    def send_resumed_ack(self, command: int) -> None:
        """ACK that the guest runs; in postcopy a broken connection is not fatal here (the reader
        reports it, and the ack is sent again after resuming)."""
        try:
            self.return_path.send_ack(ACK_RESUMED, command)
        except LivemigError:
            if not self.pausable():
                raise


_BARE_EVENTS = {
    "end": "the connection closed",
    "failed": "the connection failed",
}


def event_summary(ev: tuple[Any, ...]) -> str:
    """What a return-path event says; a bare END or failure, which carries no text, in words."""
    kind, _a, _b, _data, text, _at = ev
    return str(text or _BARE_EVENTS.get(kind, kind))


# ---- the manual resume command: a Unix control socket (``livemig migrate --control PATH``) ----


class ControlServer:
    """Where ``livemig resume PATH`` reaches a running migration: a Unix stream socket (mode
    0600) taking one line per connection, ``resume`` or ``resume ADDRESS``, and answering one
    line: ``resuming (paused: CAUSE)`` or ``not paused: kept for the next pause``."""

    def __init__(self, path: str, control: MigrationControl) -> None:
        self.path, self._control = path, control
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(4)
        except OSError:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="livemig-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(5.0)
                    line = conn.makefile("rb").readline(4096).decode(errors="replace").split()
                    if not line or line[0] != "resume" or len(line) > 2:
                        conn.sendall(b"error: expected 'resume' or 'resume ADDRESS'\n")
                        continue
                    if len(line) == 2:
                        wire.parse_address(line[1])  # ValueError: told below
                    cause = self._control.paused
                    self._control.resume(line[1] if len(line) == 2 else None)
                    answer = f"resuming (paused: {cause})" if cause else "not paused: kept for the next pause"
                    conn.sendall(answer.encode() + b"\n")
                except ValueError as e:
                    conn.sendall(f"error: {e}\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        """Stops serving and removes the socket file."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_resume(path: str, address: str | None = None, timeout: float = 5.0) -> str:
    """Asks the migration behind control socket ``path`` to resume (towards ``address``); returns
    its answer. MigrationError when it refuses; OSError when nothing listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"resume {address}\n".encode() if address else b"resume\n")
        answer = s.makefile("rb").readline(4096).decode(errors="replace").strip()
    if not answer or answer.startswith("error"):
        raise MigrationError(f"the migration at {path} refused: {answer or 'no answer'}")
    return answer


__all__ = ["ControlServer", "MigrationControl", "request_resume"]
