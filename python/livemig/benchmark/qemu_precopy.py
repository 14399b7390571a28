"""livemig beside QEMU on precopy (``bench/compare_qemu.py --mode precopy``): QEMU's own loopback
precopy migration of a boot-sector guest (:mod:`livemig.benchmark.qemu_precopy_guest`), idle or
with a light writer, and ``livemig migrate`` of its model guest at the same size, the same touched
state (every page written once before migrating) and the same rate, alternated.

The writer's PIT divisor is calibrated at run time from the guest's page counter
(:func:`calibrate`), and each run reports the rate the guest kept while it migrated: QEMU's from
the counter read on the source before ``migrate`` and on the destination after, livemig's from its
workload's ``pages_written`` over its total time. QEMU's bandwidth is unlimited, its downtime
limit the one given to livemig (default 300 ms, both engines' default); one channel on each side
(no multifd), no postcopy, no free page hinting."""

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

from livemig.benchmark.baselines import Baselines
from livemig.benchmark.qemu_precopy_guest import (
    COUNTER,
    GIB,
    LOW_LIMIT,
    PHASE,
    build_precopy_guest,
    pace_for,
    set_pace,
)
from livemig.benchmark.qemu_vm import (
    GUEST_START,
    QEMU,
    Qmp,
    await_migration,
    free_port,
    missing_tools,
)

#: The goals of issue 21 (livemig total / QEMU total at most this), by guest size.
GOALS = {1 * GIB: 0.2, 4 * GIB: 0.25}


@dataclass
class PrecopyRun:
    """One precopy migration's figures."""

    total_ms: float
    downtime_ms: float
    rate: float = 0.0  #: the guest's pages/s while it migrated (0: idle)
    resumed_ms: float = 0.0  #: until the destination ran (QEMU: its total; 0: unknown)
    extra: dict[str, Any] = field(default_factory=dict)


class _Vm:
    """One QEMU process with its QMP socket (``name``.sock in ``workdir``)."""

    def __init__(self, workdir: Path, name: str, image: Path, mem_bytes: int, accel: str, *extra: str) -> None:
        sock = workdir / f"{name}.sock"
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [QEMU, "-accel", accel, "-machine", f"pc,max-ram-below-4g={LOW_LIMIT}", "-m", f"{mem_bytes >> 20}M",
             "-smp", "1", "-nodefaults", "-display", "none",
             "-drive", f"file={image},format=raw,if=ide,file.locking=off",
             "-qmp", f"unix:{sock},server=on,wait=off", *extra], stderr=subprocess.DEVNULL)
        try:
            self.qmp = Qmp(sock)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def read(self, addr: int, fmt: str = "b") -> int:
        """A byte (``b``) or u64 (``g``) of guest memory."""
        return int(self.qmp.hmp(f"xp /1{fmt}x {addr:#x}").split()[1], 16)

    def wait_touched(self, deadline: float) -> None:
        while self.read(PHASE) != 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the QEMU guest did not finish its first pass over its memory in time")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.qmp("quit")
        except (RuntimeError, OSError):
            pass
        self.qmp.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def calibrate(workdir: Path, image: Path, accel: str, rate: float, seconds: float = 2.0,
              timeout: float = 120.0) -> tuple[int, int, float]:
    """Boots the writer (its image at 64 MiB) and corrects the PIT divisor once from the counter;
    returns (divisor, pages per tick, pages/s measured with it)."""
    divisor, ppt = pace_for(rate)
    measured = 0.0
    for attempt in range(2):
        set_pace(image, divisor, ppt)
        vm = _Vm(workdir, "cal", image, 64 << 20, accel)
        try:
            vm.wait_touched(time.monotonic() + timeout)
            c0, t0 = vm.read(COUNTER, "g"), time.monotonic()
            time.sleep(seconds)  # the sampling window, not a synchronisation
            c1, t1 = vm.read(COUNTER, "g"), time.monotonic()
        finally:
            vm.close()
        measured = (c1 - c0) / (t1 - t0)
        if attempt == 1 or measured <= 0 or abs(measured / rate - 1) < 0.05:
            break
        divisor = max(1, min(0xFFFF, round(divisor * measured / rate)))
    return divisor, ppt, measured


