"""The wire (docs/protocol.md): capabilities, addresses, the handshake, encryption, connections and
frames.

The destination listens, the source connects. Every channel (main, urgent, extra page channels)
is its own stream socket and starts with the handshake; the return path is the main socket's other
direction. After the handshake (and on an encrypted connection its TLS 1.3 handshake), frames and
pages move in C++ with the GIL released.
"""

from __future__ import annotations

from livemig.protocol import PROTOCOL_VERSION
from livemig.wire.address import Address, is_loopback, parse_address
from livemig.wire.capabilities import (
    ALL_CAPABILITIES,
    CAPABILITY_BITS,
    DEFAULT_CAPABILITIES,
    MAX_EXTRA_CHANNELS,
    Capabilities,
    Negotiated,
)
from livemig.wire.connection import (
    MAX_POSTCOPY_QUEUE_BYTES,
    MIN_POSTCOPY_QUEUE_BYTES,
    POSTCOPY_QUEUE_BYTES,
    Channel,
    Connection,
    Listener,
    check_queue_bytes,
    connect,
)
from livemig.wire.frames import Frame, decode, expect, read_frame
from livemig.wire.gate import DEFAULT_GATE, GateLimits, Refusals
from livemig.wire.handshake import (
    MAGIC,
    ChannelKind,
    HandshakeResult,
    Role,
    WireOptions,
    handshake_destination,
    handshake_source,
    physical_memory_bytes,
)
from livemig.wire.keepalive import DEFAULT_KEEPALIVE, Keepalive
from livemig.wire.secret import SECRET_ENV, load_secret
from livemig.wire.tls import (
    MIN_PSK_SECRET_BYTES,
    Keying,
    TlsReport,
    TlsSettings,
    check_encryption,
)

__all__ = [
    "ALL_CAPABILITIES",
    "CAPABILITY_BITS",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_GATE",
    "DEFAULT_KEEPALIVE",
    "MAGIC",
    "MAX_EXTRA_CHANNELS",
    "MAX_POSTCOPY_QUEUE_BYTES",
    "MIN_POSTCOPY_QUEUE_BYTES",
    "MIN_PSK_SECRET_BYTES",
    "POSTCOPY_QUEUE_BYTES",
    "PROTOCOL_VERSION",
    "SECRET_ENV",
    "Address",
    "Capabilities",
    "Channel",
    "ChannelKind",
    "Connection",
    "Frame",
    "GateLimits",
    "HandshakeResult",
    "Keepalive",
    "Keying",
    "Listener",
    "Negotiated",
    "Refusals",
    "Role",
    "TlsReport",
    "TlsSettings",
    "WireOptions",
    "check_encryption",
    "check_queue_bytes",
    "connect",
    "decode",
    "expect",
    "handshake_destination",
    "handshake_source",
    "is_loopback",
    "load_secret",
    "parse_address",
    "physical_memory_bytes",
    "read_frame",
]
