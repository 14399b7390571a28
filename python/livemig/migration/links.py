"""A connection's worth of each side's wire state (:class:`SourceLink`, :class:`DestLink`): what
recovery tears down and replaces whole when a channel breaks, and the one place that words a
session event for a person."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from livemig import _core, wire
from livemig.protocol import Command, EventKind


def shutdown_channels(conn: wire.Connection) -> None:
    """Shuts every socket of ``conn`` down (waking threads blocked on them) without closing."""
    for ch in conn.channels():
        try:
            ch.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_BARE_EVENTS = {
    EventKind.END: "the connection closed",
    EventKind.FAILED: "the connection failed",
}


def event_summary(ev: _core.SessionEvent) -> str:
    """What a session event says; a bare END or failure, which carries no text, in words."""
    return str(ev.text or _BARE_EVENTS.get(ev.kind, ev.kind.name.lower()))


@dataclass
class SourceLink:
    """The source's connection, its frame writers and its session (pumps and return path)."""

    conn: wire.Connection
    session: _core.SourceSession
    main: _core.FrameWriter
    extras: list[_core.FrameWriter]
    urgent: _core.FrameWriter | None

    @classmethod
    def open(cls, conn: wire.Connection, source: _core.Source, *, extras: bool = True,
             resumed: bool = False) -> SourceLink:
        """Writers for every channel of ``conn`` and a session over ``source`` (not started);
        requests are read from the urgent channel when negotiated (never on a ``resumed``
        connection: there they follow the received bitmap on main)."""
        main = conn.writer()
        extra = [conn.writer(ch) for ch in conn.pages] if extras else []
        urgent = conn.writer(conn.urgent) if conn.urgent is not None else None
        session = _core.SourceSession(source, main, extra, urgent, conn.main.fileno(), conn.config())
        conn.read_through(session)  # the return path, through main's TLS session when encrypted
        if conn.urgent is not None and conn.negotiated.urgent_requests and not resumed:
            session.read_requests_on(conn.urgent.fileno())
        return cls(conn, session, main, extra, urgent)

    def round_starts(self, index: int, postcopy_after: int | None) -> None:
        """Precopy round ``index`` starts: when postcopy follows it (``postcopy_after`` rounds;
        None: no postcopy), COMMAND 5 has the destination bound its main channel's queue now, so
        the window it advertised for precopy is spent by the time postcopy starts (postcopy-next)."""
        if postcopy_after is not None and index == postcopy_after - 1 and self.conn.negotiated.postcopy_next:
            self.main.send_command(Command.POSTCOPY_NEXT)

    def end_extras(self) -> None:
        """END on every extra page channel (they carry nothing after this: later passes use main)."""
        if self.extras:
            self.extras = []
            self.session.end_extras()

    def close_gracefully(self, timeout: float) -> None:
        """After a last word (ERROR) to the destination: ends every channel's sending side (a FIN
        after what is queued, where a close could reset the connection and drop it) and waits, up
        to ``timeout``, for the destination to close the return path (main's): it read everything."""
        for ch in self.conn.channels():
            try:
                ch.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None or (ev.kind in (EventKind.END, EventKind.FAILED) and ev.channel == 0):
                return  # (the urgent channel's end, where requests come back, says nothing of main)

    def await_end(self) -> None:
        """After the destination's report: it ends the return path next, and closing first would
        make its END fail. A destination that does not end it within a second is not waited for."""
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            ev = self.session.wait_event(left)
            if ev is None or ev.kind in (EventKind.END, EventKind.FAILED, EventKind.PEER_ERROR):
                return

    def teardown(self) -> None:
        """Pumps stopped, sockets shut down, return path joined, sockets closed (in that order, so
        no thread writes to a closed fd that a new connection may reuse)."""
        self.session.interrupt()
        shutdown_channels(self.conn)
        self.session.join_return_path()
        self.conn.close()


@dataclass
class DestLink:
    """The destination's connection and its return-path writer (the main socket's other direction)."""

    conn: wire.Connection
    return_path: _core.FrameWriter
    ended: set[int] = field(default_factory=set)  #: channels that sent END

    #: the urgent channel's writer when requests travel there (urgent-requests), else None
    request_path: _core.FrameWriter | None = None

    @classmethod
    def of(cls, conn: wire.Connection) -> DestLink:
        return cls(conn, conn.writer())

    def route_requests(self, session: _core.DestSession) -> None:
        """Requests on the urgent channel when negotiated (a first connection's session, before
        it starts)."""
        if self.conn.urgent is not None and self.conn.negotiated.urgent_requests:
            self.request_path = self.conn.writer(self.conn.urgent)
            session.send_requests_on(self.request_path)


__all__ = ["DestLink", "SourceLink", "event_summary", "shutdown_channels"]
