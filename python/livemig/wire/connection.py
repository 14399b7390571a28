"""Connections: a migration's channels on one side, the destination's listener and the source's
connect (docs/protocol.md, "Transports and channels"). Each channel is a stream socket that starts
with the handshake; after it, frames and pages move in C++ (:class:`livemig._core.FrameWriter`,
:class:`livemig._core.FrameReader`) with the GIL released, through the channel's TLS 1.3 session
when the connection is encrypted. Nothing here runs per page."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from livemig import _core
from livemig.errors import AuthenticationError, ConnectionLost, ProtocolError
from livemig.wire.address import Address, is_loopback, parse_address, socket_for
from livemig.wire.capabilities import Negotiated
from livemig.wire.gate import DEFAULT_GATE, Gate, GateLimits, Session
from livemig.wire.handshake import (
    SECRET_ENV,
    ChannelKind,
    HandshakeResult,
    Role,
    WireOptions,
    handshake_destination,
    handshake_source,
)
from livemig.wire.tls import TlsKeys, TlsReport, TlsRole, side_offer

if TYPE_CHECKING:
    from typing_extensions import Self
#: Postcopy: the most bytes of the main channel's stream that each side lets its kernel queue
#: (see Channel.bound_queue). A page the background push already took is not sent again on
#: request (docs/design.md rule 2), so a fault on it waits for everything queued ahead of it: at
#: about 1 GB/s, a quarter of a millisecond here against several behind the autotuned buffers.
POSTCOPY_QUEUE_BYTES = 256 << 10
#: The smallest bound that keeps the push's bandwidth: with a receive buffer of 128 KiB the push
#: under faults fell to a third here, and at 64 KiB to 2% (TCP stalls on a window that small).
MIN_POSTCOPY_QUEUE_BYTES = 256 << 10


#: The largest bound accepted: beyond it the kernel's own limits (net.core.rmem_max) decide anyway.
MAX_POSTCOPY_QUEUE_BYTES = 256 << 20


def check_queue_bytes(nbytes: int) -> int:
    """``nbytes`` when it is a usable postcopy queue bound (0: none); ValueError otherwise."""
    if nbytes != 0 and nbytes < MIN_POSTCOPY_QUEUE_BYTES:
        raise ValueError(f"a postcopy queue bound of {nbytes} bytes is below the minimum of"
                         f" {MIN_POSTCOPY_QUEUE_BYTES >> 10} KiB, where TCP throughput collapses;"
                         " use 0 for no bound")
    if nbytes > MAX_POSTCOPY_QUEUE_BYTES:
        raise ValueError(f"a postcopy queue bound of {nbytes} bytes is past the maximum of"
                         f" {MAX_POSTCOPY_QUEUE_BYTES >> 20} MiB; use 0 for the kernel's own buffers")
    return nbytes


_SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in Python's socket module


def _lock_receive_buffer(sock: socket.socket, at_least: int) -> None:
    """Keeps a TCP socket's receive buffer from now on at its present size, or at ``at_least``
    bytes of the kernel's accounting when that is more: receive autotuning would otherwise grow it
    and raise the window clamp along with it, and a buffer barely the window's size overflows when
    segments take more memory than the kernel guessed (RcvPruned). Never smaller (see
    Channel.bound_queue); left autotuned when this process may not set the size (net.core.rmem_max
    below it, and no CAP_NET_ADMIN for SO_RCVBUFFORCE)."""
    cur = max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), at_least)  # the kernel holds 2x asked
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, cur // 2)
    except PermissionError:
        try:
            rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
        except (OSError, ValueError):
            return
        if 2 * rmem_max >= cur:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cur // 2)


@dataclass
class Channel:
    """One stream socket of a connection, after its handshake (blocking; C++ sets its timeouts).
    ``tls``: its TLS 1.3 session on an encrypted connection; the socket's bytes then go only
    through it (writer, reader, the sessions' readers), never to the socket directly."""

    kind: ChannelKind
    index: int
    sock: socket.socket
    tls: _core.TlsChannel | None = None

    def fileno(self) -> int:
        """The socket's fd, for FrameWriter / FrameReader (which do not own it)."""
        return self.sock.fileno()

    def bound_queue(self, role: Role, nbytes: int) -> None:
        """Keeps this channel's stream queued in the kernel, on this side, to about ``nbytes``:
        a TCP receiver clamps the window it advertises (TCP_WINDOW_CLAMP: a link whose
        bandwidth-delay product is larger wants more) and a TCP sender holds back what it has
        not sent beyond a quarter of it (TCP_NOTSENT_LOWAT); a Unix-socket sender caps its send
        buffer, which holds what the peer has not read (never raising it). 0 leaves the kernel's
        own buffers. On an encrypted channel the TLS record layer's batches (what it seals before a
        send, what it reads ahead) shrink to a quarter of it too. The receiver never shrinks its
        receive buffer: the peer may already send into the window it was told about, and a buffer
        made smaller than that window drops what arrives (TcpExtRcvPruned, TCPRcvQDrop), which the
        peer retransmits only after its 200 ms minimum timeout. The clamp never takes back a window
        already advertised; it applies as the queue drains. Call while the stream is quiet: the
        bound applies to what is queued after. Best effort: on a socket that already broke it does
        nothing (its next read or write says so)."""
        if nbytes <= 0:
            return
        if self.tls is not None:  # its record layer's batches queue too: a quarter each way
            self.tls.bound_batches(max(nbytes // 4, 16 << 10))
        sock = self.sock
        try:
            # SO_RCVBUF and SO_SNDBUF: the kernel doubles the value asked for (bookkeeping).
            if sock.family == socket.AF_UNIX:
                if role == "source" and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > nbytes:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes // 2)
            elif role == "source":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, max(nbytes // 4, 1))
            else:
                _lock_receive_buffer(sock, 4 * nbytes)  # room for the window and the kernel's overhead
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, nbytes)
        except OSError:
            pass

    def close(self) -> None:
        """Shuts the socket down (waking any thread blocked on it), then closes it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class Connection:
    """A migration's channels on one side, and what the handshake settled."""

    role: Role
    page_size: int
    region_bytes: int
    negotiated: Negotiated
    session: bytes
    main: Channel
    urgent: Channel | None = None
    pages: list[Channel] = field(default_factory=list)
    timeout: float = 30.0
    _writers: dict[tuple[str, int], _core.FrameWriter] = field(default_factory=dict, repr=False)
    _readers: dict[tuple[str, int], _core.FrameReader] = field(default_factory=dict, repr=False)

    @property
    def region_pages(self) -> int:
        return self.region_bytes // self.page_size

    def config(self, **kw: object) -> _core.WireConfig:
        """The frame-level config for this connection (extra keywords: WireConfig's limits)."""
        args: dict[str, object] = {"timeout": self.timeout, **kw}
        return _core.WireConfig(
            page_size=self.page_size,
            region_pages=self.region_pages,
            checksums=self.negotiated.checksums,
            **args,  # type: ignore[arg-type]
        )

    def channels(self) -> list[Channel]:
        """Every channel: main, urgent (if any), then the extra page channels."""
        return [self.main, *([self.urgent] if self.urgent else []), *self.pages]

    def unread_bytes(self) -> int:
        """Bytes the peer sent that this side has not read yet, over every channel (FIONREAD)."""
        total = 0
        for ch in self.channels():
            try:
                total += struct.unpack("i", fcntl.ioctl(ch.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            except OSError:  # closed meanwhile
                pass
        return total

    def writer(self, channel: Channel | None = None) -> _core.FrameWriter:
        """The FrameWriter of `channel` (default main; on the destination that is the return path),
        through its TLS session when it has one. One per channel, made on first use; thread-safe."""
        ch = channel or self.main
        key = (ch.kind, ch.index)
        if key not in self._writers:
            cfg = self.config()
            self._writers[key] = ch.tls.writer(cfg) if ch.tls is not None else _core.FrameWriter(ch.fileno(), cfg)
        return self._writers[key]

    def reader(self, channel: Channel | None = None) -> _core.FrameReader:
        """The FrameReader of `channel` (default main) for frames coming from the peer. One per
        channel for the channel's life (it reads ahead, so a second reader could miss bytes); use
        it from one thread at a time."""
        ch = channel or self.main
        key = (ch.kind, ch.index)
        if key not in self._readers:
            direction = "to_destination" if self.role == "destination" else "to_source"
            cfg = self.config()
            self._readers[key] = (ch.tls.reader(cfg, direction) if ch.tls is not None
                                  else _core.FrameReader(ch.fileno(), cfg, direction))
        return self._readers[key]

    @property
    def encrypted(self) -> bool:
        """Every channel runs TLS 1.3 (``negotiated.encryption`` says how it is keyed)."""
        return self.main.tls is not None

    def read_through(self, session: _core.SourceSession | _core.DestSession) -> None:
        """Makes ``session``'s reader threads read this connection's sockets through their TLS
        sessions (nothing for a plaintext connection). Before its readers start."""
        channels = [ch.tls for ch in self.channels() if ch.tls is not None]
        if channels:
            _core.read_through_tls(session, channels)

    def tls_report(self) -> TlsReport:
        """What ran on this connection's channels (whether TLS ran, how, and its cost)."""
        channels = [ch.tls for ch in self.channels() if ch.tls is not None]
        return TlsReport.of(self.negotiated.encryption or "", channels, self.main.sock.family == socket.AF_UNIX)

    def close(self) -> None:
        """Shuts down and closes every channel."""
        for ch in self.channels():
            ch.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener:
    """The destination's listening socket (TCP v4/v6 or Unix). Port 0 picks a free port.

    Bound beyond loopback, it accepts only with keys (``WireOptions.secret`` or certificates in
    ``WireOptions.tls``), and then requires TLS 1.3 from every source beyond loopback:
    :meth:`accept` without keys raises AuthenticationError before it takes a connection, unless
    the listener was made ``insecure=True`` (anyone who can reach the port may then migrate in,
    unencrypted unless the source asks for encryption).

    Connections are taken by its gate (wire/gate.py): many at once, unauthenticated peers bounded
    by ``limits`` and refused alone (counted in :attr:`refusals`, told to ``log`` rate-limited),
    so a stranger never delays or fails a real source. ``strict``: :meth:`accept` raises the first
    refused connection's error instead (tools and tests that talk to one known peer)."""

    def __init__(self, address: str | Address, backlog: int = socket.SOMAXCONN, *, insecure: bool = False,
                 limits: GateLimits = DEFAULT_GATE, log: Callable[[str], None] | None = None,
                 strict: bool = False) -> None:
        self.insecure, self.strict = insecure, strict
        addr = parse_address(address) if isinstance(address, str) else address
        self._sock, sockaddr = socket_for(addr)
        if addr.family == "tcp":
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(sockaddr)  # type: ignore[arg-type]
        self._sock.listen(backlog)
        self._unix_path = addr.path if addr.family == "unix" else None
        if addr.family == "unix":
            self.address = addr
        else:
            host, port = self._sock.getsockname()[:2]
            self.address = Address("tcp", host=host, port=port)
        self._gate = Gate(self._sock, limits, log, str(self.address))
        self.refusals = self._gate.refusals  #: the connections refused so far

    def accept(
        self,
        opts: WireOptions,
        wait: float | None | Literal["timeout"] = "timeout",
        *,
        resume: tuple[bytes, Negotiated] | None = None,
    ) -> Connection:
        """Accepts a source's main channel and then its urgent and extra page channels, each
        with its handshake; a connection that fails its handshake is refused and dropped alone
        (a wrong secret never gets past this). ``wait``: how long to wait for a source (None:
        forever; default: ``opts.timeout``); ConnectionLost then. ``resume``: (session id,
        negotiated) of a paused session: only its resume connection is accepted. Beyond loopback
        without keys (and not ``insecure``): AuthenticationError, before any connection is taken."""
        if opts.secret is None and not opts.tls.x509 and not self.insecure and not is_loopback(self.address):
            raise AuthenticationError(
                f"refusing to accept sources on {self.address} beyond loopback without a shared"
                f" secret or certificates: set one (WireOptions.secret, ${SECRET_ENV}, or"
                " WireOptions.tls), or make the listener insecure=True to accept anyone"
            )
        keys = TlsKeys(opts.secret, opts.tls, "server", opts.tls.peer_name or "")
        keys.preload()  # while no source is here yet
        paused = dict([resume]) if resume else None
        channel_keys: dict[bytes, TlsKeys | None] = {}
        lock = threading.Lock()

        def keys_of(owner: Session) -> TlsKeys | None:
            """An x509 session's urgent and page channels are keyed from its main channel's TLS session."""
            r = owner.main
            if r.negotiated.encryption != "x509" or r.tls is None:
                return None
            with lock:  # (handshakes run in parallel; the keys are exported once per session)
                if r.session not in channel_keys:
                    channel_keys[r.session] = TlsKeys.for_channels(r.tls, r.session, opts.tls, "server")
                return channel_keys[r.session]

        def handshake(sock: socket.socket, owner: Session | None, left: float) -> HandshakeResult:
            opts.keepalive.apply(sock)
            brief = replace(opts, timeout=round(min(left, opts.timeout), 3))  # the pre-authentication deadline
            if owner is None:
                return handshake_destination(sock, brief, paused=paused, keys=keys, insecure=self.insecure)
            return handshake_destination(sock, brief, {owner.main.session: owner.main.negotiated}, keys=keys,
                                         channel_keys=keys_of(owner), insecure=self.insecure)

        s = self._gate.accept(handshake, opts.timeout if wait == "timeout" else wait, opts.timeout,
                              resume=resume[0] if resume else None, strict=self.strict, preauth_s=opts.timeout)
        conn = Connection("destination", s.main.page_size, s.main.region_bytes, s.main.negotiated, s.main.session,
                          Channel("main", 0, s.sock, s.main.tls), timeout=opts.timeout)
        if s.urgent is not None:
            conn.urgent = Channel("urgent", 0, s.urgent[1], s.urgent[0].tls)
        conn.pages = [Channel("pages", i, s.pages[i][1], s.pages[i][0].tls) for i in sorted(s.pages)]
        for ch in conn.channels():
            ch.sock.setblocking(True)
        return conn

    def close(self) -> None:
        """Stops listening (and removes a Unix socket's file); connections not handed out are closed."""
        self._gate.close()
        self._sock.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dial(addr: Address, opts: WireOptions) -> socket.socket:
    timeout = opts.timeout
    sock, sockaddr = socket_for(addr)
    sock.settimeout(timeout)
    try:
        opts.keepalive.apply(sock)
        sock.connect(sockaddr)  # type: ignore[arg-type]
    except TimeoutError:
        sock.close()
        raise ConnectionLost(f"connect to {addr}: timeout after {timeout} s") from None
    except OSError as e:
        sock.close()
        raise ConnectionLost(f"connect to {addr}: {e.strerror or e}") from None
    return sock


def _channel_keys(conn: Connection, opts: WireOptions, role: TlsRole) -> TlsKeys | None:
    """The keys of an x509 session's urgent and page channels (exported from main), else None."""
    if conn.negotiated.encryption != "x509" or conn.main.tls is None:
        return None
    return TlsKeys.for_channels(conn.main.tls, conn.session, opts.tls, role)


def _check_keys(addr: Address, opts: WireOptions) -> None:
    """Encryption is required toward ``addr`` but this side has no keys: AuthenticationError before
    anything is sent."""
    offer = side_offer("tls" in opts.capabilities.names, opts.encrypt, opts.secret, opts.tls, is_loopback(addr))
    if offer.required and not offer.keyings:
        why = "was asked for" if opts.encrypt else f"is on by default toward {addr}, beyond loopback,"
        raise AuthenticationError(
            f"encryption {why} and this side has no keys: give a shared secret of at least 16 bytes"
            f" (${SECRET_ENV}, --secret-file) or certificates (--tls-cert, --tls-key, --tls-ca, or --tls-dir),"
            " or decline encryption (--no-encrypt)")


def connect(address: str | Address, opts: WireOptions, *, resume: bytes | None = None) -> Connection:
    """The source's side: connects the main channel, then (as negotiated) the urgent channel and
    the extra page channels, each with its own handshake (and TLS session, when encrypted: x509
    keying checks that the destination's certificate names ``opts.tls.peer_name``, by default
    the host of ``address``). ``resume``: the session id of a paused migration this connection
    resumes (its options must announce no extra page channels); it runs a fresh TLS handshake."""
    addr = parse_address(address) if isinstance(address, str) else address
    _check_keys(addr, opts)
    peer_name = opts.tls.peer_name or (addr.host if addr.family == "tcp" else "localhost")
    keys = TlsKeys(opts.secret, opts.tls, "client", peer_name)
    keys.preload()
    sock = _dial(addr, opts)
    try:
        res = handshake_source(sock, opts, "resume" if resume else "main", 0, resume, keys=keys)
    except BaseException:
        sock.close()
        raise
    conn = Connection(
        "source", res.page_size, res.region_bytes, res.negotiated, res.session,
        Channel("main", 0, sock, res.tls), timeout=opts.timeout,
    )
    try:
        urgent: list[tuple[ChannelKind, int]] = [("urgent", 0)] if res.negotiated.urgent_channel else []
        extra = [*urgent, *[("pages", i) for i in range(res.negotiated.extra_channels)]]
        channel_keys = _channel_keys(conn, opts, "client")
        for kind, index in extra:
            s = _dial(addr, opts)
            try:
                r = handshake_source(s, opts, kind, index, res.session, keys=keys, channel_keys=channel_keys)
            except BaseException:
                s.close()
                raise
            if r.negotiated != res.negotiated:
                s.close()
                raise ProtocolError(f"handshake: the {kind} channel settled otherwise than main")
            if kind == "urgent":
                conn.urgent = Channel("urgent", 0, s, r.tls)
            else:
                conn.pages.append(Channel("pages", index, s, r.tls))
    except BaseException:
        conn.close()
        raise
    return conn



__all__ = [
    "MAX_POSTCOPY_QUEUE_BYTES",
    "MIN_POSTCOPY_QUEUE_BYTES",
    "POSTCOPY_QUEUE_BYTES",
    "Channel",
    "Connection",
    "Listener",
    "check_queue_bytes",
    "connect",
]
