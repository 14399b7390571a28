"""livemig beside QEMU on the same work (``bench/compare_qemu.py``): QEMU's own loopback postcopy
migration of a small guest, and livemig's ``increment`` workload at the same size and dirty rate,
alternated, several times.

The guest is a boot sector assembled here (``as``/``ld``): it enters 32-bit protected mode and
increments the first byte of every page from 1 MiB to the end of its memory, in address order, for
ever (livemig's ``increment`` writer does the same to its region). QEMU is told to switch to
postcopy once its first pass over RAM is done (``dirty-sync-count`` 2); livemig runs with
``--postcopy --postcopy-after 1``. QEMU's request-to-placed latencies come from its trace events
(``postcopy_ram_fault_thread_request`` and the next ``postcopy_place_page`` of that page, both
logged before the action with microsecond timestamps); its blocktime from ``query-migrate`` with
the ``postcopy-blocktime`` capability. Nothing is installed: without ``qemu-system-x86_64``,
``as`` or ``ld`` the comparison says so and stops. ``--mode precopy`` compares precopy instead
(:mod:`livemig.benchmark.qemu_precopy`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.benchmark.qemu_precopy import precopy_main
from livemig.benchmark.qemu_vm import (
    GUEST_START,
    QEMU,
    Qmp,
    await_migration,
    free_port,
    missing_tools,
)

#: The guest: real mode to flat 32-bit protected mode, then ``incb`` on each page's first byte,
#: in address order, from GUEST_START to MEM_END (given to ``as`` with --defsym), over and over.
GUEST_ASM = """
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    in $0x92, %al          # fast A20: every megabyte addressable
    or $2, %al
    and $0xfe, %al
    out %al, $0x92
    lgdt gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $pm
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
1:  mov $GUEST_START, %edi
2:  incb (%edi)
    add $4096, %edi
    cmp $MEM_END, %edi
    jb 2b
    jmp 1b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff   # code: base 0, 4 GiB, 32-bit
    .quad 0x00cf92000000ffff   # data: base 0, 4 GiB
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
    . = _start + 510
    .byte 0x55, 0xaa
"""

_TRACE = re.compile(r"^\d+@(\d+)\.(\d+):(postcopy_ram_fault_thread_request|postcopy_place_page\w*) "
                    r"(?:Request for HVA=0x([0-9a-f]+)|host=(?:0x)?([0-9a-f]+))")


def build_guest(directory: Path, mem_bytes: int) -> Path:
    """Assembles the guest for ``mem_bytes`` of RAM into a bootable disk image; returns its path."""
    src, obj, img = directory / "guest.S", directory / "guest.o", directory / "guest.img"
    src.write_text(GUEST_ASM)
    subprocess.run(["as", "--32", "--defsym", f"MEM_END={mem_bytes:#x}", "--defsym", f"GUEST_START={GUEST_START:#x}",
                    "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-e", "_start",
                    "-o", str(img), str(obj)], check=True, capture_output=True)
    if img.stat().st_size != 512:
        raise RuntimeError(f"the guest assembled to {img.stat().st_size} bytes, not one 512-byte sector")
    with img.open("r+b") as f:
        f.truncate(1 << 20)  # a small disk, so the BIOS sees a plausible drive
    return img


def request_to_placed_us(trace: str) -> list[float]:
    """QEMU's request-to-placed latencies (us) from its trace log: for each page request, the
    time to the next placement of that page (a page requested again before it came is timed
    from its first request)."""
    pending: dict[int, float] = {}
    out: list[float] = []
    for line in trace.splitlines():
        m = _TRACE.match(line)
        if m is None:
            continue
        t = int(m.group(1)) * 1e6 + int(m.group(2))
        if m.group(3) == "postcopy_ram_fault_thread_request":
            pending.setdefault(int(m.group(4), 16) & ~0xFFF, t)
        else:
            t0 = pending.pop(int(m.group(5), 16) & ~0xFFF, None)
            if t0 is not None:
                out.append(t - t0)
    return out


@dataclass
class Run:
    """One migration's figures (times in ms, latencies in us)."""

    total_ms: float
    downtime_ms: float
    blocktime_ms: float
    requests: int
    request_p50_us: float
    request_p99_us: float
    request_max_us: float
    dirty_rate: float = 0.0  #: the guest's pages per second (QEMU: measured before migrating)
    extra: dict[str, Any] = field(default_factory=dict)


def _quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(q * len(s) + 0.999999) - 1))]


