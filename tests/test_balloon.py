"""The balloon device's command ids and the migration's driver of it (the design's "Free page
hinting"): ids from 0x80000001, wrapping to 0x80000000, never STOP or DONE; a round around every
sync; DONE at the end, always."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from livemig._core import LocalBalloonDevice
from livemig.balloon import BalloonDriver
from livemig.protocol import (
    BALLOON_CMD_DONE,
    BALLOON_CMD_STOP,
    BALLOON_FIRST_ROUND_ID,
    BalloonState,
    is_round_id,
    next_round_id,
)


def test_ids_start_at_0x80000001_and_wrap_to_0x80000000() -> None:
    assert next_round_id(None) == BALLOON_FIRST_ROUND_ID == 0x80000001
    assert next_round_id(BALLOON_CMD_DONE) == BALLOON_FIRST_ROUND_ID
    assert next_round_id(0x80000001) == 0x80000002
    assert next_round_id(0xFFFFFFFF) == 0x80000000
    assert next_round_id(0x80000000) == 0x80000001


@given(st.integers(0, 0xFFFFFFFF))
def test_round_ids_are_never_commands(current: int) -> None:
    nxt = next_round_id(current)
    assert nxt not in (BALLOON_CMD_STOP, BALLOON_CMD_DONE)
    assert is_round_id(nxt) and 0x80000000 <= nxt <= 0xFFFFFFFF


@pytest.mark.parametrize("bad", [BALLOON_CMD_STOP, BALLOON_CMD_DONE, 5, 0x7FFFFFFF])
def test_a_command_is_not_a_round_id(bad: int) -> None:
    assert not is_round_id(bad)
    with pytest.raises(ValueError, match="not a round id"):
        LocalBalloonDevice(8).host_request(bad)


def test_ids_outside_32_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bits"):
        next_round_id(2**32)


def test_round_events_of_a_precopy() -> None:
    dev = LocalBalloonDevice(64)
    drv = BalloonDriver(dev)
    seen: list[tuple[int, BalloonState]] = []
    drv.after_sync()  # first round after the first sync
    seen.append((dev.cmd_id, dev.state))
    drv.before_sync()
    seen.append((dev.cmd_id, dev.state))
    drv.after_sync()
    seen.append((dev.cmd_id, dev.state))
    drv.final_sync()
    seen.append((dev.cmd_id, dev.state))
    drv.cleanup()  # DONE was sent already: not again
    assert seen == [
        (0x80000001, BalloonState.REQUESTED),
        (BALLOON_CMD_STOP, BalloonState.STOP),
        (0x80000002, BalloonState.REQUESTED),
        (BALLOON_CMD_DONE, BalloonState.DONE),
    ]
    assert drv.cmd_id == BALLOON_CMD_DONE and drv.stats.rounds == 2 and drv.stats.done_sent
    assert dev.counters().rounds == 2


def test_cancel_sends_done_to_the_source_guest() -> None:
    dev = LocalBalloonDevice(64)
    drv = BalloonDriver(dev)
    drv.after_sync()
    drv.cleanup()
    assert (dev.cmd_id, dev.state) == (BALLOON_CMD_DONE, BalloonState.DONE)


def test_disabled_driver_starts_no_round_but_still_ends_with_done() -> None:
    dev = LocalBalloonDevice(64)
    drv = BalloonDriver(dev, enabled=False)
    drv.after_sync()
    drv.before_sync()
    assert dev.counters().rounds == 0
    drv.final_sync()
    assert dev.state == BalloonState.DONE


def test_a_workload_without_a_device_is_driven_as_a_no_op() -> None:
    drv = BalloonDriver(None)
    drv.after_sync()
    drv.final_sync()
    assert drv.stats.done_sent and drv.last_round_id is None and drv.cmd_id == BALLOON_CMD_STOP


def test_sequence_continues_from_the_device_state() -> None:
    dev = LocalBalloonDevice(64)
    dev.continue_after(0xFFFFFFFF)
    assert BalloonDriver(dev).start_round() == 0x80000000
    with pytest.raises(ValueError, match="round id"):
        dev.continue_after(5)


def test_the_doorbell_rings_on_every_new_command() -> None:
    rings: list[int] = []
    dev = LocalBalloonDevice(64)
    drv = BalloonDriver(dev, notify=lambda: rings.append(dev.cmd_id))
    drv.after_sync()
    drv.final_sync()
    assert rings == [0x80000001, BALLOON_CMD_DONE]
