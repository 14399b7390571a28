"""The balloon device's command-id state machine (the design's "Free page hinting")."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from livemig.balloon import CMD_DONE, CMD_STOP, FIRST_ROUND_ID, BalloonDevice, next_round_id


class RecordingSink:
    """Records what the device tells the sink, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    def host_request(self, cmd_id: int) -> None:
        self.calls.append(("request", cmd_id))

    def host_stop(self) -> None:
        self.calls.append(("stop", None))

    def host_done(self) -> None:
        self.calls.append(("done", None))


def test_ids_start_at_0x80000001_and_wrap_to_0x80000000() -> None:
    assert next_round_id(None) == FIRST_ROUND_ID == 0x80000001
    assert next_round_id(0x80000001) == 0x80000002
    assert next_round_id(0xFFFFFFFF) == 0x80000000
    assert next_round_id(0x80000000) == 0x80000001


@given(st.integers(0x80000000, 0xFFFFFFFF))
def test_round_ids_are_never_commands(current: int) -> None:
    assert next_round_id(current) not in (CMD_STOP, CMD_DONE)
    assert 0x80000000 <= next_round_id(current) <= 0xFFFFFFFF


@pytest.mark.parametrize("bad", [CMD_STOP, CMD_DONE, 5, 0x7FFFFFFF, 2**32])
def test_a_command_is_not_a_round_id(bad: int) -> None:
    with pytest.raises(ValueError, match="not a hint round id"):
        next_round_id(bad)


def test_round_events_of_a_precopy() -> None:
    sink = RecordingSink()
    dev = BalloonDevice(sink)
    dev.after_sync()  # first round after the first sync
    dev.before_sync()
    dev.after_sync()
    dev.final_sync()
    dev.cleanup()  # DONE was sent already: not again
    assert sink.calls == [
        ("request", 0x80000001),
        ("stop", None),
        ("request", 0x80000002),
        ("stop", None),
        ("done", None),
    ]
    assert dev.cmd_id == CMD_DONE and dev.stats.rounds == 2 and dev.stats.done_sent


def test_cancel_sends_done_to_the_source_guest() -> None:
    sink = RecordingSink()
    dev = BalloonDevice(sink)
    dev.after_sync()
    dev.cleanup()
    assert sink.calls[-1] == ("done", None)


def test_disabled_device_starts_no_round_but_still_ends_with_done() -> None:
    sink = RecordingSink()
    dev = BalloonDevice(sink, enabled=False)
    dev.after_sync()
    dev.before_sync()
    dev.final_sync()
    assert sink.calls == [("done", None)]


def test_sequence_continues_from_the_device_state() -> None:
    dev = BalloonDevice(RecordingSink(), last_id=0xFFFFFFFF)
    assert dev.start_round() == 0x80000000
