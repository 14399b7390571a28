"""The wire: handshake, capability negotiation, channels and transports (see docs/protocol.md).

The destination listens, the source connects. Every channel (main, urgent, extra page channels)
is its own stream socket and starts with the same handshake: HELLO both ways, then (when a shared
secret is configured) a mutual HMAC-SHA256 challenge, then ACCEPT or REJECT from the destination.
The return path is the main socket's other direction. After the handshake, frames and pages move
in C++ (:class:`livemig._core.FrameWriter` / :class:`livemig._core.FrameReader`) with the GIL
released; nothing here runs per page.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from livemig import _core
from livemig.errors import AuthenticationError, ConnectionLost, ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Self

MAGIC = b"\x89LVMIG\r\n"
"""First 8 bytes of every handshake message."""
PROTOCOL_VERSION: int = _core.WIRE_PROTOCOL_VERSION

# Every handshake message: magic, version u16, type u8, reserved u8, body length u32, body. This
# prefix and the REJECT body (kind u8, UTF-8 text) never change between versions, so a peer of
# any version can say why it refuses.
_PREFIX = struct.Struct("<8sHBBI")
_HELLO, _AUTH, _ACCEPT, _REJECT = 1, 2, 3, 4
_MSG_NAMES = {_HELLO: "HELLO", _AUTH: "AUTH", _ACCEPT: "ACCEPT", _REJECT: "REJECT"}
# HELLO body, version 1: role, channel kind, channel index, page size, region bytes, capability
# bits, extra channels offered, auth flag, reserved, session id (16), nonce (32).
_HELLO_BODY = struct.Struct("<BBHIQQHBB16s32s")
_ACCEPT_BODY = struct.Struct("<QH6x")
_MAX_BODY = 4096
_MAC_BYTES = 32
_REJECT_PROTOCOL, _REJECT_AUTH, _REJECT_REFUSED = 0, 1, 2

Role = Literal["source", "destination"]
ChannelKind = Literal["main", "urgent", "pages", "resume"]
_ROLES: dict[int, Role] = {1: "source", 2: "destination"}
_ROLE_CODES = {v: k for k, v in _ROLES.items()}
# "resume": the main channel of a paused session's new connection (recovery; docs/protocol.md).
_KINDS: dict[int, ChannelKind] = {0: "main", 1: "urgent", 2: "pages", 3: "resume"}
_KIND_CODES = {v: k for k, v in _KINDS.items()}

#: Postcopy: the most bytes of the main channel's stream that each side lets its kernel queue
#: (see Channel.bound_queue). A page the background push already took is not sent again on
#: request (DESIGN.md rule 2), so a fault on it waits for everything queued ahead of it: at
#: about 1 GB/s, a quarter of a millisecond here against several behind the autotuned buffers.
POSTCOPY_QUEUE_BYTES = 256 << 10
#: The smallest bound that keeps the push's bandwidth: with a receive buffer of 128 KiB the push
#: under faults fell to a third here, and at 64 KiB to 2% (TCP stalls on a window that small).
MIN_POSTCOPY_QUEUE_BYTES = 256 << 10


def check_queue_bytes(nbytes: int) -> int:
    """``nbytes`` when it is a usable postcopy queue bound (0: none); ValueError otherwise."""
    if nbytes != 0 and nbytes < MIN_POSTCOPY_QUEUE_BYTES:
        raise ValueError(f"a postcopy queue bound of {nbytes} bytes is below the minimum of"
                         f" {MIN_POSTCOPY_QUEUE_BYTES >> 10} KiB, where TCP throughput collapses;"
                         " use 0 for no bound")
    return nbytes

CAPABILITY_BITS: dict[str, int] = {
    "hints-postcopy": 1 << 0,
    "local-fill": 1 << 1,
    "urgent-channel": 1 << 2,
    "multichannel": 1 << 3,
    "checksums": 1 << 4,
}
"""Capability names (DESIGN.md) and their bits. Bits a peer sets that we do not know are ignored."""
ALL_CAPABILITIES: frozenset[str] = frozenset(CAPABILITY_BITS)
MAX_EXTRA_CHANNELS = 64
SECRET_ENV = "LIVEMIG_SECRET"
"""Environment variable that may hold the shared secret (see :func:`load_secret`)."""


# ---- capabilities ----


def _unknown_caps(unknown: set[str]) -> str:
    return f"unknown capabilities {sorted(unknown)}; known: {sorted(ALL_CAPABILITIES)}"


@dataclass(frozen=True)
class Capabilities:
    """What one side announces: a set of capability names and, with ``multichannel``, how many
    extra page channels it is willing to use. Withhold a capability with :meth:`without`."""

    names: frozenset[str] = ALL_CAPABILITIES
    extra_channels: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.names) - ALL_CAPABILITIES
        if unknown:
            raise ValueError(_unknown_caps(unknown))
        if not 0 <= self.extra_channels <= MAX_EXTRA_CHANNELS:
            raise ValueError(
                f"extra_channels must be in [0, {MAX_EXTRA_CHANNELS}], got {self.extra_channels}"
            )

    @classmethod
    def all(cls, extra_channels: int = 0) -> Capabilities:
        """Every capability this version knows."""
        return cls(ALL_CAPABILITIES, extra_channels)

    @classmethod
    def none(cls) -> Capabilities:
        """No capability: behaves like the oldest peer."""
        return cls(frozenset(), 0)

    def without(self, *names: str) -> Capabilities:
        """These capabilities withheld (``--disable-capability NAME``); ValueError for an
        unknown name."""
        unknown = set(names) - ALL_CAPABILITIES
        if unknown:
            raise ValueError(_unknown_caps(unknown))
        return Capabilities(self.names - set(names), self.extra_channels)

    def to_bits(self) -> int:
        """The capability bit mask sent in HELLO."""
        bits = 0
        for n in self.names:
            bits |= CAPABILITY_BITS[n]
        return bits

    @classmethod
    def from_bits(cls, bits: int, extra_channels: int = 0) -> Capabilities:
        """The known capabilities in a peer's bit mask (unknown bits are dropped)."""
        names = frozenset(n for n, b in CAPABILITY_BITS.items() if bits & b)
        return cls(names, min(extra_channels, MAX_EXTRA_CHANNELS))

    def negotiate(self, peer: Capabilities) -> Negotiated:
        """The capabilities both sides announced; extra channels only with multichannel, at most
        the smaller offer."""
        both = self.names & peer.names
        extra = min(self.extra_channels, peer.extra_channels) if "multichannel" in both else 0
        return Negotiated(both, extra)


