"""The migration's side of a workload's free page hinting device (virtio-balloon semantics).

A workload that hints owns a balloon device (:class:`livemig._core.BalloonDevice`), as a VM owns
its virtio-balloon; its guest's driver talks to the device's guest side. A migration routes the
hints the device accepts into the source's page state and drives the device's host side at its
round events (docs/design.md, "Free page hinting"):

* ``before_sync``: stop the running round (hints stop counting) so the sync sees a quiet device;
* ``after_sync``: start a new round while the guest runs;
* ``final_sync`` (guest stopped, precopy and postcopy alike) and ``cleanup`` (success, cancel or
  failure): ``DONE``, so the guest frees the pages it held back to its allocator.

The ids and their rule live in the core (balloon/protocol.hpp; :mod:`livemig.protocol`); the hot
path (hints from guest threads at millions of pages a second) is C++ too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from livemig import _core
from livemig.protocol import BALLOON_CMD_DONE, BALLOON_CMD_STOP, BalloonState


@dataclass
class BalloonStats:
    """What the device did during one migration."""

    rounds: int = 0
    last_cmd_id: int = BALLOON_CMD_STOP
    done_sent: bool = False


class BalloonDriver:
    """Drives a workload's balloon device for one migration. ``device`` None (a workload without
    one) or ``enabled=False`` (hinting off: e.g. postcopy possible against a peer without
    ``hints-postcopy``) starts no rounds; DONE is still shown at the end, which is harmless.
    ``notify`` is the doorbell: called after the device shows a new command."""

    def __init__(self, device: _core.BalloonDevice | None, *, enabled: bool = True,
                 notify: Callable[[], None] | None = None) -> None:
        self.device = device
        self.enabled = enabled and device is not None
        self._notify = notify or (lambda: None)
        self.stats = BalloonStats()

    @property
    def cmd_id(self) -> int:
        """The command id the device shows now (STOP without a device)."""
        return BALLOON_CMD_STOP if self.device is None else int(self.device.cmd_id)

    @property
    def last_round_id(self) -> int | None:
        """The last round id issued (for the device state; None before any)."""
        if self.device is None:
            return None
        return int(self.device.last_round_id) or None

    def start_round(self) -> int | None:
        """Ask the guest for hints under a new id; returns it (None when hinting is off)."""
        if not self.enabled or self.device is None:
            return None
        cmd = int(self.device.host_request_next())
        self._notify()
        self.stats.rounds += 1
        self.stats.last_cmd_id = cmd
        self.stats.done_sent = False
        return cmd

    def stop_round(self) -> None:
        """Stop the current round: hints tagged with its id no longer count."""
        if self.device is not None and self.device.state in (BalloonState.REQUESTED, BalloonState.START):
            self.device.host_stop()
            self.stats.last_cmd_id = BALLOON_CMD_STOP

    def done(self) -> None:
        """Tell the guest it may reuse every page it hinted (idempotent)."""
        if self.device is not None:
            self.device.host_done()
            self._notify()
        self.stats.last_cmd_id = BALLOON_CMD_DONE
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


__all__ = ["BalloonDriver", "BalloonStats"]
