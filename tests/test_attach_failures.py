"""Failures of an attached process at the Python level (docs/attach.md "When a side dies"): the
source process dies in the middle of precopy, the destination's in postcopy (before and after it
ran), livemig lets go of a process mid-migration. Each proves the failure happened (the process is
dead, the error names it) and that nothing leaks."""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import pytest
from attach_helpers import hashtable, livemig, open_fds, wait_for_socket

from livemig.attach import AttachListener
from livemig.migration import MigrationConfig, MigrationFailed, migrate
from livemig.migration.events import MigrationEvent
from livemig.migration.progress import NoProgress
from livemig.workload import AttachedWorkload

from fault_relay import FaultRelay

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("kernel_tracking")]
SLOW_LINK = 40e6  # bytes/s: the source dirties its table again during the round, so postcopy has work


def _ours(pid: int) -> list[str]:
    """Descriptors of this process that belong to the attachment of ``pid``."""
    return [f for f in open_fds(os.getpid())
            if "userfaultfd" in f or f == f"/proc/{pid}/pagemap" or f.startswith("/memfd:livemig-hashtable")]


class _KillAt(NoProgress):
    """Kills the workload process when precopy round ``at_round`` has been sent."""

    def __init__(self, pid: int, at_round: int) -> None:
        self.pid, self.at_round, self.killed = pid, at_round, False

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        if round == self.at_round and not self.killed:
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True


def test_source_process_dies_mid_precopy(tmp_path: Path) -> None:
    listen = livemig("listen", "127.0.0.1:0", "--once", "--announce", "--quiet", "--no-progress", "--timeout", "10")
    sock = tmp_path / "s.sock"
    with AttachListener(sock) as lst:
        proc = hashtable(sock, "--rate", "200000", size="64M")
        w = AttachedWorkload(lst.accept(role="source", wait=20))
    try:
        address = listen.line("listening on ").removeprefix("listening on ")
        assert _ours(w.pid)  # attached: its descriptors are here
        kill = _KillAt(w.pid, 0)
        with pytest.raises(MigrationFailed) as ei:
            migrate(address, w, MigrationConfig(timeout=10, max_rounds=50, downtime_limit_ms=0.001), kill)
        assert kill.killed and proc.wait(10) == -signal.SIGKILL
        assert "precopy" in str(ei.value) or "switchover" in str(ei.value), ei.value
        assert w.lost is not None or "gone" in str(ei.value) or "ESRCH" in str(ei.value) or "pagemap" in str(ei.value)
        w.stop()
        del ei  # its traceback holds the migration's engine (and the engine its duplicates)
        gc.collect()
        assert _ours(w.pid) == []  # the uffd, pagemap and memfd duplicates are all closed
        assert listen.wait(20) == 1  # the destination saw the migration fail
    finally:
        w.stop()
        proc.kill()
        listen.kill()



class _KillDestination(NoProgress):
    """Kills the destination's workload process at the source's switchover (before POSTCOPY_START:
    it can never run), or once the source heard it runs (the switchover event: mid-postcopy)."""

    def __init__(self, pid: int, when: str) -> None:
        self.pid, self.when, self.killed = pid, when, False

    def _kill(self) -> None:
        if not self.killed:
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True

    def phase(self, name: str) -> None:
        if self.when == "before it ran" and name == "switchover":
            self._kill()

    def event(self, ev: MigrationEvent) -> None:
        if self.when == "after it ran" and ev.kind == "switchover":
            self._kill()


@pytest.mark.parametrize("when", ["before it ran", "after it ran"])
def test_destination_process_dies_mid_postcopy(tmp_path: Path, when: str, postcopy: None) -> None:
    """The destination's process dies in a postcopy migration (over a slow link, so postcopy is still
    moving pages). Before it ran: the destination says it never ran and the source process resumes,
    its own check passing. After: the only complete copy is gone; the source process stays handed
    off and paused. Both sides fail within the bound, the destination's report saying why."""
    dsock, ssock = tmp_path / "d.sock", tmp_path / "s.sock"
    listen = livemig("listen", "127.0.0.1:0", "--once", "--announce", "--quiet", "--no-progress", "--json",
                     "--timeout", "10", "--attach", str(dsock))
    dst = src = None
    try:
        address = listen.line("listening on ").removeprefix("listening on ")
        wait_for_socket(dsock, listen)
        dst = hashtable(dsock, role="destination", size="32M")
        dst.line("ready ")
        with AttachListener(ssock) as lst:
            src = hashtable(ssock, "--rate", "200000", size="32M")
            w = AttachedWorkload(lst.accept(role="source", wait=20))
        kill = _KillDestination(dst.p.pid, when)
        config = MigrationConfig(timeout=10, postcopy=True, postcopy_after=1, hints=False)
        with FaultRelay(address, rate_bps=SLOW_LINK) as relay, pytest.raises(MigrationFailed) as ei:
            migrate(relay.address, w, config, kill, events=kill.event)
        assert kill.killed and dst.wait(10) == -signal.SIGKILL  # the failure happened: it was killed
        report = ei.value.source_workload
        assert report is not None and report.running == (when == "before it ran"), (report, ei.value)
        lcode, lout, _ = listen.rest(30)
        dest = json.loads(lout.strip().splitlines()[-1])
        assert lcode == 1 and not dest["ok"] and f"pid {dst.p.pid}" in dest["error"], dest
        assert f"pid {dst.p.pid}" in str(ei.value), ei.value  # the source heard why, at once
        if report.running:  # it never ran there: the source runs on, whole
            src.signal(signal.SIGUSR1)
            assert " failures=0" in src.line("check "), src.lines
            w.stop()
            src.signal(signal.SIGTERM)
            code, out, _ = src.rest(30)
            assert code == 0 and " failures=0" in out.splitlines()[-1], out
        else:  # it ran: the source stays handed off and paused; let go, it exits as migrated away
            w.stop()
            assert src.wait(30) == 0
    finally:
        for p in (listen, dst, src):
            if p is not None:
                p.kill()