@dataclass(frozen=True)
class Negotiated:
    """What a connection may use: a feature is used only when both sides announced it."""

    capabilities: frozenset[str]
    extra_channels: int = 0

    def __contains__(self, name: object) -> bool:
        return name in self.capabilities

    @property
    def checksums(self) -> bool:
        """CRC32C trailer on every frame."""
        return "checksums" in self.capabilities

    @property
    def urgent_channel(self) -> bool:
        """Requested pages travel on their own channel; without it they go first on main."""
        return "urgent-channel" in self.capabilities

    @property
    def local_fill(self) -> bool:
        """The destination resolves hinted pages itself; without it they are requested and served
        like any other unsent page."""
        return "local-fill" in self.capabilities

    def hinting_allowed(self, postcopy_possible: bool) -> bool:
        """Free page hinting may be used: always in pure precopy; with postcopy possible only when
        the peer keeps hinted pages correct (``hints-postcopy``), as QEMU does since 6.2."""
        return not postcopy_possible or "hints-postcopy" in self.capabilities


# ---- secret ----


def load_secret(path: str | os.PathLike[str] | None = None, env: str = SECRET_ENV) -> bytes | None:
    """The shared secret from a file (whole contents, one trailing newline stripped) or else from
    the environment variable ``env``; None when neither is set. An empty secret is a ValueError."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if data.endswith(b"\n"):
            data = data[:-1]
    else:
        value = os.environ.get(env)
        if value is None:
            return None
        data = value.encode()
    if not data:
        raise ValueError("the shared secret is empty")
    return data


# ---- addresses ----


@dataclass(frozen=True)
class Address:
    """A transport endpoint: ``tcp`` (host, port; IPv4 or IPv6) or ``unix`` (path)."""

    family: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``unix:/path``, ``host:port``, ``1.2.3.4:port`` or ``[::1]:port``; ValueError otherwise."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {text!r}")
        return Address("unix", path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad IPv6 address {text!r}: expected [host]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"bad address {text!r}: expected host:port, [v6]:port or unix:/path")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return Address("tcp", host=host, port=port)


# ---- options and connection ----


@dataclass(frozen=True)
class WireOptions:
    """One side's handshake settings.

    ``region_bytes``: on the source the region it migrates; on the destination the most it accepts
    (0: whatever the source announces, within physical memory). ``secret``: when set, the peer
    must prove it knows it (and vice versa) before anything else happens.
    """

    page_size: int
    region_bytes: int
    capabilities: Capabilities = field(default_factory=Capabilities.all)
    secret: bytes | None = None
    timeout: float = 10.0


@dataclass
class Channel:
    """One stream socket of a connection, after its handshake (blocking; C++ sets its timeouts)."""

    kind: ChannelKind
    index: int
    sock: socket.socket

    def fileno(self) -> int:
        """The socket's fd, for FrameWriter / FrameReader (which do not own it)."""
        return self.sock.fileno()

    def bound_queue(self, role: Role, nbytes: int) -> None:
        """Keeps this channel's stream queued in the kernel, on this side, to about ``nbytes``:
        a TCP receiver shrinks its receive buffer (which also caps the window: a link whose
        bandwidth-delay product is larger wants more) and a TCP sender holds back what it has
        not sent beyond a quarter of it (TCP_NOTSENT_LOWAT); a Unix-socket sender caps its send
        buffer, which holds what the peer has not read (never raising it). 0 leaves the kernel's
        own buffers. Call while the stream is quiet: the bound applies to what is queued after.
        Best effort: on a socket that already broke it does nothing (its next read or write says so)."""
        if nbytes <= 0:
            return
        sock = self.sock
        try:
            # SO_RCVBUF and SO_SNDBUF: the kernel doubles the value asked for (bookkeeping).
            if sock.family == socket.AF_UNIX:
                if role == "source" and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > nbytes:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes // 2)
            elif role == "source":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, max(nbytes // 4, 1))
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes // 2)
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

    def writer(self, channel: Channel | None = None) -> _core.FrameWriter:
        """The FrameWriter of `channel` (default main; on the destination that is the return path).
        One per channel, made on first use; thread-safe."""
        ch = channel or self.main
        key = (ch.kind, ch.index)
        if key not in self._writers:
            self._writers[key] = _core.FrameWriter(ch.fileno(), self.config())
        return self._writers[key]

    def reader(self, channel: Channel | None = None) -> _core.FrameReader:
        """The FrameReader of `channel` (default main) for frames coming from the peer. One per
        channel for the channel's life (it reads ahead, so a second reader could miss bytes); use
        it from one thread at a time."""
        ch = channel or self.main
        key = (ch.kind, ch.index)
        if key not in self._readers:
            direction = "to_destination" if self.role == "destination" else "to_source"
            self._readers[key] = _core.FrameReader(ch.fileno(), self.config(), direction)
        return self._readers[key]

    def close(self) -> None:
        """Shuts down and closes every channel."""
        for ch in self.channels():
            ch.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- handshake messages ----


# The whole handshake of a socket must finish within its timeout, not just each read: a peer
# that trickles one byte per almost-timeout would otherwise hold a listener for ever.
_DEADLINES: weakref.WeakKeyDictionary[socket.socket, tuple[float, float]] = weakref.WeakKeyDictionary()


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    deadline, timeout = _DEADLINES.get(sock, (None, sock.gettimeout()))
    while len(buf) < n:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 1e-6))
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise ConnectionLost(
                f"handshake: the peer was silent or too slow: no whole {what} within the"
                f" handshake's {timeout} s (got {len(buf)} of {n} bytes)"
            ) from None
        except OSError as e:
            raise ConnectionLost(f"handshake: connection lost while reading {what}: {e}") from None
        if not chunk:
            raise ConnectionLost(
                f"handshake: the peer closed the connection while we waited for {what}"
                f" (got {len(buf)} of {n} bytes)"
            )
        buf += chunk
    return bytes(buf)