def run_qemu_precopy(workdir: Path, image: Path, mem_bytes: int, accel: str, downtime_limit_ms: float,
                     writer: bool, timeout: float = 900.0) -> PrecopyRun:
    """One QEMU loopback precopy migration of the guest (its pace already in ``image``), once its
    first pass is done: bandwidth unlimited, ``downtime_limit_ms``, no postcopy."""
    end = time.monotonic() + timeout
    port = free_port()
    vms: list[_Vm] = []
    try:
        dst = _Vm(workdir, "dst", image, mem_bytes, accel, "-incoming", "defer")
        vms.append(dst)
        src = _Vm(workdir, "src", image, mem_bytes, accel)
        vms.append(src)
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": round(downtime_limit_ms)})
        dst.qmp("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.wait_touched(end)
        c0, t0 = src.read(COUNTER, "g"), time.monotonic()
        src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = await_migration(src.qmp, end)
        c1, t1 = dst.read(COUNTER, "g"), time.monotonic()  # the guest runs on at the destination
    finally:
        for vm in vms:
            vm.close()
    ram = info.get("ram", {})
    total = float(info.get("total-time", 0))
    return PrecopyRun(total_ms=total, downtime_ms=float(info.get("downtime", 0)), resumed_ms=total,
                      rate=(c1 - c0) / (t1 - t0) if writer else 0.0,
                      extra={"rounds": ram.get("dirty-sync-count", 0), "transferred": ram.get("transferred", 0),
                             "setup_ms": info.get("setup-time", 0)})


def run_livemig_precopy(mem_bytes: int, rate: float, downtime_limit_ms: float) -> PrecopyRun:
    """One ``livemig migrate`` precopy of the model guest: idle, or the increment writer (address
    order, like the QEMU guest) at ``rate``; every page filled first, no hints (QEMU has none)."""
    workload = ["--workload", "increment", "--dirty-rate", f"{rate:g}"] if rate > 0 else ["--workload", "idle"]
    cmd = [sys.executable, "-m", "livemig", "migrate", "--size", f"{mem_bytes >> 20}M", *workload,
           "--fill", "pattern", "--no-hints", "--downtime-limit", f"{downtime_limit_ms:g}", "--json", "--quiet",
           "--no-progress"]
    return livemig_run(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))


def livemig_run(r: dict[str, Any]) -> PrecopyRun:
    """A ``livemig migrate --json`` report as a run: the rate is the median of its rounds' measured
    dirty rates; ``resumed_ms`` is when its last round ended plus the downtime (the total goes on
    while the destination reports: its settle and the guest's check)."""
    rounds = r.get("rounds") or []
    end_s = max((x["started_s"] + x["seconds"] for x in rounds), default=0.0)
    return PrecopyRun(total_ms=r["total_ms"], downtime_ms=r["downtime_ms"],
                      rate=statistics.median(x.get("dirty_rate_pps", 0.0) for x in rounds) if rounds else 0.0,
                      resumed_ms=end_s * 1e3 + r["downtime_ms"] if rounds else 0.0,
                      extra={"rounds": r.get("precopy_rounds", 0), "transferred": r.get("bytes_sent", 0),
                             "downtime_split": r.get("downtime_split", {})})


def goal_for(mem_bytes: int) -> float | None:
    """Issue 21's largest livemig/QEMU total-time ratio for this size, or None (no goal)."""
    return GOALS.get(mem_bytes)


def size_text(mem_bytes: int) -> str:
    return f"{mem_bytes // GIB}G" if mem_bytes % GIB == 0 else f"{mem_bytes >> 20}M"


@dataclass
class Case:
    """One size and guest, with its runs on each side."""

    mem_bytes: int
    writer: bool
    qemu: list[PrecopyRun] = field(default_factory=list)
    livemig: list[PrecopyRun] = field(default_factory=list)
    fresh_ms: list[float] = field(default_factory=list)  #: a raw loopback copy of the size into fresh memory
    warm_ms: list[float] = field(default_factory=list)  #: the same into warm memory (no first touch)

    @property
    def name(self) -> str:
        return f"{size_text(self.mem_bytes)} {'writer' if self.writer else 'idle'}"


