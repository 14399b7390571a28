"""How migrations run: the source's :class:`MigrationConfig` and the destination's
:class:`DestinationConfig`. Each validates itself on construction with the same checks the command
line runs (one validation for both), so a bad value is one clear ValueError naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from livemig import wire
from livemig.wire import check_queue_bytes

#: Seconds a workload's pause may take at switchover before the migration gives up (and the
#: workload runs on).
PAUSE_TIMEOUT_S = 10.0


def check_secret(secret: object) -> bytes | None:
    """``secret`` when usable as a shared secret (bytes with something besides whitespace, or None);
    TypeError/ValueError otherwise."""
    if secret is None:
        return None
    if isinstance(secret, str):
        raise TypeError("secret must be bytes (e.g. secret.encode()), not str")
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if not bytes(secret).strip():
        raise ValueError("the shared secret is empty or only whitespace")
    return bytes(secret)


def _finite(name: str, v: float, *, lo: float = 0.0, positive: bool = False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= lo:
        raise ValueError(f"{name} must be greater than {lo:g}, got {v}")
    if v < lo:
        raise ValueError(f"{name} must be at least {lo:g}, got {v}")


def _int(name: str, v: int, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {bound}, got {v}")


def _capabilities(names: frozenset[str]) -> None:
    unknown = set(names) - wire.ALL_CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(wire.ALL_CAPABILITIES)}")


def _encryption(encrypt: object, secret: bytes | None, tls: object, role: Literal["client", "server"],
                disabled: frozenset[str]) -> None:
    if encrypt is not None and not isinstance(encrypt, bool):
        raise TypeError(f"encrypt must be True, False or None, got {encrypt!r}")
    if not isinstance(tls, wire.TlsSettings):
        raise TypeError(f"tls must be a wire.TlsSettings, not {type(tls).__name__}")
    wire.check_encryption(encrypt, secret, tls, role, disabled)


def _keepalive(k: object) -> None:
    if not isinstance(k, wire.Keepalive):
        raise TypeError(f"keepalive must be a livemig.wire.Keepalive, got {k!r}")


@dataclass(frozen=True)
class MigrationConfig:
    """How a migration runs (the source's choices; the destination follows)."""

    postcopy: bool = False  #: switch to postcopy after ``postcopy_after`` precopy rounds
    postcopy_after: int = 1  #: precopy rounds before postcopy starts
    max_rounds: int = 30  #: precopy rounds before switchover is forced
    downtime_limit_ms: float = 300.0  #: switch over once the rest fits this at the measured rate
    hints: bool = True  #: free page hinting (off under postcopy against a peer without hints-postcopy)
    channels: int = 1  #: page channels in precopy (1: the main channel only)
    checksums: bool = False  #: offer CRC32C on every frame (costs a copy of every page)
    disable_capabilities: frozenset[str] = frozenset()  #: capabilities this side withholds
    secret: bytes | None = None  #: shared secret for the handshake (and TLS's key, derived from it)
    #: TLS 1.3 on every channel: True always, False never (guest memory crosses in clear), None
    #: (default) whenever the destination is not on loopback or requires it
    encrypt: bool | None = None
    #: certificates (x509 keying, the destination's name checked) and the record layer
    tls: wire.TlsSettings = field(default_factory=wire.TlsSettings)
    #: prove the destination holds exactly the workload's memory as of the switchover (page
    #: digests on both sides, no page placed twice) and run the workload's own check there
    verify: bool = False
    timeout: float = 30.0  #: seconds a silent peer is waited for
    #: postcopy recovery: how long a broken connection is paused and resumed before giving up
    #: (0: fail at once, as without recovery)
    reconnect_deadline_s: float = 60.0
    #: reconnect by itself (to the same address); False: wait for MigrationControl.resume()
    auto_reconnect: bool = True
    #: postcopy: the most bytes of the background stream this side lets its kernel queue on the
    #: main channel (wire.Channel.bound_queue; 0: the kernel's autotuned buffers; at least 256 KiB)
    postcopy_queue_bytes: int = wire.POSTCOPY_QUEUE_BYTES
    pause_timeout_s: float = PAUSE_TIMEOUT_S  #: how long the workload's pause may take
    #: TCP keepalive on every channel: a silent partition ends the connection within
    #: ``keepalive.bound_s`` (and postcopy recovery starts), not after ``timeout``
    keepalive: wire.Keepalive = wire.DEFAULT_KEEPALIVE

    def __post_init__(self) -> None:
        _int("postcopy_after", self.postcopy_after, 0)
        _int("max_rounds", self.max_rounds, 1)
        _finite("downtime_limit_ms", self.downtime_limit_ms, positive=True)
        _int("channels", self.channels, 1, 1 + wire.MAX_EXTRA_CHANNELS)
        _capabilities(frozenset(self.disable_capabilities))
        object.__setattr__(self, "disable_capabilities", frozenset(self.disable_capabilities))
        object.__setattr__(self, "secret", check_secret(self.secret))
        _encryption(self.encrypt, self.secret, self.tls, "client", self.disable_capabilities)
        _finite("timeout", self.timeout, positive=True)
        _finite("reconnect_deadline_s", self.reconnect_deadline_s)
        _int("postcopy_queue_bytes", self.postcopy_queue_bytes, 0)
        check_queue_bytes(self.postcopy_queue_bytes)
        _finite("pause_timeout_s", self.pause_timeout_s, positive=True)
        _keepalive(self.keepalive)


@dataclass(frozen=True)
class DestinationConfig:
    """How a destination accepts migrations."""

    disable_capabilities: frozenset[str] = frozenset()  #: capabilities this side withholds
    secret: bytes | None = None  #: shared secret the source must prove (and TLS's key, derived from it)
    #: TLS 1.3 on every channel: True required from every source, False declined (plaintext only),
    #: None (default) required from sources beyond loopback (unless the listener is insecure)
    encrypt: bool | None = None
    #: certificates (x509 keying; ``tls.peer_name``: the name a source's certificate must carry)
    tls: wire.TlsSettings = field(default_factory=wire.TlsSettings)
    max_region_bytes: int = 0  #: largest region accepted (0: up to physical memory)
    timeout: float = 30.0  #: seconds a silent peer is waited for
    #: postcopy recovery: how long a broken connection is paused, the guest running and its
    #: faulting threads waiting, for the source to resume (0: fail at once)
    resume_deadline_s: float = 60.0
    #: postcopy: the most bytes of the main channel's stream this side lets its kernel queue
    #: (wire.Channel.bound_queue; 0: the kernel's autotuned buffers; at least 256 KiB)
    postcopy_queue_bytes: int = wire.POSTCOPY_QUEUE_BYTES
    #: populate the region ahead of the precopy receivers from several threads (thread count
    #: measured at run time); pages not received by a postcopy switchover are made missing again
    prefault: bool = True
    #: TCP keepalive on every channel (see MigrationConfig.keepalive)
    keepalive: wire.Keepalive = wire.DEFAULT_KEEPALIVE

    def __post_init__(self) -> None:
        _capabilities(frozenset(self.disable_capabilities))
        object.__setattr__(self, "disable_capabilities", frozenset(self.disable_capabilities))
        object.__setattr__(self, "secret", check_secret(self.secret))
        _encryption(self.encrypt, self.secret, self.tls, "server", self.disable_capabilities)
        _int("max_region_bytes", self.max_region_bytes, 0)
        _finite("timeout", self.timeout, positive=True)
        _finite("resume_deadline_s", self.resume_deadline_s)
        _int("postcopy_queue_bytes", self.postcopy_queue_bytes, 0)
        check_queue_bytes(self.postcopy_queue_bytes)
        _keepalive(self.keepalive)


__all__ = ["PAUSE_TIMEOUT_S", "DestinationConfig", "MigrationConfig", "check_secret"]