def _send(sock: socket.socket, mtype: int, body: bytes) -> None:
    try:
        sock.sendall(_PREFIX.pack(MAGIC, PROTOCOL_VERSION, mtype, 0, len(body)) + body)
    except TimeoutError:
        raise ConnectionLost("handshake: the peer stopped reading (timeout)") from None
    except OSError as e:
        name = _MSG_NAMES[mtype]
        raise ConnectionLost(f"handshake: connection lost while sending {name}: {e}") from None


def _reject(sock: socket.socket, kind: int, message: str) -> None:
    """Tells the peer why we refuse; best effort (it may be gone already)."""
    try:
        _send(sock, _REJECT, bytes([kind]) + message.encode()[: _MAX_BODY - 1])
    except ConnectionLost:
        pass


def _raise_rejected(body: bytes) -> None:
    kind = body[0] if body else _REJECT_PROTOCOL
    text = body[1:].decode(errors="replace")
    if kind == _REJECT_AUTH:
        raise AuthenticationError(f"the peer refused us: {text}")
    raise ProtocolError(f"the peer refused us: {text}")


def _recv_msg(sock: socket.socket, want: int) -> bytes:
    """Reads one handshake message of type `want` and returns its body. REJECT from the peer
    raises its reason; anything else malformed is a ProtocolError (after telling the peer)."""
    what = _MSG_NAMES[want]
    raw = _recv_exact(sock, _PREFIX.size, what)
    magic, version, mtype, reserved, length = _PREFIX.unpack(raw)
    if magic != MAGIC:
        _reject(sock, _REJECT_PROTOCOL, "bad magic: not a livemig peer")
        raise ProtocolError(
            f"handshake: bad magic {magic!r} (not a livemig peer?), expected {MAGIC!r}"
        )
    if length > _MAX_BODY:
        _reject(sock, _REJECT_PROTOCOL, f"handshake message of {length} bytes, limit {_MAX_BODY}")
        raise ProtocolError(f"handshake: {what} of {length} bytes, past the limit of {_MAX_BODY}")
    body = _recv_exact(sock, length, what)
    if mtype == _REJECT:  # frozen format: readable whatever the version
        _raise_rejected(body)
    if version != PROTOCOL_VERSION:
        _reject(
            sock,
            _REJECT_PROTOCOL,
            f"unsupported protocol version {version}; this peer speaks version {PROTOCOL_VERSION}",
        )
        raise ProtocolError(
            f"handshake: the peer speaks protocol version {version};"
            f" this side speaks only version {PROTOCOL_VERSION}"
        )
    if mtype != want or reserved != 0:
        _reject(sock, _REJECT_PROTOCOL, f"expected {what}")
        raise ProtocolError(
            f"handshake: expected {what}, got message type {mtype} (reserved {reserved})"
        )
    return body


