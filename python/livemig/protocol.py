"""The protocol's numbers, as Python sees them. Their one home is the C++ headers
(cpp/include/livemig/wire/{frame_type,command,ack,channel}.hpp and balloon/protocol.hpp); the
core exports them as enums and constants, and this module is where Python code imports them from.
"""

from __future__ import annotations

from livemig import _core
from livemig._core import AckKind, BalloonState, ChannelKind, Command, EventKind, FrameType

#: The protocol version of this build's frames and handshake.
PROTOCOL_VERSION: int = _core.WIRE_PROTOCOL_VERSION
#: AckKind.GUEST_RUNS value on a resume: the destination guest never ran.
ACK_NEVER_RAN: int = _core.ACK_NEVER_RAN
#: Channel indices in session events: main, urgent, then extra page channel i at FIRST_EXTRA_CHANNEL + i.
MAIN_CHANNEL: int = _core.MAIN_CHANNEL
URGENT_CHANNEL: int = _core.URGENT_CHANNEL
FIRST_EXTRA_CHANNEL: int = _core.FIRST_EXTRA_CHANNEL

#: Balloon command ids (docs/design.md, Free page hinting): STOP and DONE; rounds from 0x80000001.
BALLOON_CMD_STOP: int = _core.BALLOON_CMD_STOP
BALLOON_CMD_DONE: int = _core.BALLOON_CMD_DONE
BALLOON_FIRST_ROUND_ID: int = _core.BALLOON_FIRST_ROUND_ID


def next_round_id(cmd_id: int | None) -> int:
    """The hint round id after ``cmd_id`` (None, STOP or DONE: the first); 0xFFFFFFFF wraps to
    0x80000000; never 0 or 1."""
    return int(_core.balloon_next_round_id(BALLOON_CMD_STOP if cmd_id is None else cmd_id))


def is_round_id(cmd_id: int) -> bool:
    """True for ids that name a hint round (0x80000000 and up)."""
    return bool(_core.balloon_is_round_id(cmd_id))


__all__ = [
    "ACK_NEVER_RAN",
    "BALLOON_CMD_DONE",
    "BALLOON_CMD_STOP",
    "BALLOON_FIRST_ROUND_ID",
    "FIRST_EXTRA_CHANNEL",
    "MAIN_CHANNEL",
    "PROTOCOL_VERSION",
    "URGENT_CHANNEL",
    "AckKind",
    "BalloonState",
    "ChannelKind",
    "Command",
    "EventKind",
    "FrameType",
    "is_round_id",
    "next_round_id",
]