def _median(runs: Sequence[PrecopyRun], attr: str) -> float:
    return statistics.median(float(getattr(r, attr)) for r in runs)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report_precopy(cases: Sequence[Case], say: Callable[[str], None] = print) -> bool:
    """Prints each case's runs and medians with livemig/QEMU ratios and the goals (on the total
    times); True when every goal is met."""
    ok = True
    say(f"{'case':<12}{'engine':<9}{'total ms':>10}{'resumed ms':>12}{'downtime ms':>13}{'pages/s':>9}{'rounds':>8}"
        "  runs (total ms)")
    for c in cases:
        for name, runs in (("QEMU", c.qemu), ("livemig", c.livemig)):
            rounds = statistics.median(r.extra.get("rounds", 0) for r in runs)
            each = ", ".join(f"{r.total_ms:,.0f}" for r in runs)
            say(f"{c.name:<12}{name:<9}{_median(runs, 'total_ms'):>10,.0f}{_median(runs, 'resumed_ms'):>12,.0f}"
                f"{_median(runs, 'downtime_ms'):>13,.1f}{_median(runs, 'rate'):>9,.0f}{rounds:>8g}  {each}")
    say("")
    say(f"{'case':<12}{'total':>8}{'resumed':>9}{'downtime':>10}{'goal ms':>9}{'raw copy fresh/warm ms':>24}"
        "  goal (total, livemig/QEMU)")
    for c in cases:
        q = _median(c.qemu, "total_ms")
        ratio = _ratio(_median(c.livemig, "total_ms"), q)
        resumed = _ratio(_median(c.livemig, "resumed_ms"), _median(c.qemu, "resumed_ms"))
        down = _ratio(_median(c.livemig, "downtime_ms"), _median(c.qemu, "downtime_ms"))
        goal = goal_for(c.mem_bytes)
        verdict, goal_ms = "no goal at this size", "-"
        if goal is not None:
            met = ratio <= goal
            ok = ok and met
            verdict, goal_ms = f"<= {goal:g}: {'met' if met else 'NOT met'}", f"{goal * q:,.0f}"
        raw = f"{statistics.median(c.fresh_ms):,.0f} / {statistics.median(c.warm_ms):,.0f}" if c.warm_ms else "-"
        say(f"{c.name:<12}{ratio:>8.3f}{resumed:>9.3f}{down:>10.3f}{goal_ms:>9}{raw:>24}  {verdict}")
    return ok