@dataclass(frozen=True)
class _Hello:
    role: Role
    kind: ChannelKind
    index: int
    page_size: int
    region_bytes: int
    caps: Capabilities
    auth: bool
    session: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return _HELLO_BODY.pack(
            _ROLE_CODES[self.role],
            _KIND_CODES[self.kind],
            self.index,
            self.page_size,
            self.region_bytes,
            self.caps.to_bits(),
            self.caps.extra_channels,
            int(self.auth),
            0,
            self.session,
            self.nonce,
        )

    @classmethod
    def unpack(cls, body: bytes) -> _Hello:
        if len(body) < _HELLO_BODY.size:
            raise ProtocolError(
                f"handshake: HELLO body of {len(body)} bytes, expected {_HELLO_BODY.size}"
            )
        (role, kind, index, page_size, region, bits, extra, auth, reserved, session, nonce) = (
            _HELLO_BODY.unpack_from(body)
        )
        if role not in _ROLES:
            raise ProtocolError(f"handshake: unknown role {role} in HELLO")
        if kind not in _KINDS:
            raise ProtocolError(f"handshake: unknown channel kind {kind} in HELLO")
        if auth not in (0, 1) or reserved != 0:
            raise ProtocolError(
                f"handshake: bad auth flag {auth} or reserved byte {reserved} in HELLO"
            )
        if page_size < 64 or page_size & (page_size - 1):
            raise ProtocolError(f"handshake: page size {page_size} is not a power of two >= 64")
        return cls(
            _ROLES[role], _KINDS[kind], index, page_size, region,
            Capabilities.from_bits(bits, extra), bool(auth), session, nonce,
        )