def run_qemu(workdir: Path, image: Path, mem_bytes: int, accel: str, timeout: float = 600.0) -> Run:
    """One QEMU loopback migration of the guest: precopy, postcopy once the first pass over RAM
    is done, to completion."""
    for f in ("src.sock", "dst.sock", "trace.log"):
        (workdir / f).unlink(missing_ok=True)
    events = workdir / "events"
    events.write_text("postcopy_ram_fault_thread_request\npostcopy_place_page\npostcopy_place_page_zero\n")
    common = [QEMU, "-accel", accel, "-m", f"{mem_bytes >> 20}M", "-smp", "1", "-nodefaults", "-display", "none",
              "-drive", f"file={image},format=raw,if=ide,file.locking=off"]
    port = free_port()
    procs = [
        subprocess.Popen(common + ["-qmp", f"unix:{workdir / 'dst.sock'},server=on,wait=off", "-incoming", "defer",
                                   "-trace", f"events={events},file={workdir / 'trace.log'}", "-msg", "timestamp=on"],
                         stderr=subprocess.DEVNULL),
        subprocess.Popen(common + ["-qmp", f"unix:{workdir / 'src.sock'},server=on,wait=off"],
                         stderr=subprocess.DEVNULL),
    ]
    try:
        dst, src = Qmp(workdir / "dst.sock"), Qmp(workdir / "src.sock")
        caps = [{"capability": "postcopy-ram", "state": True}]
        src("migrate-set-capabilities", capabilities=caps)
        dst("migrate-set-capabilities", capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
        dst("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")

        def passes() -> int:  # the guest's pass counter: the byte it increments at GUEST_START
            return int(src.hmp(f"xp /1xb {GUEST_START:#x}").split()[1], 16)

        end = time.monotonic() + timeout
        while passes() < 2:  # booted, and every page written at least once
            if time.monotonic() > end:
                raise RuntimeError("the QEMU guest did not start writing")
            time.sleep(0.05)
        p0, t0 = passes(), time.monotonic()
        time.sleep(1.0)
        p1, t1 = passes(), time.monotonic()
        rate = ((p1 - p0) % 256) / (t1 - t0) * ((mem_bytes - GUEST_START) // 4096)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        postcopy = False

        def switch(info: dict[str, Any]) -> None:  # to postcopy once the first pass is done
            nonlocal postcopy
            if not postcopy and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                src("migrate-start-postcopy")
                postcopy = True

        info = await_migration(src, end, switch)
        dinfo = dst("query-migrate")
        for m in (src, dst):
            try:
                m("quit")
            except (RuntimeError, OSError):
                pass
            m.close()
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    lat = request_to_placed_us((workdir / "trace.log").read_text(errors="replace"))
    return Run(total_ms=float(info.get("total-time", 0)), downtime_ms=float(info.get("downtime", 0)),
               blocktime_ms=float(dinfo.get("postcopy-blocktime", 0)), requests=len(lat),
               request_p50_us=_quantile(lat, 0.5), request_p99_us=_quantile(lat, 0.99),
               request_max_us=max(lat, default=0.0), dirty_rate=rate,
               extra={"postcopy_requests": info.get("ram", {}).get("postcopy-requests", 0)})


def run_livemig(mem_bytes: int, rate: float, extra_args: Sequence[str] = ()) -> Run:
    """One ``livemig migrate`` of the increment workload (postcopy after one round), as a user
    would run it; figures from its --json."""
    cmd = [sys.executable, "-m", "livemig", "migrate", "--size", f"{mem_bytes >> 20}M", "--workload", "increment",
           "--dirty-rate", f"{rate:.0f}", "--postcopy", "--postcopy-after", "1", "--json", *extra_args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    pc = r["postcopy"]
    req = pc.get("request_latency_us", {})
    return Run(total_ms=r["total_ms"], downtime_ms=r["downtime_ms"], blocktime_ms=pc.get("blocked_total_ms", 0.0),
               requests=int(req.get("count", 0)), request_p50_us=req.get("p50", 0.0),
               request_p99_us=req.get("p99", 0.0), request_max_us=req.get("max", 0.0), dirty_rate=rate,
               extra={"fault_latency_us": pc.get("fault_latency_us", {}), "blocked_us": pc.get("blocked_us", {})})


#: The compared figures: (label, Run attribute, goal as the largest livemig/QEMU ratio, or None).
FIGURES: list[tuple[str, str, float | None]] = [
    ("total time (ms)", "total_ms", None),
    ("downtime (ms)", "downtime_ms", None),
    ("postcopy requests", "requests", None),
    ("request to placed p50 (us)", "request_p50_us", 0.5),
    ("request to placed p99 (us)", "request_p99_us", 0.5),
    ("request to placed max (us)", "request_max_us", 0.1),
    ("blocktime (ms)", "blocktime_ms", None),
]


def report(qemu: list[Run], livemig: list[Run], say: Callable[[str], None] = print) -> bool:
    """Prints every run and the medians with livemig/QEMU ratios; True when every goal is met."""
    say(f"{'run':<10}" + "".join(f"{label:>28}" for label, _, _ in FIGURES))
    for name, runs in (("qemu", qemu), ("livemig", livemig)):
        for i, r in enumerate(runs):
            say(f"{name + ' ' + str(i + 1):<10}" + "".join(f"{getattr(r, a):>28,.1f}" for _, a, _ in FIGURES))
    ok = True
    say("")
    say(f"{'figure':<28}{'QEMU median':>14}{'livemig median':>16}{'ratio':>9}  goal")
    for label, attr, goal in FIGURES:
        q = statistics.median(getattr(r, attr) for r in qemu)
        lm = statistics.median(getattr(r, attr) for r in livemig)
        if attr == "request_max_us":  # the worst over all runs, not a median
            q, lm = max(r.request_max_us for r in qemu), max(r.request_max_us for r in livemig)
        ratio = lm / q if q else float("inf")
        verdict = ""
        if goal is not None:
            met = ratio <= goal
            ok = ok and met
            verdict = f"<= {goal:g}: {'met' if met else 'NOT met'}"
        say(f"{label:<28}{q:>14,.1f}{lm:>16,.1f}{ratio:>9.3f}  {verdict}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare_qemu", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="postcopy", choices=["postcopy", "precopy"],
                   help="postcopy (default): the fault path; precopy: idle and light-writer guests (issue 21)")
    p.add_argument("--size", default=None,
                   help="guest memory, MiB with an M suffix (default 256M); precopy: a list of M or G sizes"
                   " (default 1G,4G)")
    p.add_argument("--runs", type=int, default=3, help="migrations of each, alternated (default 3)")
    p.add_argument("--accel", default="tcg", choices=["tcg", "kvm"],
                   help="QEMU accelerator (default tcg: a nested /dev/kvm may be too slow to boot)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="livemig's dirty rate in pages/s (default: what the QEMU guest did in the same round);"
                   " precopy: the writer's rate on both sides (default 2000)")
    p.add_argument("--guest", default="idle,writer",
                   help="precopy: idle, writer or both (default idle,writer; every size runs each)")
    p.add_argument("--downtime-limit", type=float, default=300.0,
                   help="precopy: the downtime limit in ms given to both (default 300, both engines' default)")
    p.add_argument("--no-warmup", action="store_true",
                   help="precopy: no uncounted migration of each engine at the largest size first")
    p.add_argument("--keep", help="keep QEMU's trace logs (precopy: the guest images) in this directory")
    a = p.parse_args(argv)
    if a.mode == "precopy":
        return precopy_main(p, a)
    a.size = a.size or "256M"
    if not re.fullmatch(r"[1-9][0-9]*M", a.size) or a.runs < 1:
        p.error("--size takes MiB like 256M, --runs at least 1")
    mem = int(a.size[:-1]) << 20
    if mem <= 2 * GUEST_START:
        p.error("--size must be above 2 MiB")
    why = missing_tools()
    if why is not None:
        print(f"compare_qemu: skipped: {why}")
        return 0
    qemu_runs: list[Run] = []
    livemig_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="livemig-qemu-") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        image = build_guest(work, mem)
        for i in range(a.runs):
            q = run_qemu(work, image, mem, a.accel)
            if a.keep:
                os.replace(work / "trace.log", work / f"trace-{i + 1}.log")
            qemu_runs.append(q)
            print(f"qemu {i + 1}: {q.total_ms:.0f} ms, {q.requests} requests, guest {q.dirty_rate:,.0f} pages/s",
                  flush=True)
            lm = run_livemig(mem, a.rate or q.dirty_rate)
            livemig_runs.append(lm)
            print(f"livemig {i + 1}: {lm.total_ms:.0f} ms, {lm.requests} requests", flush=True)
    print()
    print(f"{a.size} guest, {a.runs} runs each, alternated; QEMU {a.accel}, postcopy after the first round")
    return 0 if report(qemu_runs, livemig_runs) else 1


__all__ = ["GUEST_ASM", "Qmp", "Run", "build_guest", "main", "missing_tools", "report", "request_to_placed_us",
           "run_livemig", "run_qemu"]
