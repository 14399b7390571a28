"""The device state: what travels with a workload at switchover (docs/protocol.md, "Device state").

A blob of: magic ``LMDS``, the codec version, the workload's kind and its state format's version,
a JSON header (the balloon device's command id and round-id sequence), then the workload's own
opaque state. The kind and version come first so a destination can refuse a kind it cannot host
before it looks at anything else; COMMAND 1 (switchover) carries the same kind line, so a postcopy
destination refuses before the source pauses its workload.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from livemig.errors import ProtocolError

MAGIC = b"LMDS"
CODEC_VERSION = 2
_HEAD = struct.Struct("<4sHHI")  # magic, codec version, kind length, kind version
_LEN = struct.Struct("<I")
MAX_KIND_BYTES = 64


@dataclass(frozen=True)
class KindLine:
    """A workload's kind and the version of its state format."""

    kind: str
    version: int

    def pack(self) -> bytes:
        k = self.kind.encode()
        if not 0 < len(k) <= MAX_KIND_BYTES:
            raise ValueError(f"a workload kind must be 1 to {MAX_KIND_BYTES} bytes, got {self.kind!r}")
        if not 0 <= self.version < 2**32:
            raise ValueError(f"a workload state version must fit in 32 bits, got {self.version}")
        return _HEAD.pack(MAGIC, CODEC_VERSION, len(k), self.version) + k

    @classmethod
    def unpack_from(cls, blob: bytes) -> tuple[KindLine, int]:
        """The kind line at the start of ``blob`` and where it ends; ProtocolError otherwise."""
        if len(blob) < _HEAD.size or blob[:4] != MAGIC:
            raise ProtocolError("device state: bad magic (not a livemig device state)")
        _magic, codec, nkind, version = _HEAD.unpack_from(blob)
        if codec != CODEC_VERSION:
            raise ProtocolError(f"device state: codec version {codec}; this side reads version {CODEC_VERSION}")
        end = _HEAD.size + nkind
        if not 0 < nkind <= MAX_KIND_BYTES or end > len(blob):
            raise ProtocolError(f"device state: a kind of {nkind} bytes")
        try:
            kind = blob[_HEAD.size:end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("device state: the kind is not UTF-8") from None
        return cls(kind, version), end


@dataclass(frozen=True)
class DeviceState:
    """A decoded device state."""

    kind: KindLine
    balloon: dict[str, Any]  #: {"cmd_id": ..., "last_round_id": ...}
    state: bytes  #: the workload's own


def pack(kind: KindLine, balloon: dict[str, Any], state: bytes) -> bytes:
    """The device state blob."""
    header = json.dumps({"balloon": balloon}).encode()
    return kind.pack() + _LEN.pack(len(header)) + header + state


def unpack(blob: bytes) -> DeviceState:
    """Inverse of :func:`pack`; ProtocolError for anything malformed."""
    kind, at = KindLine.unpack_from(blob)
    if at + _LEN.size > len(blob):
        raise ProtocolError("device state: truncated before its header")
    (n,) = _LEN.unpack_from(blob, at)
    at += _LEN.size
    if at + n > len(blob):
        raise ProtocolError("device state: the header runs past the blob")
    try:
        header = json.loads(blob[at:at + n])
        balloon = header.get("balloon", {})
        if not isinstance(balloon, dict):
            raise TypeError("balloon is not an object")
    except (ValueError, TypeError, AttributeError) as e:
        raise ProtocolError(f"device state: bad header: {e}") from None
    return DeviceState(kind, balloon, blob[at + n:])


__all__ = ["CODEC_VERSION", "MAGIC", "DeviceState", "KindLine", "pack", "unpack"]
