"""The host side of the virtio-balloon free page hinting device: the command-id state machine.

The device tells the guest a command id; the guest's balloon driver answers. Ids ``STOP`` (0) and
``DONE`` (1) are commands; every hint round gets a fresh id from ``0x80000001`` upwards, wrapping
from ``0xFFFFFFFF`` to ``0x80000000``. The migration drives the device at its round events:

* ``before_sync``: stop the running round (hints stop counting) so the sync sees a quiet device;
* ``after_sync``: start a new round while the guest runs;
* ``final_sync`` (guest stopped, precopy and postcopy alike) and ``cleanup`` (success, cancel or
  failure): ``DONE``, so the guest frees the pages it held back to its allocator.

The hot path (accepting hints tagged with an id, from guest threads, at millions of pages a second)
is the C++ hint sink; this class decides which id is current and tells the sink.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CMD_STOP = 0
CMD_DONE = 1
FIRST_ROUND_ID = 0x80000001
_ROUND_MIN = 0x80000000
_ROUND_MAX = 0xFFFFFFFF


class BalloonState(enum.IntEnum):
    """Device states, as in the design (and the C++ hint sink's enum)."""

    STOP = 0
    REQUESTED = 1
    START = 2
    DONE = 3


def next_round_id(current: int | None) -> int:
    """The id after ``current`` (None: none issued yet). Never 0 or 1; wraps to 0x80000000."""
    if current is None:
        return FIRST_ROUND_ID
    if not _ROUND_MIN <= current <= _ROUND_MAX:
        raise ValueError(f"0x{current:x} is not a hint round id")
    return _ROUND_MIN if current == _ROUND_MAX else current + 1


class HintSinkHost(Protocol):
    """What the device needs from the C++ hint sink (livemig._core.HintSink)."""

    def host_request(self, cmd_id: int) -> None: ...
    def host_stop(self) -> None: ...
    def host_done(self) -> None: ...


@dataclass
class BalloonStats:
    """What the device did during one migration."""

    rounds: int = 0
    last_cmd_id: int = CMD_STOP
    done_sent: bool = False


class BalloonDevice:
    """The host's free page hinting device for one migration, driven by the round events.

    ``enabled=False`` (hinting off, e.g. postcopy possible against a peer without
    ``hints-postcopy``) starts no rounds but still sends DONE at the end, which is harmless.
    ``last_id`` continues the id sequence of a previous migration (it travels in the device state).
    ``notify`` is called after the device shows a new command (the guest driver's doorbell).
    """

    def __init__(
        self,
        sink: HintSinkHost,
        *,
        enabled: bool = True,
        last_id: int | None = None,
        notify: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._notify = notify or (lambda: None)
        self.enabled = enabled
        self._last_round_id = last_id
        self._cmd_id = CMD_STOP
        self.stats = BalloonStats()

    @property
    def cmd_id(self) -> int:
        """The command id the device shows the guest now."""
        return self._cmd_id

    @property
    def last_round_id(self) -> int | None:
        """The last round id issued (for the device state)."""
        return self._last_round_id

    def start_round(self) -> int | None:
        """Ask the guest for hints under a new id; returns it (None when hinting is off)."""
        if not self.enabled:
            return None
        self._last_round_id = next_round_id(self._last_round_id)
        self._cmd_id = self._last_round_id
        self._sink.host_request(self._cmd_id)
        self._notify()
        self.stats.rounds += 1
        self.stats.last_cmd_id = self._cmd_id
        self.stats.done_sent = False
        return self._cmd_id

    def stop_round(self) -> None:
        """Stop the current round: hints tagged with its id no longer count."""
        if self._cmd_id not in (CMD_STOP, CMD_DONE):
            self._cmd_id = CMD_STOP
            self._sink.host_stop()
            self.stats.last_cmd_id = CMD_STOP

    def done(self) -> None:
        """Tell the guest it may reuse every page it hinted (idempotent)."""
        self._cmd_id = CMD_DONE
        self._sink.host_done()
        self._notify()
        self.stats.last_cmd_id = CMD_DONE
        self.stats.done_sent = True

    # Round events, named as the migration sees them.
    def before_sync(self) -> None:
        """A dirty sync is about to run: stop the round."""
        self.stop_round()

    def after_sync(self) -> None:
        """A sync finished and the guest runs on: start a new round."""
        self.start_round()

    def final_sync(self) -> None:
        """The guest is stopped for switchover: DONE, before the device state is sent."""
        self.stop_round()
        self.done()

    def cleanup(self) -> None:
        """The migration ended (completed, cancelled or failed): the source guest gets DONE too."""
        if not self.stats.done_sent:
            self.done()