def _mac(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, b"livemig-v1 " + label + b"\x00" + transcript, hashlib.sha256).digest()


def _authenticate(
    sock: socket.socket,
    role: Role,
    secret: bytes | None,
    mine: _Hello,
    peer: _Hello,
    transcript: bytes,
) -> None:
    """Mutual HMAC-SHA256 over both HELLOs (so both nonces): the source proves first, the
    destination answers only after checking it. AuthenticationError on any mismatch."""
    if secret is None and not peer.auth:
        return
    if secret is None:
        _reject(sock, _REJECT_AUTH, "this peer has no shared secret configured")
        raise AuthenticationError("the peer requires a shared secret and none is configured here")
    if not peer.auth:
        _reject(sock, _REJECT_AUTH, "a shared secret is required")
        raise AuthenticationError(
            "a shared secret is configured here but the peer offered no authentication"
        )
    del mine
    labels = (b"source", b"destination")
    mine_label, peer_label = labels if role == "source" else labels[::-1]
    if role == "source":
        _send(sock, _AUTH, _mac(secret, mine_label, transcript))
        theirs = _recv_msg(sock, _AUTH)
    else:
        theirs = _recv_msg(sock, _AUTH)
    if not hmac.compare_digest(theirs, _mac(secret, peer_label, transcript)):
        _reject(sock, _REJECT_AUTH, "authentication failed: wrong shared secret")
        raise AuthenticationError(
            f"authentication failed: the {peer.role} does not know the shared secret"
        )
    if role == "destination":
        _send(sock, _AUTH, _mac(secret, mine_label, transcript))


def physical_memory_bytes() -> int:
    """Physical memory of this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_region(opts: WireOptions, peer: _Hello) -> str | None:
    """Why the destination refuses the source's region layout, or None."""
    size = f"region of {peer.region_bytes} bytes"
    if peer.page_size != opts.page_size:
        return f"page size {peer.page_size} differs from this side's {opts.page_size}"
    if peer.region_bytes == 0 or peer.region_bytes % peer.page_size:
        return f"{size} is not a positive whole number of {peer.page_size}-byte pages"
    if opts.region_bytes and peer.region_bytes > opts.region_bytes:
        return f"{size} is larger than the local region of {opts.region_bytes} bytes"
    mem = physical_memory_bytes()
    if peer.region_bytes > mem:
        return f"{size} is larger than this host's memory ({mem} bytes)"
    return None