def parse_sizes(text: str) -> list[int]:
    """``1G,4096M`` as bytes; ValueError for anything else (MiB or GiB, above 2 MiB, at most 8 GiB)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not re.fullmatch(r"[1-9][0-9]*[MG]", part):
            raise ValueError(f"size {part!r}: MiB or GiB like 1024M or 4G")
        n = int(part[:-1]) << (30 if part[-1] == "G" else 20)
        if not 2 * GUEST_START < n <= 8 * GIB:
            raise ValueError(f"size {part!r}: above 2M and at most 8G (the guest maps 16 GiB)")
        out.append(n)
    return out


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def run_precopy(sizes: Sequence[int], guests: Sequence[str], runs: int, accel: str, rate: float,
                downtime_limit_ms: float, work: Path, warmup: bool = True) -> int:
    """The precopy comparison (``--mode precopy``): every size with every guest, ``runs`` times
    each engine, alternated, each pair after a raw loopback copy of the size into fresh and into
    warm memory (the floor); with ``warmup``, one uncounted migration of each engine at the largest
    size first. Prints the report; 0 when every goal is met, 1 otherwise."""
    load0 = os.getloadavg()
    divisor = ppt = 0
    if "writer" in guests:
        divisor, ppt = pace_for(rate)
        cal = build_precopy_guest(work, 64 << 20)
        divisor, ppt, measured = calibrate(work, cal, accel, rate)
        print(f"writer calibrated: PIT divisor {divisor}, {ppt} pages per tick, {measured:,.0f} pages/s", flush=True)
    cases = [Case(m, g == "writer") for m in sizes for g in guests]
    raw = Baselines()
    if warmup:  # the host's first use of memory is slower than the rest: neither engine pays it
        image = build_precopy_guest(work, max(sizes))
        set_pace(image, 0, 0)
        w = [run_qemu_precopy(work, image, max(sizes), accel, downtime_limit_ms, False),
             run_livemig_precopy(max(sizes), 0.0, downtime_limit_ms)]
        print(f"warm-up at {size_text(max(sizes))} idle (not counted): QEMU {w[0].total_ms:,.0f} ms,"
              f" livemig {w[1].total_ms:,.0f} ms", flush=True)
    for c in cases:
        image = build_precopy_guest(work, c.mem_bytes)
        set_pace(image, divisor if c.writer else 0, ppt if c.writer else 0)
        for i in range(runs):
            c.fresh_ms.append(c.mem_bytes / raw.socket_copy_gbps(c.mem_bytes) / 1e6)
            c.warm_ms.append(c.mem_bytes / raw.socket_copy_warm_gbps(c.mem_bytes) / 1e6)
            for engine in (("qemu", "livemig") if i % 2 == 0 else ("livemig", "qemu")):
                if engine == "qemu":
                    r = run_qemu_precopy(work, image, c.mem_bytes, accel, downtime_limit_ms, c.writer)
                    c.qemu.append(r)
                else:
                    r = run_livemig_precopy(c.mem_bytes, rate if c.writer else 0.0, downtime_limit_ms)
                    c.livemig.append(r)
                print(f"{c.name} {engine} {i + 1}: {r.total_ms:,.0f} ms (resumed at {r.resumed_ms:,.0f}),"
                      f" downtime {r.downtime_ms:.1f} ms,"
                      f" {r.rate:,.0f} pages/s, {r.extra.get('rounds', 0)} rounds", flush=True)
    print()
    print(f"{runs} runs each, alternated (the first engine swaps every run), each pair after a raw loopback copy"
          f" into fresh and into warm memory; QEMU {accel}, max-bandwidth unlimited,"
          f" downtime limit {downtime_limit_ms:g} ms on both; writer target {rate:g} pages/s;"
          f" load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 0 if report_precopy(cases) else 1


def precopy_main(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """``--mode precopy`` of compare_qemu's parser: checks its arguments and runs the comparison."""
    try:
        sizes = parse_sizes(a.size or "1G,4G")
    except ValueError as e:
        p.error(f"--size: {e}")
    guests = a.guest.split(",")
    if a.runs < 1 or not guests or any(g not in ("idle", "writer") for g in guests):
        p.error("--runs at least 1, --guest idle, writer or idle,writer")
    rate = a.rate or 2000.0
    try:
        pace_for(rate)
    except ValueError as e:
        p.error(f"--rate: {e}")
    if not 0 < a.downtime_limit <= 2_000_000:
        p.error("--downtime-limit takes milliseconds in (0, 2000000]")
    why = missing_tools()
    if why is not None:
        print(f"compare_qemu: skipped: {why}")
        return 0
    need, avail = 2 * max(sizes) + (1 << 30), mem_available()
    if avail and need > avail:
        print(f"compare_qemu: {max(sizes) >> 20} MiB needs about {need >> 20} MiB free (two guests), this machine has"
              f" {avail >> 20} MiB available", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="livemig-qemu-") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        return run_precopy(sizes, guests, a.runs, a.accel, rate, a.downtime_limit, work, not a.no_warmup)


__all__ = [
    "GOALS",
    "Case",
    "PrecopyRun",
    "calibrate",
    "goal_for",
    "livemig_run",
    "mem_available",
    "parse_sizes",
    "precopy_main",
    "report_precopy",
    "run_livemig_precopy",
    "run_precopy",
    "run_qemu_precopy",
]
