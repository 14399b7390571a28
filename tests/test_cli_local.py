"""The embedded destination (livemig.local): announce, deadline, and the child never outlives us."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from livemig import local, wire
from livemig.errors import MigrationError


def _gone(pid: int) -> bool:
    """The process no longer exists (a zombie still does: this also proves it was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _script(tmp_path: Path, body: str) -> list[str]:
    """A child that first writes its pid to tmp_path/pid, then runs ``body``."""
    code = f"import os, sys, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n{body}"
    return [sys.executable, "-c", code]


@pytest.mark.timeout(60)
def test_real_listen_announces_a_loopback_address_and_is_reaped() -> None:
    with local.local_destination(["--no-progress", "--quiet"], deadline=30) as dest:
        addr = wire.parse_address(dest.address)
        assert addr.family == "tcp" and addr.host == "127.0.0.1" and addr.port > 0
        proc = dest.process
    assert proc.returncode is not None
    assert _gone(proc.pid)


@pytest.mark.timeout(60)
def test_child_is_killed_and_reaped_when_the_body_raises(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "print('listening on 127.0.0.1:9', flush=True)\ntime.sleep(60)")
    with pytest.raises(RuntimeError, match="body failed"):
        with local.local_destination(command=cmd, deadline=30) as dest:
            assert dest.address == "127.0.0.1:9"
            assert dest.process.poll() is None
            raise RuntimeError("body failed")
    assert dest.process.returncode == -signal.SIGTERM
    assert _gone(dest.process.pid)


@pytest.mark.timeout(60)
def test_wait_kills_a_child_that_overstays(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "print('listening on 127.0.0.1:9', flush=True)\ntime.sleep(60)")
    with local.local_destination(command=cmd, deadline=30) as dest:
        assert dest.wait(0.2) == -signal.SIGTERM
    assert _gone(dest.process.pid)


@pytest.mark.timeout(60)
def test_wait_returns_the_exit_code_and_stderr_is_kept(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "print('listening on 127.0.0.1:9', flush=True)\n"
                            "sys.stdin.close()\nprint('livemig: error: late', file=sys.stderr)\nsys.exit(4)")
    with local.local_destination(command=cmd, deadline=30) as dest:
        assert dest.wait(30) == 4
        assert dest.stderr_text() == "livemig: error: late\n"


@pytest.mark.timeout(60)
def test_silent_child_hits_the_deadline_and_is_reaped(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "time.sleep(60)")
    with pytest.raises(MigrationError, match="did not announce its address within 0.5 s"):
        with local.local_destination(command=cmd, deadline=0.5):
            pytest.fail("must not get here")
    assert _gone(int((tmp_path / "pid").read_text()))


@pytest.mark.timeout(60)
def test_child_exiting_before_listening_reports_its_last_error_line(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "print('livemig: error: cannot listen on 127.0.0.1:1: boom', file=sys.stderr)\n"
                            "sys.exit(1)")
    want = "exited before listening: livemig: error: cannot listen on 127.0.0.1:1: boom"
    with pytest.raises(MigrationError, match=want):
        with local.local_destination(command=cmd, deadline=30):
            pytest.fail("must not get here")
    assert _gone(int((tmp_path / "pid").read_text()))


@pytest.mark.timeout(60)
def test_unexpected_first_line_is_an_error(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "print('hello', flush=True)\ntime.sleep(60)")
    with pytest.raises(MigrationError, match="announced 'hello', expected 'listening on '"):
        with local.local_destination(command=cmd, deadline=30):
            pytest.fail("must not get here")
    assert _gone(int((tmp_path / "pid").read_text()))


@pytest.mark.timeout(60)
def test_partial_line_then_rest_is_one_announce(tmp_path: Path) -> None:
    cmd = _script(tmp_path, "sys.stdout.write('listening on 127.0.'); sys.stdout.flush(); time.sleep(0.05)\n"
                            "print('0.1:77', flush=True)\ntime.sleep(60)")
    with local.local_destination(command=cmd, deadline=30) as dest:
        assert dest.address == "127.0.0.1:77"


def test_listen_command_is_this_python_on_loopback_once() -> None:
    assert local.listen_command(["--quiet"]) == [
        sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--once", "--announce", "--quiet"
    ]
