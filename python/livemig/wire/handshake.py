"""The handshake every channel starts with (docs/protocol.md, "Handshake"): HELLO both ways, the
encryption both sides settle from them (wire/tls.py), a mutual HMAC-SHA256 challenge when a
shared secret is configured and the connection stays plaintext, then ACCEPT or REJECT from the
destination, and on an encrypted connection the TLS 1.3 handshake, with the plaintext messages
bound to it. The prefix and the REJECT body never change between versions, so a peer of any
version can say why it refuses. This module is the one home of the handshake's numbers; channel
kinds come from the core (wire/channel.hpp)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Literal

from livemig import _core
from livemig.errors import AuthenticationError, ConnectionLost, ProtocolError
from livemig.protocol import PROTOCOL_VERSION
from livemig.protocol import ChannelKind as _ChannelKindCode
from livemig.wire.address import peer_is_loopback
from livemig.wire.capabilities import Capabilities, Negotiated
from livemig.wire.keepalive import DEFAULT_KEEPALIVE, Keepalive
from livemig.wire.secret import SECRET_ENV, load_secret
from livemig.wire.tls import (
    Keying,
    TlsKeys,
    TlsOffer,
    TlsSettings,
    channel_keying,
    keying_code,
    keying_of,
    settle,
    side_offer,
)

MAGIC = b"\x89LVMIG\r\n"
"""First 8 bytes of every handshake message."""

# Every handshake message: magic, version u16, type u8, reserved u8, body length u32, body.
_PREFIX = struct.Struct("<8sHBBI")
_HELLO, _AUTH, _ACCEPT, _REJECT = 1, 2, 3, 4
_MSG_NAMES = {_HELLO: "HELLO", _AUTH: "AUTH", _ACCEPT: "ACCEPT", _REJECT: "REJECT"}
# HELLO body, version 1: role, channel kind, channel index, page size, region bytes, capability
# bits, extra channels offered, auth flag, reserved, session id (16), nonce (32); then, from a peer
# with the tls capability, the TLS tail (wire/tls.py: TLS_TAIL), which older peers ignore.
_HELLO_BODY = struct.Struct("<BBHIQQHBB16s32s")
# ACCEPT body: capability bits, extra channels, the settled encryption (0 none, 1 psk, 2 x509;
# older peers send and read 0), reserved.
_ACCEPT_BODY = struct.Struct("<QHB5x")
_MAX_BODY = 4096
_REJECT_PROTOCOL, _REJECT_AUTH, _REJECT_REFUSED = 0, 1, 2

Role = Literal["source", "destination"]
ChannelKind = Literal["main", "urgent", "pages", "resume"]
_ROLES: dict[int, Role] = {1: "source", 2: "destination"}
_ROLE_CODES = {v: k for k, v in _ROLES.items()}
# "resume": the main channel of a paused session's new connection (recovery; docs/protocol.md).
_KINDS: dict[int, ChannelKind] = {
    int(_ChannelKindCode.MAIN): "main",
    int(_ChannelKindCode.URGENT): "urgent",
    int(_ChannelKindCode.PAGES): "pages",
    int(_ChannelKindCode.RESUME): "resume",
}
_KIND_CODES = {v: k for k, v in _KINDS.items()}

# ---- options ----


@dataclass(frozen=True)
class WireOptions:
    """One side's handshake settings.

    ``region_bytes``: on the source the region it migrates; on the destination the most it accepts
    (0: whatever the source announces, within physical memory). ``secret``: when set, the peer
    must prove it knows it (and vice versa) before anything else happens; it also keys TLS.
    ``encrypt``: True requires TLS 1.3 on every channel, False declines it, None (default)
    requires it from a peer beyond loopback. ``tls``: certificates (x509 keying) and the record
    layer.
    """

    page_size: int
    region_bytes: int
    capabilities: Capabilities = field(default_factory=Capabilities.default)
    secret: bytes | None = None
    timeout: float = 10.0
    encrypt: bool | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)
    keepalive: Keepalive = DEFAULT_KEEPALIVE  #: TCP keepalive on every channel (wire.keepalive)


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


def _message(mtype: int, body: bytes) -> bytes:
    """A whole handshake message of this version (what the TLS transcript holds)."""
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, mtype, 0, len(body)) + body


def _send(sock: socket.socket, mtype: int, body: bytes) -> None:
    try:
        sock.sendall(_message(mtype, body))
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
    tls: TlsOffer = field(default_factory=TlsOffer)

    def pack(self) -> bytes:
        tail = self.tls.pack() if "tls" in self.caps.names else b""
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
        ) + tail

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
        caps = Capabilities.from_bits(bits, extra)
        tls = TlsOffer.unpack("tls" in caps.names, body[_HELLO_BODY.size:])
        return cls(_ROLES[role], _KINDS[kind], index, page_size, region, caps, bool(auth), session, nonce, tls)


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
    """One channel's settled handshake; ``tls``: its TLS 1.3 channel when the connection is
    encrypted (``negotiated.encryption``), through which alone the socket is used from then on."""

    kind: ChannelKind
    index: int
    page_size: int
    region_bytes: int
    negotiated: Negotiated
    session: bytes
    tls: _core.TlsChannel | None = None


def _refuse_encryption(sock: socket.socket, source: TlsOffer, destination: TlsOffer) -> Keying | None:
    """The settled encryption (None: plaintext); refuses the peer (REJECT, then AuthenticationError
    here) when one side requires encryption and it cannot be had."""
    try:
        return settle(source, destination)
    except AuthenticationError as e:
        _reject(sock, _REJECT_AUTH, str(e))
        raise


def _start_tls(sock: socket.socket, keys: TlsKeys, keying: Keying, bodies: bytes, transcript: bytes) -> _core.TlsChannel:
    """The TLS handshake on ``sock`` within what is left of the handshake's deadline (the socket
    blocking again: the core waits on it itself)."""
    deadline, _ = _DEADLINES.get(sock, (time.monotonic() + 1.0, 1.0))
    _finish(sock)
    return keys.start(sock.fileno(), keying, bodies, transcript, max(deadline - time.monotonic(), 1e-3))


def handshake_source(
    sock: socket.socket,
    opts: WireOptions,
    kind: ChannelKind = "main",
    index: int = 0,
    session: bytes | None = None,
    *,
    keys: TlsKeys | None = None,
    channel_keys: TlsKeys | None = None,
) -> HandshakeResult:
    """Runs the source's side of the handshake on a connected stream socket. Raises
    ProtocolError / AuthenticationError (the peer refused, or spoke nonsense, or encryption cannot
    be had) or ConnectionLost. ``keys``: the connection's TLS contexts (made here when None);
    ``channel_keys``: an urgent or page channel's of an x509 session (TlsKeys.for_channels)."""
    _prepare(sock, opts.timeout)
    offer = side_offer("tls" in opts.capabilities.names, opts.encrypt, opts.secret, opts.tls, peer_is_loopback(sock))
    mine = _Hello(
        "source", kind, index, opts.page_size, opts.region_bytes, opts.capabilities,
        opts.secret is not None, session or secrets.token_bytes(16), secrets.token_bytes(32), offer,
    )
    mine_body = mine.pack()
    _send(sock, _HELLO, mine_body)
    peer_body = _recv_msg(sock, _HELLO)
    peer = _Hello.unpack(peer_body)
    if peer.role != "destination":
        _reject(sock, _REJECT_PROTOCOL, "both ends are sources")
        raise ProtocolError(f"handshake: expected a destination, the peer says it is a {peer.role}")
    keying = _refuse_encryption(sock, offer, peer.tls)
    if keying is None:
        _authenticate(sock, "source", opts.secret, mine, peer, mine_body + peer_body)
    body = _recv_msg(sock, _ACCEPT)
    if len(body) < _ACCEPT_BODY.size:
        raise ProtocolError(
            f"handshake: ACCEPT body of {len(body)} bytes, expected {_ACCEPT_BODY.size}"
        )
    bits, extra, code = _ACCEPT_BODY.unpack_from(body)
    negotiated = replace(opts.capabilities.negotiate(peer.caps), encryption=keying)
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
    if code != keying_code(keying):
        raise ProtocolError(f"handshake: the destination settled on encryption {keying_of(code)},"
                            f" this side on {keying or 'none'}")
    tls = None
    if keying is not None:
        keys = keys or TlsKeys(opts.secret, opts.tls, "client")
        transcript = _message(_HELLO, mine_body) + _message(_HELLO, peer_body) + _message(_ACCEPT, body)
        tls = _start_tls(sock, *channel_keying(kind, keying, keys, channel_keys), mine_body + peer_body, transcript)
    _finish(sock)
    return HandshakeResult(kind, index, opts.page_size, opts.region_bytes, negotiated, mine.session, tls)


