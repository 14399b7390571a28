"""Interrupts never lose a workload by accident (docs/design.md rule 11). Before the destination's
workload may run, SIGINT/SIGTERM (or MigrationControl.cancel) cancels and the source's runs on.
Once it may run, the first one means *finish*: the source says so at once and keeps serving and
pushing until every page is there; only a second one within ABORT_WINDOW_S aborts, after saying
exactly which pages are lost, and the destination says its workload is incomplete by as many.

Real processes (``livemig listen``, ``livemig migrate``) through a paced relay, so postcopy lasts
seconds; the signals are sent when a phase line appears on stderr, never after a sleep."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from livemig import migration
from livemig.guest import GuestConfig
from livemig.migration import ABORT_WINDOW_S, MigrationConfig, MigrationControl, NoProgress

from cli_helpers import LIVEMIG
from fault_relay import FaultRelay
from recovery_helpers import PhaseHook, assert_cancelled_intact, assert_completed, run_through_relay

SLOW_LINK = 4e6  # bytes/s: 16 MiB of postcopy take about four seconds
INCREMENT = GuestConfig(workload="increment", rate=20000.0, seed=5)


@dataclass
class Proc:
    """A livemig process whose stderr lines are collected as they come."""

    popen: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """The first stderr line (from here on) containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout} s: {self.seen}"
            line = self.lines.get(timeout=left)
            self.seen.append(line)
            assert line != "\0eof", f"the process ended before {text!r}: {self.seen}"
            if text in line:
                return line

    def close(self) -> None:
        """Closes the pipes (once the process ended and its stderr was read to the end)."""
        for f in (self.popen.stdout, self.popen.stderr):
            if f is not None:
                f.close()

    def rest(self) -> list[str]:
        """Every stderr line once the process ended."""
        while (line := self.lines.get(timeout=30)) != "\0eof":
            self.seen.append(line)
        return self.seen


