"""The Python client (livemig.attach.client): a Python program whose state is a memfd-backed numpy
array (tests/attach_py_program.py) migrated by ``livemig migrate --attach`` into another such
program behind ``livemig listen --attach``, precopy and postcopy; the destination continues from
exactly the operation count the source stopped at, its page-by-page check passes, and the generic
oracle passes. Then the destination's placement in postcopy, step by step: pages go into the
process's memfd through its userfaultfd, never through a copy livemig makes of the region, and the
process keeps its registration until the last page is in."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from attach_helpers import Proc, migrate_pair, reaped

from livemig.destination import Destination
from livemig.workload.attached import AttachedRegion, AttachFactory

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]
PROGRAM = Path(__file__).with_name("attach_py_program.py")
SIZE = 4 << 20


def py_program(sock: Path, role: str, netns: str | None = None, *args: str) -> Proc:
    """The Python program attaching at ``sock``."""
    return Proc([sys.executable, str(PROGRAM), str(sock), "--role", role, "--size", str(SIZE), *args], netns=netns)


def _n(line: str) -> int:
    m = re.search(r"\bn=(\d+)", line)
    assert m, line
    return int(m.group(1))


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_python_program_migrates_and_continues(tmp_path: Path, mode: str, request: pytest.FixtureRequest) -> None:
    if mode == "postcopy":
        request.getfixturevalue("postcopy")
    extra = ("--postcopy", "--postcopy-after", "1") if mode == "postcopy" else ()
    source, dest, src, dst = migrate_pair(tmp_path, *extra, start=py_program)
    with reaped(src, dst):
        assert source["ok"] and source["mode"] == mode and dest["mode"] == mode
        assert source["workload"]["process"]["name"] == "py-counter"
        v = source["verify"]
        assert v["digests"] and v["mismatches"] == 0 and v["placed_twice"] == 0 and v["missing"] == 0, v
        assert v["pages_checked"] == SIZE // 4096 and v["workload"]["ok"], v  # the destination program's check
        # The source stopped at operation n; the destination started from the same n: the array it
        # continues from is the migrated memory.
        code, out, _ = src.rest(30)
        assert code == 0, out
        stopped = _n(next(ln for ln in out.splitlines() if ln.startswith("migrated away ")))
        started = _n(dst.line("started "))
        assert started == stopped > 0
        # It runs on (more operations), and every page still holds what n says.
        dst.signal(signal.SIGUSR1)
        line = dst.line("check ")
        while _n(line) == started:
            dst.signal(signal.SIGUSR1)
            line = dst.line("check ")
        assert _n(line) > started and " failures=0" in line, line
        dst.signal(signal.SIGTERM)
        code, out, _ = dst.rest(30)
        assert code == 0 and " failures=0" in out.splitlines()[-1], out


def test_source_memfd_holes_go_as_zero_runs_unread(tmp_path: Path) -> None:
    """The source program writes a few hundred of its 4096 pages; the rest of its memfd are holes.
    livemig sends them as ZERO runs without reading them: afterwards the source's memfd still holds
    exactly the pages the program wrote (before: all 4096, each read allocated one), and the
    destination holds zeroes there (the oracle's digests agree page by page)."""
    size = 16 << 20

    def slow(sock: Path, role: str, netns: str | None) -> Proc:
        return Proc([sys.executable, str(PROGRAM), str(sock), "--role", role, "--size", str(size), "--rate", "400"],
                    netns=netns)

    source, _, src, dst = migrate_pair(tmp_path, start=slow)
    with reaped(src, dst):
        v = source["verify"]
        assert source["ok"] and v["digests"] and v["mismatches"] == 0 and v["pages_checked"] == size // 4096, v
        code, out, _ = src.rest(30)
        line = next(ln for ln in out.splitlines() if ln.startswith("migrated away "))
        n, held = _n(line), int(line.rsplit("memfd_pages=", 1)[1])
        assert 0 < n < size // 4096 - 1, line  # the program never reached every page
        assert held == n + 1, line  # its counter page and the n slot pages it wrote: nothing else
        assert source["zero_pages"] >= size // 4096 - held  # the holes went as ZERO runs
        dst.signal(signal.SIGTERM)
        code, out, _ = dst.rest(30)
        assert code == 0 and " failures=0" in out.splitlines()[-1], out


def _pages_in_memfd(pid: int, fd: int) -> int:
    """Pages the process's memfd holds (its st_blocks: read without touching the memory)."""
    return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512 // 4096


def _ready(p: Proc) -> dict[str, Any]:
    fields = dict(kv.split("=", 1) for kv in p.line("ready ").split()[1:])
    return {"pid": int(fields["pid"]), "memfd": int(fields["memfd"])}


def test_postcopy_places_into_the_process_through_its_userfaultfd(tmp_path: Path, postcopy: None) -> None:
    """The regression behind the attached postcopy failures: the destination workload was built on a
    second mapping of the memfd and filled from livemig's view of it, which read every hole as a zero
    page into the memfd (later placements then hit EEXIST: the process read zeroes), and it was sent
    COMPLETE at its first RESUME. Now: the memfd holds exactly the pages placed, RESUME leaves the
    process registered, its fault on a missing page reaches livemig, and COMPLETE comes last."""
    sock = tmp_path / "d.sock"
    factory = AttachFactory(sock, wait=30)
    proc = py_program(sock, "destination")
    with reaped(proc):
        ready = _ready(proc)
        region = factory.memory(SIZE, 4096)
        assert isinstance(region, AttachedRegion)
        dest = Destination.adopt(region)
        pages = SIZE // 4096
        image = np.zeros(SIZE // 8, dtype=np.uint64)  # the state after n operations, page by page
        n = 3 * (pages - 1) + 5
        image[0] = n
        image[512::512] = n // (pages - 1)
        image[512 : 512 * 6 : 512] += 1
        raw = image.view(np.uint8)
        dest.place(1, raw[4096 : 4096 * 100])  # precopy: pages 1..99 written into the memfd
        assert _pages_in_memfd(ready["pid"], ready["memfd"]) == 99
        dest.start_postcopy()
        w = factory.build("attach", 1, region, b"")
        assert w.region is region  # the engine's own mapping, not a second one filled by copying
        w.start()  # RESUME: the program runs; it reads page 0 (its n) first, which is missing
        assert _pages_in_memfd(ready["pid"], ready["memfd"]) == 99  # nothing was copied in
        assert dest.wait_requests(20), "the program's fault on page 0 never reached livemig"
        assert dest.drain_requests().tolist() == [[0, 1]]  # (first page, pages): its n
        # Placement goes through its userfaultfd (registered: no COMPLETE yet, no EEXIST).
        assert dest.place(0, raw[:4096]) == 1
        assert dest.place(100, raw[4096 * 100 :]) == pages - 100
        c = dest.counters()
        assert c.eexist == 0 and c.placed_twice == 0 and c.errors == 0, c
        assert _n(proc.line("started ")) == n  # it continued from the placed memory
        w.memory_complete()  # COMPLETE: every page is in; the process unregisters
        chk = w.check()
        assert chk is not None and chk.ok and chk.pages_checked == pages, chk
        w.stop()  # detached: it runs on, its own
        dest.stop()
        factory.close()
        proc.signal(signal.SIGTERM)
        code, out, _ = proc.rest(30)
        assert code == 0 and " failures=0" in out.splitlines()[-1], out
