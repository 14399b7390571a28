"""The listener's gate: how a destination takes connections without a stranger holding it up
(docs/protocol.md, "The listener under attack").

Every connection the listening socket has is taken at once and waits, non-blocking and costing one
file descriptor, until its first handshake message (HELLO) is in the kernel's buffer; a peer that
sends part of one and stalls, or connects and closes, never gets more. A whole HELLO gets a
handshake thread (at most ``max_handshakes`` at once, ``max_handshakes_per_peer`` per address),
which authenticates it. Everything before authentication must finish within the short
``handshake_s`` deadline. A main (or resume) channel that authenticates starts a session; its
urgent and page channels join it only when they name it and authenticate too (the session id is
the source's 128-bit random value, inside the authenticated transcript), so a stray or forged
connection is refused alone and never breaks the session. Refused peers are counted and logged
rate-limited: the first in full, then one summary line per interval."""

from __future__ import annotations

import errno
import queue
import resource
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from livemig.errors import ConnectionLost, LivemigError
from livemig.wire.handshake import (
    _HELLO,
    _HELLO_BODY,
    _KINDS,
    _MAX_BODY,
    _PREFIX,
    MAGIC,
    HandshakeResult,
)


def _default_pending() -> int:
    """Connections waiting for their HELLO: at most a quarter of this process's descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, (soft if soft > 0 else 1024) // 4))


@dataclass(frozen=True)
class GateLimits:
    """How much unauthenticated peers may take from a listener."""

    handshake_s: float = 3.0  #: pre-authentication deadline: from the accept to the end of the handshake
    max_pending: int = field(default_factory=_default_pending)  #: connections not yet authenticated
    max_pending_per_peer: int = 0  #: of those, from one address (0: a quarter of max_pending)
    max_handshakes: int = 32  #: handshakes running at once (each a thread)
    max_handshakes_per_peer: int = 4  #: of those, for one address
    log_interval_s: float = 10.0  #: refusals after the first are summed up once per interval (0: each logged)

    def __post_init__(self) -> None:
        if not self.handshake_s > 0:
            raise ValueError(f"the handshake deadline must be positive, got {self.handshake_s}")
        for name in ("max_pending", "max_handshakes", "max_handshakes_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_pending_per_peer < 0 or self.log_interval_s < 0:
            raise ValueError("max_pending_per_peer and log_interval_s must not be negative")

    @property
    def pending_per_peer(self) -> int:
        return self.max_pending_per_peer or max(1, self.max_pending // 4)


DEFAULT_GATE = GateLimits()


class Refusals:
    """Refused connections: counted, and told to ``log`` rate-limited (the first refusal after a
    quiet interval in full, then one summary line per ``interval`` s)."""

    def __init__(self, log: Callable[[str], None] | None, interval: float) -> None:
        self.log, self.interval = log, interval
        self.total = 0  #: refused since the listener opened
        self.by_cause: Counter[str] = Counter()  #: ... by cause (stalled, closed, limit, refused)
        self._held = 0
        self._held_causes: Counter[str] = Counter()
        self._held_peers: set[str] = set()
        self._last = ""
        self._window_end = 0.0  #: until then, refusals are summed up (0: a quiet period)

    def refuse(self, peer: str, cause: str, reason: str) -> None:
        self.total += 1
        self.by_cause[cause] += 1
        now = time.monotonic()
        if self.interval <= 0 or (self._window_end == 0.0):
            self._say(f"refused {peer}: {reason}")
            if self.interval > 0:
                self._window_end = now + self.interval
            return
        self._held += 1
        self._held_causes[cause] += 1
        self._held_peers.add(peer.rsplit(":", 1)[0])
        self._last = f"{peer}: {reason}"

    def flush(self, force: bool = False) -> float | None:
        """Writes the summary when its interval ended (``force``: now); returns when the next is due."""
        if self._window_end == 0.0:
            return None
        now = time.monotonic()
        if now < self._window_end and not force:
            return self._window_end
        if self._held:
            causes = ", ".join(f"{n:,} {_CAUSES.get(c, c)}" for c, n in self._held_causes.most_common())
            self._say(f"refused {self._held:,} more connections from {len(self._held_peers):,} peers in the last"
                      f" {self.interval:g} s: {causes}; last: {self._last}")
            self._held, self._held_causes, self._held_peers = 0, Counter(), set()
            self._window_end = now + self.interval
            return self._window_end
        self._window_end = 0.0
        return None

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log(text)


_CAUSES = {"closed": "closed before their HELLO", "stalled": "past the handshake deadline",
           "limit": "over the connection limits", "refused": "refused by the handshake"}


class _Peer:
    """An accepted connection that has not authenticated yet."""

    __slots__ = ("addr", "deadline", "hello", "key", "kind", "length", "seen", "session", "sock")

    def __init__(self, sock: socket.socket, addr: str, key: str, deadline: float) -> None:
        self.sock, self.addr, self.key, self.deadline = sock, addr, key, deadline
        self.seen = 0  #: bytes of it buffered when last looked at
        self.length = 0  #: the HELLO body length its prefix announced
        self.hello = False  #: its whole HELLO is buffered (or it is malformed: the handshake says why)
        self.kind = ""
        self.session = b""


@dataclass
class Session:
    """An authenticated main (or resume) channel and the channels that joined it."""

    main: HandshakeResult
    sock: socket.socket
    deadline: float  #: its other channels must have joined by then
    urgent: tuple[HandshakeResult, socket.socket] | None = None
    pages: dict[int, tuple[HandshakeResult, socket.socket]] = field(default_factory=dict)

    def complete(self) -> bool:
        n = self.main.negotiated
        return (self.urgent is not None or not n.urgent_channel) and len(self.pages) >= n.extra_channels

    def sockets(self) -> list[socket.socket]:
        return [self.sock, *([self.urgent[1]] if self.urgent else []), *(s for _, s in self.pages.values())]


#: A handshake on an accepted socket: (socket, the session it claims to join or None, seconds left).
Handshake = Callable[[socket.socket, "Session | None", float], HandshakeResult]


def _peer_of(sock: socket.socket, addr: object) -> tuple[str, str]:
    """(printable address, the key its limits count under)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple):
        host = str(addr[0])
        text = f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
        return text, host
    return "a local peer", ""  # Unix sockets: one peer, no per-peer limit