def _start(*args: str) -> Proc:
    p = subprocess.Popen([*LIVEMIG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    proc = Proc(p)

    def pump() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            proc.lines.put(line.rstrip("\n"))
        proc.lines.put("\0eof")

    threading.Thread(target=pump, daemon=True).start()
    return proc


@contextmanager
def listener_and_relay(*extra: str) -> Iterator[tuple[Proc, FaultRelay]]:
    """``livemig listen --once`` (JSON summary, progress lines) behind a paced relay."""
    listen = _start("listen", "127.0.0.1:0", "--once", "--announce", "--json", "-q", "--progress", "--timeout", "20",
                    *extra)
    try:
        assert listen.popen.stdout is not None
        first = listen.popen.stdout.readline()
        assert first.startswith("listening on "), first
        with FaultRelay(first.removeprefix("listening on ").strip(), rate_bps=SLOW_LINK) as relay:
            yield listen, relay
    finally:
        if listen.popen.poll() is None:
            listen.popen.kill()
        listen.popen.wait(30)
        listen.rest()
        listen.close()


def _migrate(relay: FaultRelay, *extra: str) -> Proc:
    return _start("migrate", "--to", relay.address, "--size", "16M", "--postcopy", "--verify", "--json", "-q",
                  "--progress", "--dirty-rate", "20000", "--timeout", "20", *extra)


def _finish(p: Proc) -> tuple[int, dict[str, Any]]:
    assert p.popen.stdout is not None
    out = p.popen.stdout.read()
    p.popen.wait(90)
    p.rest()
    p.close()
    return p.popen.returncode, json.loads(out)


def _listen_summary(listen: Proc) -> dict[str, Any]:
    assert listen.popen.stdout is not None
    line = listen.popen.stdout.readline()
    assert listen.popen.wait(60) in (0, 1)
    return dict(json.loads(line))


# ---- the command line ----


@pytest.mark.timeout(120)
def test_one_signal_in_postcopy_finishes_the_migration() -> None:
    with listener_and_relay() as (listen, relay):
        src = _migrate(relay)
        src.wait_for("phase postcopy")
        src.popen.send_signal(signal.SIGINT)
        said = src.wait_for("SIGINT received")
        code, out = _finish(src)
        dest = _listen_summary(listen)
    # Said at once (before the migration went on to complete), and what it means.
    assert "FINISHING the migration, not stopping it" in said and "pages exist only here" in said, said
    assert f"interrupt again within {ABORT_WINDOW_S:g} s to abort" in said
    assert src.seen.index(said) < next(i for i, ln in enumerate(src.seen) if "phase complete" in ln)
    assert code == 0, src.seen
    assert out["ok"] and out["outcome"] == "completed" and out["mode"] == "postcopy", out
    assert out["interrupt"] == {"requests": 1, "outcome": "finished", "lost_pages": 0, "lost_runs": [], "exact": True}
    assert out["verify"]["mismatches"] == 0 and out["verify"]["placed_twice"] == 0 and out["verify"]["digests"]
    assert dest["ok"] and dest["mode"] == "postcopy" and dest["postcopy"]["outstanding_requests"] == 0, dest


@pytest.mark.timeout(120)
def test_a_second_signal_soon_after_aborts_and_says_exactly_what_is_lost() -> None:
    with listener_and_relay() as (listen, relay):
        src = _migrate(relay)
        src.wait_for("phase postcopy")
        src.popen.send_signal(signal.SIGINT)
        src.wait_for("FINISHING")
        src.popen.send_signal(signal.SIGTERM)  # within the window: the test sends it as soon as it reads the line
        aborting = src.wait_for("ABORTING")
        lost_line = src.wait_for("aborted: ")
        code, out = _finish(src)
        dest = _listen_summary(listen)
    assert "SIGTERM received again" in aborting
    assert code == 128 + signal.SIGTERM, src.seen
    assert out["ok"] is False and out["outcome"] == "aborted" and out["mode"] == "postcopy", out
    lost = out["interrupt"]["lost_pages"]
    assert out["interrupt"]["outcome"] == "aborted" and out["interrupt"]["requests"] == 2 and out["interrupt"]["exact"]
    assert lost > 0  # the push was far from done (a paced link)
    m = re.search(r"aborted: ([\d,]+) pages \(.* MiB\) existed only on the source and are lost: pages (\d+)", lost_line)
    assert m is not None and int(m[1].replace(",", "")) == lost, lost_line
    assert int(m[2]) == out["interrupt"]["lost_runs"][0][0]
    # The destination lacks exactly those pages and says its workload is incomplete (and stopped).
    assert dest["ok"] is False, dest
    assert "the source aborted the migration" in dest["error"]
    assert f"the workload here is INCOMPLETE: {lost:,} pages never arrived" in dest["error"], (lost, dest["error"])


@pytest.mark.timeout(120)
def test_a_signal_before_the_destination_runs_cancels_and_the_source_runs_on() -> None:
    with listener_and_relay() as (listen, relay):
        src = _migrate(relay, "--postcopy-after", "3")
        src.wait_for("phase precopy")
        src.popen.send_signal(signal.SIGINT)
        said = src.wait_for("SIGINT received")
        code, out = _finish(src)
        dest = _listen_summary(listen)
    assert "cancelling; the destination's workload never ran, so the source's runs on" in said
    assert code == 128 + signal.SIGINT
    assert out["outcome"] == "cancelled" and out["mode"] == "precopy" and out["interrupt"]["outcome"] == "cancelled"
    # The source told the destination, which did not wait for a resume.
    assert dest["ok"] is False and "the source cancelled the migration" in dest["error"], dest


@pytest.mark.timeout(120)
def test_the_destination_of_a_source_gone_for_good_says_its_workload_is_incomplete() -> None:
    with listener_and_relay("--resume-deadline", "2") as (listen, relay):
        src = _migrate(relay)
        src.wait_for("phase postcopy")
        listen.wait_for("phase postcopy")  # its workload runs
        src.popen.kill()
        src.popen.wait(30)
        src.rest()
        src.close()
        paused = listen.wait_for("paused: ")
        dest = _listen_summary(listen)
    assert "pages are still only on the source" in paused and "waiting up to 2 s" in paused, paused
    assert dest["ok"] is False
    assert "the source did not resume within 2 s" in dest["error"]
    m = re.search(r"The workload here is INCOMPLETE: ([\d,]+) pages never arrived .* which is gone", dest["error"])
    assert m is not None and int(m[1].replace(",", "")) > 0, dest["error"]


# ---- the API: MigrationControl.cancel ----


class CancelAt(PhaseHook):
    """Calls control.cancel() ``times`` times when postcopy (or another phase) begins; keeps the answers."""

    def __init__(self, control: MigrationControl, phase: str, times: int) -> None:
        self.answers: list[str] = []
        self.notices: list[str] = []

        def on_phase(name: str) -> None:
            if name == phase and not self.answers:
                self.answers += [control.cancel() for _ in range(times)]

        super().__init__(on_phase)

    def notice(self, text: str) -> None:
        self.notices.append(text)


@pytest.mark.timeout(120)
def test_api_cancel_in_postcopy_finishes() -> None:
    control = MigrationControl()
    hooks: list[CancelAt] = []

    def make(_relay: FaultRelay, _proc: Any) -> CancelAt:
        hooks.append(CancelAt(control, "postcopy", 1))
        return hooks[0]

    config = MigrationConfig(postcopy=True, verify=True, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make, control=control)
    assert_completed(out)
    [answer] = hooks[0].answers
    assert "FINISHING the migration" in answer and answer in hooks[0].notices
    assert out.result is not None and out.result.interrupt is not None
    assert (out.result.interrupt.outcome, out.result.interrupt.requests) == ("finished", 1)


@pytest.mark.timeout(120)
def test_api_cancel_twice_in_postcopy_aborts_and_the_counts_agree() -> None:
    control = MigrationControl()
    hooks: list[CancelAt] = []

    def make(_relay: FaultRelay, _proc: Any) -> CancelAt:
        hooks.append(CancelAt(control, "postcopy", 2))
        return hooks[0]

    # With urgent-requests the requests go on the urgent socket, which the abort ends first: a
    # destination whose request then fails reads main first (its last pages, then the ERROR), so
    # its count of pages that never arrived is the source's exactly.
    config = MigrationConfig(postcopy=True, verify=True, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make, control=control)
    assert out.error is not None and out.error.outcome == "aborted", out.error
    assert "ABORTING" in hooks[0].answers[1]
    g = out.error.source_workload
    assert g is not None and not g.running  # the destination's ran: the source's is stale, stays paused
    it = out.error.interrupt
    assert it is not None and it.outcome == "aborted" and it.exact and it.lost_pages > 0
    assert isinstance(out.dest, str) and f"INCOMPLETE: {it.lost_pages:,} pages never arrived" in out.dest, out.dest


@pytest.mark.timeout(120)
def test_api_cancel_before_the_destination_runs_cancels_cleanly() -> None:
    control = MigrationControl()

    def make(_relay: FaultRelay, _proc: Any) -> CancelAt:
        return CancelAt(control, "precopy", 1)

    config = MigrationConfig(postcopy=True, postcopy_after=3, verify=True, timeout=10)
    out = run_through_relay(INCREMENT, config, rate_bps=SLOW_LINK, progress=make, control=control)
    assert out.error is not None and out.error.outcome == "cancelled"
    assert out.error.mode == "precopy"  # the config asked for postcopy; it never got there
    assert_cancelled_intact(out)
    assert out.error.interrupt is not None and out.error.interrupt.outcome == "cancelled"


def test_the_abort_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second cancel aborts only within ABORT_WINDOW_S of the first; later, it asks to finish again."""
    import livemig.migration.control as ctl

    clock = [100.0]
    monkeypatch.setattr(ctl.time, "monotonic", lambda: clock[0])
    control = MigrationControl()
    control._bind(NoProgress(), lambda: None, lambda: 42)
    control._protect()
    first = control.cancel()
    assert "FINISHING" in first and "42 pages exist only here" in first
    control._check()  # finishing: nothing to raise
    clock[0] += ABORT_WINDOW_S + 0.5
    assert "FINISHING" in control.cancel()  # too late to count as the second: finish, again
    clock[0] += ABORT_WINDOW_S - 0.5
    assert "ABORTING" in control.cancel()
    with pytest.raises(migration.Aborted):
        control._check()


def test_a_cancel_that_comes_first_stops_the_start_command() -> None:
    """cancel() and the start command cannot cross: a cancel before it makes _protect() raise."""
    control = MigrationControl()
    control.cancel()
    with pytest.raises(migration.Cancelled):
        control._protect()
    with pytest.raises(migration.Cancelled):
        control._check()