def _prepare(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(timeout)
    _DEADLINES[sock] = (time.monotonic() + timeout, timeout)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _finish(sock: socket.socket) -> None:
    # Blocking from now on; the C++ reader / writer put SO_RCVTIMEO / SO_SNDTIMEO on it.
    _DEADLINES.pop(sock, None)
    sock.settimeout(None)


@dataclass(frozen=True)
class HandshakeResult:
    """One channel's settled handshake."""

    kind: ChannelKind
    index: int
    page_size: int
    region_bytes: int
    negotiated: Negotiated
    session: bytes


def handshake_source(
    sock: socket.socket,
    opts: WireOptions,
    kind: ChannelKind = "main",
    index: int = 0,
    session: bytes | None = None,
) -> HandshakeResult:
    """Runs the source's side of the handshake on a connected stream socket. Raises
    ProtocolError / AuthenticationError (the peer refused, or spoke nonsense) or ConnectionLost."""
    _prepare(sock, opts.timeout)
    mine = _Hello(
        "source", kind, index, opts.page_size, opts.region_bytes, opts.capabilities,
        opts.secret is not None, session or secrets.token_bytes(16), secrets.token_bytes(32),
    )
    mine_body = mine.pack()
    _send(sock, _HELLO, mine_body)
    peer_body = _recv_msg(sock, _HELLO)
    peer = _Hello.unpack(peer_body)
    if peer.role != "destination":
        _reject(sock, _REJECT_PROTOCOL, "both ends are sources")
        raise ProtocolError(f"handshake: expected a destination, the peer says it is a {peer.role}")
    _authenticate(sock, "source", opts.secret, mine, peer, mine_body + peer_body)
    body = _recv_msg(sock, _ACCEPT)
    if len(body) < _ACCEPT_BODY.size:
        raise ProtocolError(
            f"handshake: ACCEPT body of {len(body)} bytes, expected {_ACCEPT_BODY.size}"
        )
    bits, extra = _ACCEPT_BODY.unpack_from(body)
    negotiated = opts.capabilities.negotiate(peer.caps)
    accepted = Capabilities.from_bits(bits, extra)
    if (accepted.names, accepted.extra_channels) != (
        negotiated.capabilities,
        negotiated.extra_channels,
    ):
        raise ProtocolError(
            f"handshake: the destination settled on {sorted(accepted.names)} with"
            f" {accepted.extra_channels} extra channels, but the intersection is"
            f" {sorted(negotiated.capabilities)} with {negotiated.extra_channels}"
        )
    _finish(sock)
    return HandshakeResult(kind, index, opts.page_size, opts.region_bytes, negotiated, mine.session)


def handshake_destination(
    sock: socket.socket,
    opts: WireOptions,
    sessions: dict[bytes, Negotiated] | None = None,
    paused: dict[bytes, Negotiated] | None = None,
) -> HandshakeResult:
    """Runs the destination's side on an accepted stream socket. A main channel starts a session;
    an urgent or page channel must name a session in `sessions` (and a negotiated channel); a
    resume channel must name a session in `paused` (then no main channel is taken). Refuses
    (REJECT to the peer, then ProtocolError / AuthenticationError here) a bad version, secret,
    page size or an absurd region."""
    _prepare(sock, opts.timeout)
    peer_body = _recv_msg(sock, _HELLO)
    try:
        peer = _Hello.unpack(peer_body)
    except ProtocolError as e:
        _reject(sock, _REJECT_PROTOCOL, str(e))
        raise
    if peer.role != "source":
        _reject(sock, _REJECT_PROTOCOL, "both ends are destinations")
        raise ProtocolError(f"handshake: expected a source, the peer says it is a {peer.role}")
    mine = _Hello(
        "destination", peer.kind, peer.index, opts.page_size, opts.region_bytes, opts.capabilities,
        opts.secret is not None, peer.session, secrets.token_bytes(32),
    )
    mine_body = mine.pack()
    _send(sock, _HELLO, mine_body)
    _authenticate(sock, "destination", opts.secret, mine, peer, peer_body + mine_body)
    reason = _check_region(opts, peer)
    negotiated = opts.capabilities.negotiate(peer.caps)
    if reason is None and peer.kind == "resume":
        reason = _check_resume(peer.session, negotiated, paused)
    elif reason is None and peer.kind == "main" and paused:
        reason = (f"this destination is paused, waiting to resume session {next(iter(paused)).hex()};"
                  " it takes no new migration until then")
    elif reason is None and peer.kind != "main":
        known = (sessions or {}).get(peer.session)
        if known is None:
            reason = f"{peer.kind} channel for an unknown session"
        elif peer.kind == "urgent" and not known.urgent_channel:
            reason = "urgent channel without the urgent-channel capability"
        elif peer.kind == "pages" and peer.index >= known.extra_channels:
            reason = f"page channel {peer.index} past the {known.extra_channels} negotiated"
        elif known != negotiated:
            reason = "channel announces capabilities that differ from its session's"
    if reason is not None:
        _reject(sock, _REJECT_REFUSED, reason)
        raise ProtocolError(f"handshake: refused the source: {reason}")
    bits = Capabilities(negotiated.capabilities).to_bits()
    _send(sock, _ACCEPT, _ACCEPT_BODY.pack(bits, negotiated.extra_channels))
    _finish(sock)
    return HandshakeResult(
        peer.kind, peer.index, peer.page_size, peer.region_bytes, negotiated, peer.session
    )


def _check_resume(session: bytes, negotiated: Negotiated, paused: dict[bytes, Negotiated] | None) -> str | None:
    """Why a resume channel is refused, or None: it must name a paused session and keep its
    capabilities (a resumed connection has no extra page channels)."""
    known = (paused or {}).get(session)
    if known is None:
        return (f"no paused migration with session {session.hex()} here (the destination that ran"
                " the guest is gone, or the migration already ended)")
    if negotiated.capabilities != known.capabilities or negotiated.extra_channels:
        return "resume announces capabilities that differ from its session's"
    return None


# ---- transports ----


def _socket_for(addr: Address) -> tuple[socket.socket, object]:
    if addr.family == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), addr.path
    infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {addr}")
    family, stype, proto, _, sockaddr = infos[0]
    return socket.socket(family, stype, proto), sockaddr


