"""TCP keepalive on every channel, so a silent partition (no FIN, no RST: a dead peer, a cable
pulled, a firewall dropping packets) is noticed within seconds and recovery starts, instead of
after the migration's 30-60 s timeouts or the kernel's retransmission limit (minutes). QEMU moved
to keepalive for this after postcopy recovery failed on a source that had not noticed its link
was dead.

An idle socket sends a probe after ``idle_s`` and then every ``interval_s``; ``count`` probes
without an answer end the connection (ETIMEDOUT). A socket with data in flight does not probe:
``TCP_USER_TIMEOUT``, set to the same bound, ends it when sent data stays unacknowledged that
long. Either way, a reader or writer blocked on the socket wakes with an error within
:attr:`Keepalive.bound_s` of the partition."""

from __future__ import annotations

import socket
from dataclasses import dataclass

# The kernel's limits (include/net/tcp.h: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT).
_MAX_SECONDS = 32767
_MAX_COUNT = 127


def _int(name: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class Keepalive:
    """Keepalive settings of a TCP channel (whole seconds: the kernel's unit). ``idle_s`` 0 turns
    it off (the kernel's defaults: a dead peer is noticed only by the migration's own timeouts)."""

    idle_s: int = 3  #: seconds a channel is idle before the first probe (0: no keepalive)
    interval_s: int = 1  #: seconds between probes
    count: int = 3  #: unanswered probes that end the connection

    def __post_init__(self) -> None:
        _int("keepalive idle", self.idle_s, 0, _MAX_SECONDS)
        _int("keepalive interval", self.interval_s, 1, _MAX_SECONDS)
        _int("keepalive count", self.count, 1, _MAX_COUNT)

    @property
    def enabled(self) -> bool:
        return self.idle_s > 0

    @property
    def bound_s(self) -> int:
        """Seconds after which a partition ends the connection (0 when off)."""
        return self.idle_s + self.interval_s * self.count if self.enabled else 0

    def apply(self, sock: socket.socket) -> None:
        """Sets the options on ``sock`` (a TCP socket; anything else is left alone)."""
        if not self.enabled or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.bound_s * 1000)


#: What a channel gets unless told otherwise: a dead peer is noticed within 6 s.
DEFAULT_KEEPALIVE = Keepalive()


__all__ = ["DEFAULT_KEEPALIVE", "Keepalive"]
