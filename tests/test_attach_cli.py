"""Another process's memory migrated from the command line (docs/attach.md): ``livemig migrate
--attach`` beside the example workload process (livemig-hashtable) on the source, ``livemig listen
--attach`` beside another on the destination, precopy and postcopy, hints on, the processes running
throughout; the destination process continues from the migrated memory and its own check passes,
and the generic oracle (page digests) passes. Every child has a deadline."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from attach_helpers import Proc, hashtable, livemig, migrate_pair, wait_for_socket
from test_two_hosts import Link, link  # noqa: F401 (the two-host fixture, used by name)

from cli_helpers import one_error_line, run

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]
PAGES_16M = (16 << 20) // 4096


def check_result(source: dict[str, Any], dest: dict[str, Any], mode: str, src: Proc, dst: Proc) -> None:
    assert source["ok"] is True and source["mode"] == mode and dest["mode"] == mode, (source, dest)
    # The reports name the kind and the process.
    assert source["workload"]["kind"] == "attach" and dest["workload_kind"] == "attach"
    assert source["workload"]["process"]["pid"] == src.p.pid and source["workload"]["process"]["role"] == "source"
    assert dest["workload_process"]["pid"] == dst.p.pid and dest["workload_process"]["name"]
    v = source["verify"]
    assert v["digests"] and v["mismatches"] == 0 and v["placed_twice"] == 0 and v["missing"] == 0, v
    assert v["pages_checked"] + v["excepted"] == PAGES_16M
    assert v["workload"]["ok"] and v["workload"]["pages_checked"] > 0, v  # the destination process's check
    assert source["hints"]["rounds"] >= 1 and source["hints"]["pages_hinted"] > 0, source["hints"]
    # The source process was handed off: DETACH leaves it paused, and it exits 0 ("migrated away").
    assert src.wait(30) == 0
    # The destination process runs on, detached, from the migrated memory: its own check passes
    # on SIGUSR1 (after more updates), and again when it exits.
    dst.signal(signal.SIGUSR1)
    line = dst.line("check ")
    assert " failures=0" in line and "records=" in line, line
    dst.signal(signal.SIGTERM)
    code, out, _ = dst.rest(30)
    assert code == 0 and "exit " in out and " failures=0" in out.splitlines()[-1], out


MODES = ["precopy", "postcopy"]


@pytest.mark.parametrize("mode", MODES)
def test_migrate_attach_between_two_processes(tmp_path: Path, mode: str, request: pytest.FixtureRequest) -> None:
    if mode == "postcopy":
        request.getfixturevalue("postcopy")
    extra = ("--postcopy", "--postcopy-after", "1") if mode == "postcopy" else ()
    source, dest, src, dst = migrate_pair(tmp_path, *extra)
    try:
        check_result(source, dest, mode, src, dst)
        if mode == "postcopy":
            assert dest["postcopy"]["outstanding_requests"] == 0
    finally:
        src.kill()
        dst.kill()


@pytest.mark.parametrize("mode", MODES)
def test_migrate_attach_between_two_hosts(link: Link, tmp_path: Path, mode: str,  # noqa: F811 (fixture)
                                          request: pytest.FixtureRequest) -> None:
    if mode == "postcopy":
        request.getfixturevalue("postcopy")
    secret = tmp_path / "secret"
    secret.write_bytes(b"two-hosts-attach")
    extra = ("--postcopy", "--postcopy-after", "1") if mode == "postcopy" else ()
    source, dest, src, dst = migrate_pair(tmp_path, *extra, netns=(link.src, link.dst), dest_ip=link.dst_ip,
                                          secret=secret)
    try:
        check_result(source, dest, mode, src, dst)
    finally:
        src.kill()
        dst.kill()


def test_attach_needs_a_destination_usage_error(tmp_path: Path) -> None:
    r = run("migrate", "--attach", str(tmp_path / "s.sock"), "--no-progress")
    assert r.returncode == 2 and "--attach needs --to" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_nobody_attaches_within_the_wait(tmp_path: Path) -> None:
    r = run("migrate", "--attach", str(tmp_path / "s.sock"), "--to", "127.0.0.1:1", "--attach-wait", "0.5",
            "--no-progress", "--quiet", timeout=30)
    line = one_error_line(r)
    assert r.returncode == 1 and "no workload process attached" in line and "0.5 s" in line
    assert not (tmp_path / "s.sock").exists()  # the socket file is gone again


def test_a_destination_process_cannot_attach_as_the_source(tmp_path: Path) -> None:
    """The wrong role is refused with its name, on both sides, within the bound; the process exits."""
    sock = tmp_path / "s.sock"
    mig = livemig("migrate", "--attach", str(sock), "--to", "127.0.0.1:1", "--no-progress", "--quiet",
                  "--attach-wait", "20")
    proc = None
    try:
        wait_for_socket(sock, mig)
        proc = hashtable(sock, role="destination", size="1M")
        code, _, err = mig.rest(30)
        assert code == 1 and "Traceback" not in err and "takes a source, not a destination" in err, err
        pcode, _, perr = proc.rest(30)
        assert pcode == 2 and "source" in perr, perr  # it heard why (livemig's ERROR text)
    finally:
        mig.kill()
        if proc is not None:
            proc.kill()