def is_loopback(address: Address) -> bool:
    """A Unix socket, or a TCP host that resolves only to loopback addresses (a name that does
    not resolve is not loopback)."""
    if address.family == "unix":
        return True
    try:
        return ipaddress.ip_address(address.host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address.host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    hosts = [str(info[4][0]).split("%")[0] for info in infos]  # drop an IPv6 scope id
    return bool(hosts) and all(ipaddress.ip_address(h).is_loopback for h in hosts)


class Listener:
    """The destination's listening socket (TCP v4/v6 or Unix). Port 0 picks a free port.

    Bound beyond loopback, it accepts only with a shared secret (``WireOptions.secret``):
    :meth:`accept` without one raises AuthenticationError before it takes a connection, unless
    the listener was made ``insecure=True`` (anyone who can reach the port may then migrate in)."""

    def __init__(self, address: str | Address, backlog: int = 16, *, insecure: bool = False) -> None:
        self.insecure = insecure
        addr = parse_address(address) if isinstance(address, str) else address
        self._sock, sockaddr = _socket_for(addr)
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

    def _accept_one(self, timeout: float | None) -> socket.socket:
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise ConnectionLost(
                f"no source connected to {self.address} within {timeout} s"
            ) from None
        return conn

    def accept(
        self,
        opts: WireOptions,
        wait: float | None | Literal["timeout"] = "timeout",
        *,
        resume: tuple[bytes, Negotiated] | None = None,
    ) -> Connection:
        """Accepts a source's main channel and then its urgent and extra page channels, each
        with its handshake; a connection that fails its handshake is refused and dropped, and the
        error raised (a wrong secret never gets past this). ``wait``: how long to wait for the
        source to connect (None: forever; default: ``opts.timeout``). ``resume``: (session id,
        negotiated) of a paused session: only its resume connection is accepted. Beyond loopback
        without a secret (and not ``insecure``): AuthenticationError, before any connection is taken."""
        if opts.secret is None and not self.insecure and not is_loopback(self.address):
            raise AuthenticationError(
                f"refusing to accept sources on {self.address} beyond loopback without a shared"
                f" secret: set one (WireOptions.secret, ${SECRET_ENV}), or make the listener"
                " insecure=True to accept anyone"
            )
        sock = self._accept_one(opts.timeout if wait == "timeout" else wait)
        try:
            res = handshake_destination(sock, opts, paused=dict([resume]) if resume else None)
        except BaseException:
            sock.close()
            raise
        conn = Connection(
            "destination", res.page_size, res.region_bytes, res.negotiated, res.session,
            Channel("main", 0, sock), timeout=opts.timeout,
        )
        try:
            want_urgent = res.negotiated.urgent_channel
            want_pages = res.negotiated.extra_channels
            pages: dict[int, Channel] = {}
            while (want_urgent and conn.urgent is None) or len(pages) < want_pages:
                s = self._accept_one(opts.timeout)
                try:
                    r = handshake_destination(s, opts, {res.session: res.negotiated})
                except BaseException:
                    s.close()
                    raise
                if r.kind == "urgent" and conn.urgent is None:
                    conn.urgent = Channel("urgent", 0, s)
                elif r.kind == "pages" and r.index not in pages:
                    pages[r.index] = Channel("pages", r.index, s)
                else:
                    s.close()
                    raise ProtocolError(f"handshake: duplicate {r.kind} channel {r.index}")
            conn.pages = [pages[i] for i in sorted(pages)]
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Stops listening (and removes a Unix socket's file)."""
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


def _dial(addr: Address, timeout: float) -> socket.socket:
    sock, sockaddr = _socket_for(addr)
    sock.settimeout(timeout)
    try:
        sock.connect(sockaddr)  # type: ignore[arg-type]
    except TimeoutError:
        sock.close()
        raise ConnectionLost(f"connect to {addr}: timeout after {timeout} s") from None
    except OSError as e:
        sock.close()
        raise ConnectionLost(f"connect to {addr}: {e.strerror or e}") from None
    return sock


def connect(address: str | Address, opts: WireOptions, *, resume: bytes | None = None) -> Connection:
    """The source's side: connects the main channel, then (as negotiated) the urgent channel and
    the extra page channels, each with its own handshake. ``resume``: the session id of a paused
    migration this connection resumes (its options must announce no extra page channels)."""
    addr = parse_address(address) if isinstance(address, str) else address
    sock = _dial(addr, opts.timeout)
    try:
        res = handshake_source(sock, opts, "resume" if resume else "main", 0, resume)
    except BaseException:
        sock.close()
        raise
    conn = Connection(
        "source", res.page_size, res.region_bytes, res.negotiated, res.session,
        Channel("main", 0, sock), timeout=opts.timeout,
    )
    try:
        urgent: list[tuple[ChannelKind, int]] = [("urgent", 0)] if res.negotiated.urgent_channel else []
        extra = [*urgent, *[("pages", i) for i in range(res.negotiated.extra_channels)]]
        for kind, index in extra:
            s = _dial(addr, opts.timeout)
            try:
                handshake_source(s, opts, kind, index, res.session)
            except BaseException:
                s.close()
                raise
            if kind == "urgent":
                conn.urgent = Channel("urgent", 0, s)
            else:
                conn.pages.append(Channel("pages", index, s))
    except BaseException:
        conn.close()
        raise
    return conn


# ---- frames (Python view of what FrameReader returns) ----

FrameKind = Literal[
    "pages", "zero", "discard", "local_fill", "device_state", "command", "end",
    "request", "received_bitmap", "ack", "error",
]

COMMAND_SWITCHOVER = 1
COMMAND_POSTCOPY_START = 2
COMMAND_COMPLETE = 3
COMMAND_COMMITTED = 4


@dataclass(frozen=True)
class Frame:
    """One decoded frame. ``first``/``count``: pages (or the ack kind in ``count``); ``value``:
    fill value, command or ack value; ``ranges``: (first, npages) pairs; ``data``: page bytes,
    blob, command arguments, bitmap or error text."""

    kind: FrameKind
    first: int = 0
    count: int = 0
    value: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    data: bytes = b""

    @classmethod
    def from_core(cls, t: tuple[str, int, int, int, object, bytes]) -> Frame:
        kind, first, count, value, ranges, data = t
        pairs = tuple((int(a), int(b)) for a, b in ranges.tolist())  # type: ignore[attr-defined]
        return cls(kind, first, count, value, pairs, data)  # type: ignore[arg-type]


def read_frame(reader: _core.FrameReader) -> Frame | None:
    """The next frame the reader keeps (page frames land in an attached region), or None at a
    clean end of stream."""
    t = reader.next()
    return None if t is None else Frame.from_core(t)


def expect(reader: _core.FrameReader, *kinds: FrameKind) -> Frame:
    """The next frame, which must be one of `kinds`: ConnectionLost when the peer closed the
    stream instead, ProtocolError (with the peer's text for an ERROR frame) for another kind."""
    f = read_frame(reader)
    if f is None:
        want = "/".join(kinds)
        raise ConnectionLost(f"the peer closed the connection while we waited for {want}")
    if f.kind not in kinds:
        if f.kind == "error":
            raise ProtocolError(f"the peer reported an error: {f.data.decode(errors='replace')}")
        raise ProtocolError(f"expected a {'/'.join(kinds)} frame, got {f.kind}")
    return f


def decode(data: bytes, config: _core.WireConfig, direction: str = "to_destination") -> list[Frame]:
    """Decodes a captured byte stream; ProtocolError on anything malformed or truncated."""
    return [Frame.from_core(t) for t in _core.wire_decode(data, config, direction)]


__all__ = [
    "ALL_CAPABILITIES",
    "CAPABILITY_BITS",
    "PROTOCOL_VERSION",
    "Address",
    "Capabilities",
    "Channel",
    "Connection",
    "Frame",
    "HandshakeResult",
    "Listener",
    "Negotiated",
    "WireOptions",
    "connect",
    "decode",
    "expect",
    "handshake_destination",
    "handshake_source",
    "is_loopback",
    "load_secret",
    "parse_address",
    "read_frame",
]
