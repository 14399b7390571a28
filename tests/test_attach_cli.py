"""Another process's memory migrated from the command line (docs/attach.md): ``livemig migrate
--attach`` beside the example workload process (livemig-hashtable) on the source, ``livemig listen
--attach`` beside another on the destination, precopy and postcopy, hints on, the processes running
throughout; the destination process continues from the migrated memory and its own check passes,
and the generic oracle (page digests) passes. Every child has a deadline."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from attach_helpers import Proc, hashtable, livemig, wait_for_socket

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]
PAGES_16M = (16 << 20) // 4096


def migrate_pair(tmp: Path, *extra: str, netns: tuple[str, str] | None = None, dest_ip: str = "127.0.0.1",
                 secret: Path | None = None) -> tuple[dict[str, Any], dict[str, Any], Proc, Proc]:
    """Both processes and both livemigs; returns (source JSON, destination JSON, source process,
    destination process), the destination process still running."""
    ssock, dsock = tmp / "src.sock", tmp / "dst.sock"
    sec = ["--secret-file", str(secret)] if secret else []
    src_ns, dst_ns = netns if netns else (None, None)
    listen = livemig("listen", f"{dest_ip}:0", "--once", "--announce", "--json", "--quiet", "--no-progress",
                     "--timeout", "20", "--attach", str(dsock), *sec, netns=dst_ns)
    procs: list[Proc] = [listen]
    with _reap(procs):
        address = listen.line("listening on ").removeprefix("listening on ")
        wait_for_socket(dsock, listen)
        dst = hashtable(dsock, role="destination", netns=dst_ns)
        procs.append(dst)
        assert "role=destination" in dst.line("ready ")
        mig = livemig("migrate", "--attach", str(ssock), "--to", address, "--verify", "--json", "--quiet",
                      "--no-progress", "--timeout", "20", *sec, *extra, netns=src_ns)
        procs.append(mig)
        wait_for_socket(ssock, mig)
        src = hashtable(ssock, netns=src_ns)
        procs.append(src)
        assert "role=source" in src.line("ready ")
        code, out, err = mig.rest(60)
        assert code == 0 and "Traceback" not in err, (out, err, listen.stderr_now())
        source = json.loads(out.strip().splitlines()[-1])
        lcode, lout, lerr = listen.rest(30)
        assert lcode == 0, lerr
        dest = json.loads(lout.strip().splitlines()[-1])
        procs.clear()  # the processes are the caller's now
    return source, dest, src, dst


class _reap:
    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()


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


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
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