def _peek_hello(data: bytes) -> tuple[bool, str, bytes]:
    """(ready for the handshake, channel kind, session id) from the first bytes of a connection:
    ready when a whole HELLO is there, or when what is there is already wrong."""
    if len(data) < _PREFIX.size:
        n = min(len(data), len(MAGIC))
        return data[:n] != MAGIC[:n], "", b""  # (a wrong magic needs no more bytes to be refused)
    magic, _version, mtype, _reserved, length = _PREFIX.unpack_from(data)
    if magic != MAGIC or length > _MAX_BODY or mtype != _HELLO:
        return True, "", b""
    if len(data) < _PREFIX.size + length:
        return False, "", b""
    if length < _HELLO_BODY.size:
        return True, "", b""
    fields = _HELLO_BODY.unpack_from(data, _PREFIX.size)
    return True, _KINDS.get(fields[1], ""), fields[9]


class Gate:
    """The accepting half of a Listener: see the module's docstring. One thread calls
    :meth:`accept` at a time; handshakes run in threads of their own."""

    def __init__(self, lsock: socket.socket, limits: GateLimits, log: Callable[[str], None] | None,
                 name: str) -> None:
        self.limits, self.name = limits, name
        self.refusals = Refusals(log, limits.log_interval_s)
        self._lsock = lsock
        lsock.setblocking(False)
        # Level-triggered for the listening socket and the wake-up pair; edge-triggered for peers,
        # whose bytes stay buffered while we only peek at them (a new event: new bytes, or a close).
        self._ep = select.epoll()
        self._ep.register(lsock.fileno(), select.EPOLLIN)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ep.register(self._wake_r.fileno(), select.EPOLLIN)
        self._by_fd: dict[int, _Peer] = {}
        self._waiting: dict[socket.socket, _Peer] = {}  #: reading their HELLO
        self._ready: list[_Peer] = []  #: HELLO buffered, waiting for a handshake slot
        self._per_peer: Counter[str] = Counter()  #: connections not yet authenticated, by address
        self._running: Counter[str] = Counter()  #: handshakes running, by address
        self._starting: Counter[bytes] = Counter()  #: main and resume handshakes running, by session id
        self._done: queue.SimpleQueue[tuple[_Peer, HandshakeResult | BaseException]] = queue.SimpleQueue()
        self._sessions: dict[bytes, Session] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._last_error: BaseException | None = None
        self._preauth = limits.handshake_s

    # ---- the loop ----
    def accept(self, handshake: Handshake, wait: float | None, channels_s: float, *,
               resume: bytes | None = None, strict: bool = False, preauth_s: float | None = None) -> Session:
        """Runs until a session has all its channels and returns it. ``wait``: give up after that
        many seconds without one (None: never) with ConnectionLost. ``channels_s``: how long an
        authenticated session's other channels may take to join. ``resume``: only a resume of that
        session is taken. ``strict``: the first refused connection's error is raised instead.
        ``preauth_s``: the pre-authentication deadline if shorter than the limits'."""
        self._handshake, self._channels_s, self._resume = handshake, channels_s, resume
        self._preauth = min(self.limits.handshake_s, preauth_s or self.limits.handshake_s)
        self._last_error = None
        deadline = None if wait is None else time.monotonic() + wait
        first = True
        while True:
            now = time.monotonic()
            for sid, s in list(self._sessions.items()):
                if s.complete():
                    del self._sessions[sid]
                    return s
                if now > s.deadline:
                    del self._sessions[sid]
                    for sock in s.sockets():
                        sock.close()
                    raise ConnectionLost(f"the source's other channels did not connect within {channels_s:g} s")
            self._expire(now, first)
            first = False
            if strict and self._last_error is not None:
                raise self._last_error
            if deadline is not None and now >= deadline:
                raise ConnectionLost(self._nobody(wait))
            self._dispatch()
            due = [p.deadline for p in (*self._waiting.values(), *self._ready)]
            due += [s.deadline for s in self._sessions.values()]
            if (flush := self.refusals.flush()) is not None:
                due.append(flush)
            if deadline is not None:
                due.append(deadline)
            timeout = max(0.0, min(due) - now) if due else None
            for fd, ev in self._ep.poll(-1 if timeout is None else timeout):
                if fd == self._lsock.fileno():
                    self._take()
                elif fd == self._wake_r.fileno():
                    self._drain_wake()
                elif (p := self._by_fd.get(fd)) is not None:
                    self._peek(p, bool(ev & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)))
            self._collect()
            self._dispatch()  # (a HELLO that just came must not wait for the next event)

    def _nobody(self, wait: float | None) -> str:
        text = f"no source connected to {self.name} within {wait} s"
        if self._last_error is not None:
            text += f" (connections were refused; the last: {self._last_error})"
        return text

    def _take(self) -> None:
        """Accepts what the listening socket has (a bounded batch, so the rest is served too)."""
        for _ in range(256):
            try:
                sock, addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.refusals.refuse("a peer", "limit", f"cannot accept: {e.strerror}")
                    return
                continue  # ECONNABORTED and the like: that peer is gone
            text, key = _peer_of(sock, addr)
            total = len(self._waiting) + len(self._ready)
            if total >= self.limits.max_pending:
                self._drop(sock, text, "limit", f"{total} connections are already waiting to authenticate")
                continue
            if key and self._per_peer[key] >= self.limits.pending_per_peer:
                self._drop(sock, text, "limit", f"{self._per_peer[key]} connections from {key} are already"
                                                " waiting to authenticate")
                continue
            sock.setblocking(False)
            p = _Peer(sock, text, key, time.monotonic() + self._preauth)
            self._per_peer[key] += 1
            self._waiting[sock] = p
            self._by_fd[sock.fileno()] = p
            self._ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def _peek(self, p: _Peer, hung_up: bool) -> None:
        """New bytes (or a close) on ``p``: a whole HELLO, or anything already wrong, or a peer that
        closed after part of one, goes to a handshake (which says exactly what was wrong)."""
        try:
            data = p.sock.recv(_PREFIX.size + _MAX_BODY, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as e:
            self._forget(p)
            self._refused(p, "closed", ConnectionLost(f"handshake: connection lost before HELLO: {e.strerror or e}"))
            return
        if data is None and not hung_up:
            return
        if not data:
            self._forget(p)
            self._refused(p, "closed", ConnectionLost("handshake: the peer closed the connection while we waited"
                                                      " for HELLO (got 0 of 16 bytes)"))
            return
        p.seen = len(data)
        ready, p.kind, p.session = _peek_hello(data)
        if len(data) >= _PREFIX.size:
            p.length = _PREFIX.unpack_from(data)[4]
        if ready or hung_up:
            self._unwatch(p)
            p.hello = True
            self._ready.append(p)

    def _expire(self, now: float, first: bool) -> None:
        """Closes who missed the handshake deadline (a HELLO that came while nobody accepted is
        still served, once: ``first``)."""
        for p in [p for p in self._waiting.values() if p.deadline <= now]:
            self._forget(p)
            got, want = p.seen, _PREFIX.size
            if got >= _PREFIX.size:
                got, want = got - _PREFIX.size, max(p.length, got - _PREFIX.size + 1)
            self._refused(p, "stalled", ConnectionLost(
                f"handshake: the peer was silent or too slow: no whole HELLO within the handshake's"
                f" {self._preauth} s (got {got} of {want} bytes)"))
        if not first:
            for p in [p for p in self._ready if p.deadline <= now]:
                self._ready.remove(p)
                self._per_peer[p.key] -= 1
                self._refused(p, "stalled", ConnectionLost(
                    "handshake: no handshake slot freed up within the deadline (too many at once)"))

    def _dispatch(self) -> None:
        """Starts handshakes for buffered HELLOs while slots are free."""
        for p in list(self._ready):
            if sum(self._running.values()) >= self.limits.max_handshakes:
                return
            if p.key and self._running[p.key] >= self.limits.max_handshakes_per_peer:
                continue
            owner = self._sessions.get(p.session) if p.kind in ("urgent", "pages") else None
            if p.kind in ("urgent", "pages") and owner is None and self._starting[p.session]:
                continue  # its main channel's handshake is still finishing: it joins after
            if self._resume is not None and p.kind == "resume" and p.session != self._resume:
                owner = None  # (refused by the handshake: not the paused session)
            self._ready.remove(p)
            self._running[p.key] += 1
            if p.kind in ("main", "resume"):
                self._starting[p.session] += 1
            left = max(p.deadline - time.monotonic(), 0.05)
            threading.Thread(target=self._work, args=(p, owner, left), name="livemig-handshake", daemon=True).start()

    def _work(self, p: _Peer, owner: Session | None, left: float) -> None:
        try:
            p.sock.setblocking(True)
            out: HandshakeResult | BaseException = self._handshake(p.sock, owner, left)
        except BaseException as e:  # noqa: BLE001 (the accepting thread decides what it means)
            out = e
        with self._lock:
            if self._closed:
                p.sock.close()
                return
            self._done.put((p, out))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _collect(self) -> None:
        """Takes the finished handshakes: sessions start, channels join them, refusals are told."""
        while True:
            try:
                p, out = self._done.get_nowait()
            except queue.Empty:
                return
            self._running[p.key] -= 1
            self._per_peer[p.key] -= 1
            if p.kind in ("main", "resume"):
                self._starting[p.session] -= 1
                if not self._starting[p.session]:
                    del self._starting[p.session]
            if isinstance(out, BaseException):
                p.sock.close()
                if not isinstance(out, (LivemigError, OSError)):
                    raise out
                self._refused(p, "refused", out)
                continue
            self._join(p, out)

    def _join(self, p: _Peer, r: HandshakeResult) -> None:
        if r.kind in ("main", "resume"):
            if r.session in self._sessions:
                p.sock.close()
                self.refusals.refuse(p.addr, "refused", "a second main channel for one session")
                return
            self._sessions[r.session] = Session(r, p.sock, time.monotonic() + self._channels_s)
            return
        s = self._sessions.get(r.session)
        if s is None or (r.kind == "urgent" and s.urgent is not None) or (r.kind == "pages" and r.index in s.pages):
            p.sock.close()
            self.refusals.refuse(p.addr, "refused", f"{r.kind} channel {r.index} not wanted by its session"
                                                    " (a duplicate, or its session ended)")
            return
        if r.kind == "urgent":
            s.urgent = (r, p.sock)
        else:
            s.pages[r.index] = (r, p.sock)

    def _forget(self, p: _Peer) -> None:
        self._unwatch(p)
        self._per_peer[p.key] -= 1

    def _unwatch(self, p: _Peer) -> None:
        self._ep.unregister(p.sock.fileno())
        del self._by_fd[p.sock.fileno()]
        del self._waiting[p.sock]

    def _drop(self, sock: socket.socket, addr: str, cause: str, reason: str) -> None:
        try:  # a reset: nothing lingers here
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        sock.close()
        self.refusals.refuse(addr, cause, reason)

    def _refused(self, p: _Peer, cause: str, e: BaseException) -> None:
        p.sock.close()
        self._last_error = e
        self.refusals.refuse(p.addr, cause, str(e))

    def close(self) -> None:
        """Closes every connection not handed out (and the gate's own descriptors)."""
        with self._lock:
            self._closed = True
        self.refusals.flush(force=True)
        for p in [*self._waiting.values(), *self._ready]:
            p.sock.close()
        for s in self._sessions.values():
            for sock in s.sockets():
                sock.close()
        while True:
            try:
                p, _ = self._done.get_nowait()
            except queue.Empty:
                break
            p.sock.close()
        self._waiting.clear()
        self._ready.clear()
        self._sessions.clear()
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()


__all__ = ["DEFAULT_GATE", "Gate", "GateLimits", "Refusals", "Session"]