def handshake_destination(
    sock: socket.socket,
    opts: WireOptions,
    sessions: dict[bytes, Negotiated] | None = None,
    paused: dict[bytes, Negotiated] | None = None,
    *,
    keys: TlsKeys | None = None,
    channel_keys: TlsKeys | None = None,
    insecure: bool = False,
) -> HandshakeResult:
    """Runs the destination's side on an accepted stream socket. A main channel starts a session;
    an urgent or page channel must name a session in `sessions` (and a negotiated channel, and the
    session's encryption); a resume channel must name a session in `paused` (then no main channel
    is taken). Refuses (REJECT to the peer, then ProtocolError / AuthenticationError here) a bad
    version, secret, page size, an absurd region, or a source that cannot meet the encryption
    either side requires (``insecure``: a source beyond loopback need not encrypt)."""
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
    offer = side_offer("tls" in opts.capabilities.names, opts.encrypt, opts.secret, opts.tls, peer_is_loopback(sock),
                       insecure)
    keying = _refuse_encryption(sock, peer.tls, offer)
    mine = _Hello(
        "destination", peer.kind, peer.index, opts.page_size, opts.region_bytes, opts.capabilities,
        opts.secret is not None, peer.session, secrets.token_bytes(32), offer,
    )
    mine_body = mine.pack()
    _send(sock, _HELLO, mine_body)
    if keying is None:
        _authenticate(sock, "destination", opts.secret, mine, peer, peer_body + mine_body)
    reason = _check_region(opts, peer)
    negotiated = replace(opts.capabilities.negotiate(peer.caps), encryption=keying)
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
        elif known.encryption != negotiated.encryption:
            reason = "channel encrypted otherwise than its session"
        elif known != negotiated:
            reason = "channel announces capabilities that differ from its session's"
    if reason is not None:
        _reject(sock, _REJECT_REFUSED, reason)
        raise ProtocolError(f"handshake: refused the source: {reason}")
    bits = Capabilities(negotiated.capabilities).to_bits()
    accept = _ACCEPT_BODY.pack(bits, negotiated.extra_channels, keying_code(keying))
    _send(sock, _ACCEPT, accept)
    tls = None
    if keying is not None:
        keys = keys or TlsKeys(opts.secret, opts.tls, "server", opts.tls.peer_name or "")
        transcript = _message(_HELLO, peer_body) + _message(_HELLO, mine_body) + _message(_ACCEPT, accept)
        tls = _start_tls(sock, *channel_keying(peer.kind, keying, keys, channel_keys), peer_body + mine_body,
                         transcript)
    _finish(sock)
    return HandshakeResult(
        peer.kind, peer.index, peer.page_size, peer.region_bytes, negotiated, peer.session, tls
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
    if negotiated.encryption != known.encryption:
        return (f"the session was encrypted with {known.encryption or 'nothing'}, the resume with"
                f" {negotiated.encryption or 'nothing'}")
    return None


__all__ = [
    "MAGIC",
    "SECRET_ENV",
    "ChannelKind",
    "HandshakeResult",
    "Role",
    "WireOptions",
    "handshake_destination",
    "handshake_source",
    "load_secret",
    "physical_memory_bytes",
]
