"""Capabilities: what each side of a connection announces, and what both may use
(docs/protocol.md, "Capabilities"). A behaviour an older peer would misread is used only when both
sides announce it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livemig.wire.tls import Keying

CAPABILITY_BITS: dict[str, int] = {
    "hints-postcopy": 1 << 0,
    "local-fill": 1 << 1,
    "urgent-channel": 1 << 2,
    "multichannel": 1 << 3,
    "checksums": 1 << 4,
    "digests": 1 << 5,
    "tls": 1 << 6,
    "urgent-requests": 1 << 7,
    "postcopy-next": 1 << 8,
    "precopy-drain": 1 << 9,
}
"""Capability names (docs/design.md) and their bits. Bits a peer sets that we do not know are
ignored. ``digests``: the destination keeps a digest of every page it places and sends the table
with its report (the generic oracle); a source offers it only when it verifies. ``tls``: this side
speaks TLS 1.3 on its channels (its HELLO then says whether it requires or declines encryption and
which keys it holds: wire/tls.py). ``urgent-requests``: with an urgent channel, the destination
sends its page requests on the urgent socket's other direction instead of main's, where the
background push keeps the socket busy (a resumed connection sends them on main, after its
received bitmap). ``postcopy-next``: the source announces the last precopy round before a
postcopy (COMMAND 5) and the destination bounds its main channel's queue then, so the window it
advertised in precopy is spent before postcopy starts. ``precopy-drain``: before a precopy
switchover the source ends its extra channels and sends COMMAND 6, and pauses its workload only
once the destination acknowledged that everything before it was applied, so no bulk data is
queued in the sockets during the downtime."""
ALL_CAPABILITIES: frozenset[str] = frozenset(CAPABILITY_BITS)
#: Capabilities a side offers unless told otherwise (``digests`` is offered per migration).
DEFAULT_CAPABILITIES: frozenset[str] = ALL_CAPABILITIES - {"digests"}
MAX_EXTRA_CHANNELS = 64


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
    def default(cls, extra_channels: int = 0) -> Capabilities:
        """What a side offers unless told otherwise: everything but ``digests``."""
        return cls(DEFAULT_CAPABILITIES, extra_channels)

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
    #: how every channel of the connection is encrypted: ``psk`` (TLS keyed by the shared secret),
    #: ``x509`` (certificates), or None (plaintext); settled by both sides from their HELLOs
    encryption: Keying | None = None

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
    def urgent_requests(self) -> bool:
        """Requests travel on the urgent channel (the destination to the source) instead of main."""
        return self.urgent_channel and "urgent-requests" in self.capabilities

    @property
    def postcopy_next(self) -> bool:
        """The source sends COMMAND 5 as its last precopy round before a postcopy starts."""
        return "postcopy-next" in self.capabilities

    @property
    def precopy_drain(self) -> bool:
        """Before a precopy pause the source waits for COMMAND 6's acknowledgement."""
        return "precopy-drain" in self.capabilities

    @property
    def local_fill(self) -> bool:
        """The destination resolves hinted pages itself; without it they are requested and served
        like any other unsent page."""
        return "local-fill" in self.capabilities

    def hinting_allowed(self, postcopy_possible: bool) -> bool:
        """Free page hinting may be used: always in pure precopy; with postcopy possible only when
        the peer keeps hinted pages correct (``hints-postcopy``), as QEMU does since 6.2."""
        return not postcopy_possible or "hints-postcopy" in self.capabilities



    @property
    def digests(self) -> bool:
        """The destination keeps page digests and sends them with its report (generic oracle)."""
        return "digests" in self.capabilities


__all__ = ["ALL_CAPABILITIES", "CAPABILITY_BITS", "DEFAULT_CAPABILITIES", "MAX_EXTRA_CHANNELS", "Capabilities",
           "Negotiated"]
