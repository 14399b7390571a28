"""The commit point (docs/protocol.md, "The commit point"): whichever single step of the switchover
and the end of a migration is lost one way (and the link then cut, as keepalive would end it),
exactly one workload runs afterwards, never both, and a case where the source cannot learn which
ends with both stopped, its workload kept paused and the decision left to the operator, who can
resume it (tested below). Each test checks that the planned frame really was lost.

Real sockets through a relay that follows the frames (tests/step_relay.py), the destination in a
child process, real userfaultfd; small regions so each case takes seconds."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from step_relay import Loss, StepRelay

from livemig import migration
from livemig.guest import GuestConfig
from livemig.migration import DestinationConfig, MigrationConfig, MigrationFailed, MigrationResult
from livemig.protocol import AckKind, Command, FrameType
from livemig.workload import ModelGuest

from recovery_helpers import PhaseHook, _dest_answer, reap_destination, start_destination

SIZE = 8 << 20
GUEST = GuestConfig(workload="increment", rate=20000.0, free_fraction=0.5, seed=13)


@dataclass
class Ended:
    result: MigrationResult | None
    error: MigrationFailed | None
    dest_kind: str
    dest: Any
    loss: Loss
    connections: int


def run_with_loss(loss: Loss, *, postcopy: bool, dest: DestinationConfig | None = None,
                  reconnect_deadline_s: float = 20.0, kill_dest_when_paused: bool = False) -> Ended:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = start_destination(ctx, q, dest or DestinationConfig(timeout=5, resume_deadline_s=5), settle_s=1.0)
    try:
        _, address = q.get(timeout=60)
        config = MigrationConfig(postcopy=postcopy, verify=True, timeout=5, reconnect_deadline_s=reconnect_deadline_s)

        def on_phase(name: str) -> None:
            if name == "paused" and kill_dest_when_paused:
                proc.kill()
                proc.join()

        result = error = None
        with StepRelay(address, loss) as relay, ModelGuest(SIZE, GUEST) as w:
            try:
                result = migration.migrate(relay.address, w, config, PhaseHook(on_phase))
            except MigrationFailed as e:
                error = e
                if e.outcome == "uncertain":
                    _operator_decides(w, e)
            kind, payload = _dest_answer(q, proc, 60)
            connections = relay.connections
        return Ended(result, error, kind, payload, loss, connections)
    finally:
        reap_destination(proc, q)


def _operator_decides(w: ModelGuest, e: MigrationFailed) -> None:
    """The documented way out of "uncertain" (here the test knows the destination never ran: its
    start command was lost and it was killed): resume the source's workload, which then runs on
    intact. (API users: ``workload.resume()``; never when the destination's may run.)"""
    assert e.source_workload is not None and not e.source_workload.running
    w.resume()
    w.pause(10)
    check = w.check()
    assert check is not None and check.ok and check.pages_checked > 0, check
    w.resume()


def dest_ran(end: Ended) -> bool:
    """The destination's workload ran and runs on: its summary came back ok."""
    return end.dest_kind == "summary" and bool(end.dest["ok"])


def source_runs(end: Ended) -> bool:
    return end.error is not None and end.error.source_workload is not None and end.error.source_workload.running


def assert_one_runs(end: Ended) -> None:
    assert end.loss.lost.is_set() and end.loss.dropped, "the planned frame was never lost"
    assert dest_ran(end) != source_runs(end), (end.error, end.dest)  # exactly one, never both


# ---- precopy ----

# (name, what is lost (made fresh for each run), which one runs afterwards)
PRECOPY: list[tuple[str, Callable[[], Loss], str]] = [
    ("device-state", lambda: Loss("to_destination", FrameType.DEVICE_STATE, cut_after_s=0.3), "source"),
    ("command-3", lambda: Loss("to_destination", FrameType.COMMAND, arg=Command.COMPLETE, cut_after_s=0.3), "source"),
    ("ack-0-3", lambda: Loss("to_source", FrameType.ACK, AckKind.GUEST_RUNS, Command.COMPLETE, cut_after_s=0.3),
     "destination"),
    # The gap this closes: COMMAND 4 lost one way, the report delivered, nothing cut. The source
    # completes; the destination never hears COMMAND 4 nor the END after it, and keeps its workload.
    ("command-4", lambda: Loss("to_destination", FrameType.COMMAND, arg=Command.COMMITTED), "destination"),
    ("report", lambda: Loss("to_source", FrameType.DEVICE_STATE, cut_after_s=0.3), "destination"),
    ("report-end", lambda: Loss("to_destination", FrameType.END), "destination"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loss", "runs"), [(loss, runs) for _, loss, runs in PRECOPY],
                         ids=[name for name, _, _ in PRECOPY])
def test_precopy_loss_at_each_step_leaves_exactly_one_running(loss: Callable[[], Loss], runs: str) -> None:
    end = run_with_loss(loss(), postcopy=False, dest=DestinationConfig(timeout=3, resume_deadline_s=3))
    assert_one_runs(end)
    if runs == "source":
        assert end.error is not None and end.error.outcome == "cancelled", end.error
        assert "never ran" in str(end.error), end.error
        assert isinstance(end.dest, str) and "before the workload ran here" in end.dest, end.dest
        g = end.error.source_workload
        assert g is not None and g.check is not None and g.check.ok, g
    else:
        assert end.error is None, end.error  # the source learned (at last) that it runs there
        r = end.result
        assert r is not None and r.ok and r.verify is not None and r.verify.mismatches == 0, r
        if end.loss.cut_after_s is not None:
            assert r.recoveries == 1 and end.connections >= 3  # resumed over a new connection
        assert end.dest["ok"] and end.dest["mode"] == "precopy"


# ---- postcopy ----

POSTCOPY: list[tuple[str, Callable[[], Loss], str]] = [
    ("command-2", lambda: Loss("to_destination", FrameType.COMMAND, arg=Command.POSTCOPY_START, cut_after_s=0.3), "source"),
    ("ack-0-2", lambda: Loss("to_source", FrameType.ACK, AckKind.GUEST_RUNS, Command.POSTCOPY_START, cut_after_s=0.3),
     "destination"),
    ("command-3", lambda: Loss("to_destination", FrameType.COMMAND, arg=Command.COMPLETE, cut_after_s=0.3), "destination"),
    ("report", lambda: Loss("to_source", FrameType.DEVICE_STATE, cut_after_s=0.3), "destination"),
    ("report-end", lambda: Loss("to_destination", FrameType.END), "destination"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loss", "runs"), [(loss, runs) for _, loss, runs in POSTCOPY],
                         ids=[name for name, _, _ in POSTCOPY])
def test_postcopy_loss_at_each_step_leaves_exactly_one_running(loss: Callable[[], Loss], runs: str) -> None:
    end = run_with_loss(loss(), postcopy=True, dest=DestinationConfig(timeout=3, resume_deadline_s=5))
    assert_one_runs(end)
    if runs == "source":
        assert end.error is not None and end.error.outcome == "cancelled" and "never ran" in str(end.error)
    else:
        r = end.result
        assert end.error is None and r is not None and r.ok and r.mode == "postcopy", end.error
        assert r.verify is not None and r.verify.mismatches == 0 and r.verify.placed_twice == 0, r.verify


# ---- both stopped: the operator decides ----


@pytest.mark.timeout(120)
@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_a_start_command_lost_with_the_destination_gone_is_uncertain_and_the_operator_decides(postcopy: bool) -> None:
    """The start command is lost and the destination dies before anyone could ask it: the source
    cannot know whether it ran. It keeps its workload paused (never both), says so, and the
    operator, who knows (the destination's log said it never ran; here: it was killed), resumes
    the source's workload, which runs on intact (_operator_decides)."""
    command = Command.POSTCOPY_START if postcopy else Command.COMPLETE
    loss = Loss("to_destination", FrameType.COMMAND, arg=command, cut_after_s=0.3)
    end = run_with_loss(loss, postcopy=postcopy, reconnect_deadline_s=1.5, kill_dest_when_paused=True)
    assert loss.dropped[0] == (FrameType.COMMAND, 0, command)  # the start command itself was lost
    assert end.error is not None and end.error.outcome == "uncertain", end.error
    text = str(end.error)
    assert "whether its workload runs is UNKNOWN" in text and "stays paused" in text and "never both" in text
    assert end.error.mode == ("postcopy" if postcopy else "precopy")
    assert end.dest_kind == "killed"
