"""Frames as Python sees them: :class:`livemig._core.Frame` objects that the core decoded and
validated (docs/protocol.md, "Frames"). For tests, tools and the handshake's neighbours; page
frames of a migration never come up to Python."""

from __future__ import annotations

from livemig import _core
from livemig.errors import ConnectionLost, ProtocolError
from livemig.protocol import FrameType

Frame = _core.Frame


def read_frame(reader: _core.FrameReader) -> Frame | None:
    """The next frame the reader keeps (page frames land in an attached region), or None at a
    clean end of stream."""
    return reader.next()


def expect(reader: _core.FrameReader, *types: FrameType) -> Frame:
    """The next frame, which must be one of ``types``: ConnectionLost when the peer closed the
    stream instead, ProtocolError (with the peer's text for an ERROR frame) for another type."""
    want = "/".join(t.name for t in types)
    f = reader.next()
    if f is None:
        raise ConnectionLost(f"the peer closed the connection while we waited for {want}")
    if f.type not in types:
        if f.type == FrameType.ERROR:
            raise ProtocolError(f"the peer reported an error: {f.data.decode(errors='replace')}")
        raise ProtocolError(f"expected a {want} frame, got {f.type.name}")
    return f


def decode(data: bytes, config: _core.WireConfig, direction: str = "to_destination") -> list[Frame]:
    """Decodes a captured byte stream; ProtocolError on anything malformed or truncated."""
    return list(_core.wire_decode(data, config, direction))


__all__ = ["Frame", "decode", "expect", "read_frame"]
