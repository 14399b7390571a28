"""Failures of an attached process at the Python level (docs/attach.md "When a side dies"): the
source process dies in the middle of precopy, livemig lets go of a process mid-migration. Each
proves the failure happened (the process is dead, the error names it) and that nothing leaks."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import pytest
from attach_helpers import hashtable, livemig, open_fds

from livemig.attach import AttachListener
from livemig.migration import MigrationConfig, MigrationFailed, migrate
from livemig.migration.progress import NoProgress
from livemig.workload import AttachedWorkload

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("kernel_tracking")]


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
