"""The performance report behind ``livemig bench``.

Every engine figure stands beside a raw baseline measured in the same run, on this machine, and is
reported as a ratio (``value / baseline``), with the spread (min and max) of its runs. The raw
baselines are the C++ loops the bench/ suite uses (``_core.dest_bench``, ``_core._source_bench``,
``_core.wire_bench_*``) and numpy; nothing per page runs in Python. Memory is warmed before timing:
every source buffer is written first, and a baseline receives into memory in the same state as
the engine's destination (see :class:`Baselines`).

Scenarios are data (:func:`scenarios`); :class:`Bench` runs them and returns a :class:`Report`.
"""

from __future__ import annotations

import fnmatch
import math
import mmap
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.guest import GuestConfig, Workload
from livemig.loopback import migrate_locally
from livemig.migration import DestinationConfig, MigrationConfig, MigrationResult

PAGE = mmap.PAGESIZE
MIB = 1 << 20
GIB = 1 << 30
Better = Literal["higher", "lower"]

#: Groups, in report order.
GROUPS = ("baselines", "migration", "zero", "hints", "faults", "channels", "scaling", "bitmap")
#: Bitmap sizes in pages: 1 GiB, 16 GiB, 128 GiB and 1 TiB regions of 4 KiB pages.
BITMAP_PAGES = (1 << 18, 1 << 22, 1 << 25, 1 << 28)
#: Bytes of one request and of its answer on the wire (header + page), for the ping-pong baseline.
REQUEST_BYTES = 24
REPLY_BYTES = 24 + PAGE
#: How a figure's error starts when the kernel cannot run its scenario (not a failure).
SKIPPED = "skipped: "
#: Seconds either side of a benchmark migration waits for a silent peer.
PEER_TIMEOUT_S = 120.0


# ---- figures ----


@dataclass(frozen=True)
class Stat:
    """The median of some runs and their spread."""

    median: float
    lo: float
    hi: float
    runs: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, xs: Iterable[float]) -> Stat:
        v = [float(x) for x in xs]
        if not v:
            raise ValueError("no samples")
        return cls(statistics.median(v), min(v), max(v), len(v), tuple(v))


@dataclass
class Figure:
    """One figure of the report: the engine's value beside its raw baseline, or a baseline itself
    (group ``baselines``: ``baseline`` and ``ratio`` are None)."""

    name: str
    group: str
    unit: str
    value: float | None  #: the median over ``runs``
    spread: tuple[float, float] | None  #: (min, max) over the runs
    runs: int
    better: Better
    baseline: float | None = None  #: the baseline's median, same unit, measured in this run
    baseline_name: str | None = None
    baseline_spread: tuple[float, float] | None = None
    ratio: float | None = None  #: value / baseline
    goal: str | None = None  #: the goal, in words
    goal_ratio: float | None = (
        None  #: the bound on ratio (at least it when better is higher, else at most)
    )
    met: bool | None = None  #: ratio within goal_ratio (None: no goal)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  #: why the figure has no value (SKIPPED: the kernel cannot run it)
    samples: list[float] = field(default_factory=list)  #: every run's value
    baseline_samples: list[float] = field(default_factory=list)  #: every run of the baseline

    @property
    def is_baseline(self) -> bool:
        return self.group == "baselines"


def engine_figure(
    name: str,
    group: str,
    unit: str,
    better: Better,
    value: Stat,
    baseline: Stat,
    baseline_name: str,
    goal: str | None = None,
    goal_ratio: float | None = None,
    **details: Any,
) -> Figure:
    """An engine figure: its ratio to the baseline and whether it meets its goal."""
    ratio = value.median / baseline.median if baseline.median else math.inf
    met = None
    if goal_ratio is not None:
        met = ratio >= goal_ratio if better == "higher" else ratio <= goal_ratio
    return Figure(
        name,
        group,
        unit,
        value.median,
        (value.lo, value.hi),
        value.runs,
        better,
        baseline.median,
        baseline_name,
        (baseline.lo, baseline.hi),
        ratio,
        goal,
        goal_ratio,
        met,
        details,
        samples=list(value.samples),
        baseline_samples=list(baseline.samples),
    )


def baseline_figure(name: str, unit: str, better: Better, s: Stat, **details: Any) -> Figure:
    return Figure(
        name,
        "baselines",
        unit,
        s.median,
        (s.lo, s.hi),
        s.runs,
        better,
        details=details,
        samples=list(s.samples),
    )


def failed_figure(name: str, group: str, error: str) -> Figure:
    return Figure(name, group, "", None, None, 0, "higher", error=error)


# ---- scenarios ----


@dataclass(frozen=True)
class Scenario:
    """One measurement: ``kind`` names the runner, ``args`` its arguments."""

    name: str
    group: str
    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


def size_label(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def scenarios(sizes: Sequence[int], quick: bool = False) -> list[Scenario]:
    """The standard scenarios for these region sizes (quick: one workload per mode, smaller
    fault and hint sets; the bitmap figures always go up to 1 TiB)."""
    out: list[Scenario] = [Scenario("baselines", "baselines", "baselines", (("size", min(sizes)),))]
    workloads = ("idle", "random") if quick else ("idle", "random", "hotset")
    for size in sizes:
        s = size_label(size)
        for mode in ("precopy", "postcopy"):
            for w in workloads:
                out.append(
                    Scenario(
                        f"{mode}-{w}-{s}",
                        "migration",
                        "migration",
                        (("size", size), ("mode", mode), ("workload", w)),
                    )
                )
    small = min(sizes)
    s = size_label(small)
    out.append(Scenario(f"zero-pages-{s}", "zero", "zero", (("size", small),)))
    for free in (0.0, 0.5, 0.9):
        out.append(
            Scenario(
                f"hints-{int(free * 100)}pct-free-{s}",
                "hints",
                "hints",
                (("size", small), ("free", free)),
            )
        )
    for access in ("sequential", "random"):
        for urgent in (True, False):
            name = f"faults-{access}-{'urgent' if urgent else 'no-urgent'}-{s}"
            out.append(
                Scenario(
                    name,
                    "faults",
                    "faults",
                    (("size", small), ("access", access), ("urgent", urgent)),
                )
            )
    for n in (1, 2, 4):
        out.append(
            Scenario(
                f"channels-{n}-{s}", "channels", "channels", (("size", small), ("channels", n))
            )
        )
    for size in sizes:
        out.append(Scenario(f"sync-{size_label(size)}", "scaling", "sync", (("size", size),)))
    for pages in BITMAP_PAGES:
        out.append(
            Scenario(f"bitmap-{size_label(pages * PAGE)}", "bitmap", "bitmap", (("pages", pages),))
        )
    return out


def needs_postcopy(sc: Scenario) -> bool:
    """The scenario runs a postcopy migration (userfaultfd on the destination)."""
    return sc.kind == "faults" or (sc.kind == "migration" and sc.arg("mode") == "postcopy")


def select(all_scenarios: Sequence[Scenario], patterns: Sequence[str]) -> list[Scenario]:
    """The scenarios whose name or group matches one of the shell patterns (all when none)."""
    if not patterns:
        return list(all_scenarios)
    return [
        s
        for s in all_scenarios
        if any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.group, p) for p in patterns)
    ]


# ---- raw baselines (C++ loops and numpy; samples kept per key for the baselines group) ----


def _warm(n: int, value: int = 0x5A) -> npt.NDArray[np.uint8]:
    """n bytes, every page written (no first-touch faults in what is timed)."""
    a = np.empty(n, dtype=np.uint8)
    a.fill(value)
    return a


def _tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected loopback TCP pairs, TCP_NODELAY like the wire's."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outs, ins = [], []
        for _ in range(n):
            c = socket.create_connection(srv.getsockname())
            s, _ = srv.accept()
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            outs.append(c)
            ins.append(s)
    return outs, ins


def _parallel(jobs: list[Callable[[], object]]) -> float:
    """Runs the jobs in threads (each releases the GIL in C++); seconds until all are done."""
    errors: list[BaseException] = []

    def guard(j: Callable[[], object]) -> None:
        try:
            j()
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(j,)) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return secs


class Baselines:
    """The raw baselines. Each call measures once more and keeps the sample under its key, so a
    scenario can interleave baseline and engine runs; :meth:`figures` summarises every key."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.units: dict[str, tuple[str, Better, str]] = {}

    def _keep(self, key: str, unit: str, better: Better, how: str, value: float) -> float:
        self.samples.setdefault(key, []).append(value)
        self.units[key] = (unit, better, how)
        return value

    def socket_copy_gbps(self, nbytes: int, channels: int = 1) -> float:
        """GB/s moving nbytes from a warm buffer over ``channels`` loopback TCP streams (1 MiB
        sendmsg / MSG_WAITALL recv calls, in C++) into a freshly mapped buffer: like a migration's
        destination, the receiver pays the first touch of every page."""
        src = _warm(nbytes)
        dst = mmap.mmap(-1, nbytes)
        view = memoryview(dst)
        source = src.data
        outs, ins = _tcp_pairs(channels)
        bounds = [nbytes * i // channels // PAGE * PAGE for i in range(channels)] + [nbytes]
        jobs: list[Callable[[], object]] = []

        def send(fd: int, v: memoryview) -> Callable[[], object]:
            return lambda: _core.wire_bench_raw_send(fd, v)

        def recv(fd: int, v: memoryview) -> Callable[[], object]:
            return lambda: _core.wire_bench_raw_recv(fd, v)

        for i in range(channels):
            a, b = bounds[i], bounds[i + 1]
            jobs.append(send(outs[i].fileno(), source[a:b]))
            jobs.append(recv(ins[i].fileno(), view[a:b]))
        try:
            secs = _parallel(jobs)
            if dst[nbytes - 1] != 0x5A:
                raise RuntimeError("raw socket copy: the last byte did not arrive")
        finally:
            for s in outs + ins:
                s.close()
            jobs.clear()  # the lambdas hold slices of the view
            view.release()
            dst.close()
        how = f"{channels} loopback TCP stream(s), warm source, fresh destination"
        return self._keep(
            f"raw socket copy x{channels} {size_label(nbytes)}",
            "GB/s",
            "higher",
            how,
            nbytes / secs / 1e9,
        )

    def socket_copy_warm_gbps(self, nbytes: int) -> float:
        """Like socket_copy_gbps with one stream, into a warm destination buffer."""
        src, dst = _warm(nbytes), _warm(nbytes, 0)
        outs, ins = _tcp_pairs(1)
        try:
            secs = _parallel(
                [
                    lambda: _core.wire_bench_raw_send(outs[0].fileno(), src.data),
                    lambda: _core.wire_bench_raw_recv(ins[0].fileno(), dst.data),
                ]
            )
        finally:
            for s in outs + ins:
                s.close()
        return self._keep(
            f"raw socket copy, warm destination {size_label(nbytes)}",
            "GB/s",
            "higher",
            "1 loopback TCP stream, both buffers warm",
            nbytes / secs / 1e9,
        )

    def memcpy_gbps(self, nbytes: int) -> float:
        """GB/s of a memcpy between two warm buffers (numpy.copyto)."""
        src, dst = _warm(nbytes), _warm(nbytes, 0)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        secs = time.perf_counter() - t0
        return self._keep(
            f"memcpy {size_label(nbytes)}",
            "GB/s",
            "higher",
            "numpy.copyto, warm buffers",
            nbytes / secs / 1e9,
        )

    def first_touch_gbps(self, nbytes: int) -> float:
        """GB/s writing a freshly mapped buffer (every page faulted in): what warming avoids."""
        m = mmap.mmap(-1, nbytes)
        a = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        a.fill(1)
        secs = time.perf_counter() - t0
        del a
        m.close()
        return self._keep(
            f"first touch {size_label(nbytes)}",
            "GB/s",
            "higher",
            "numpy fill of a fresh mapping",
            nbytes / secs / 1e9,
        )

    def read_gbps(self, nbytes: int) -> float:
        """GB/s reading a warm buffer (C++ loop, _source_bench.read_bandwidth)."""
        a = _warm(nbytes)
        t0 = time.perf_counter()
        _core._source_bench.read_bandwidth(a.ctypes.data, nbytes)
        secs = time.perf_counter() - t0
        return self._keep(
            f"memory read {size_label(nbytes)}",
            "GB/s",
            "higher",
            "C++ read loop, warm buffer",
            nbytes / secs / 1e9,
        )

    def uffd_copy_us(self, nbytes: int = 64 * MIB) -> float:
        """Microseconds per page of a bare UFFDIO_COPY loop, one page per ioctl, warm source."""
        raw = _core.dest_bench.RawCopy(nbytes)
        raw.run(1)  # warm-up: page tables, allocator
        secs = raw.run(1)
        return self._keep(
            "raw UFFDIO_COPY, 1 page",
            "us",
            "lower",
            "bare userfaultfd, one page per ioctl, warm source",
            secs / (nbytes // PAGE) * 1e6,
        )

    def pingpong_us(self, iters: int = 2000) -> float:
        """p50 microseconds of a raw loopback TCP ping-pong: 24 bytes out, a header and a page
        back."""
        outs, ins = _tcp_pairs(1)
        box: list[int] = []
        server = threading.Thread(
            target=lambda: box.append(
                _core.wire_bench_raw_pingpong_server(ins[0].fileno(), REQUEST_BYTES, REPLY_BYTES)
            )
        )
        server.start()
        try:
            rtts = _core.wire_bench_raw_pingpong_client(
                outs[0].fileno(), REQUEST_BYTES, REPLY_BYTES, iters
            )
        finally:
            outs[0].shutdown(socket.SHUT_WR)
            server.join()
            for s in outs + ins:
                s.close()
        p50 = float(np.percentile(rtts, 50)) / 1e3
        self._keep(
            "raw socket ping-pong p50",
            "us",
            "lower",
            f"loopback TCP, {REQUEST_BYTES} B out, {REPLY_BYTES} B back, {iters} round trips",
            p50,
        )
        return p50

    def figures(self) -> list[Figure]:
        out = []
        for key, xs in self.samples.items():
            unit, better, how = self.units[key]
            out.append(baseline_figure(key, unit, better, Stat.of(xs), how=how))
        return out


# ---- helpers on results ----


def histogram_quantile_us(buckets: Sequence[int], q: float) -> float:
    """Quantile q of a power-of-two microsecond histogram (bucket 0: [0, 1) us, bucket k:
    [2^(k-1), 2^k) us), interpolated linearly within the bucket that holds it; 0 when empty."""
    total = sum(buckets)
    if total == 0:
        return 0.0
    want = q * total
    seen = 0.0
    for k, n in enumerate(buckets):
        if n and seen + n >= want:
            lo, hi = (0.0, 1.0) if k == 0 else (float(2 ** (k - 1)), float(2**k))
            return lo + (hi - lo) * (want - seen) / n
        seen += n
    return float(2 ** (len(buckets) - 1))


def first_round_gbps(r: MigrationResult) -> float:
    """The first precopy round's wire bandwidth (every page of the region goes in it)."""
    first = r.rounds[0]
    return first.bytes_sent / first.seconds / 1e9 if first.seconds > 0 else 0.0


# ---- the runner ----


StepFn = Callable[[str], None]


@dataclass
class Report:
    """What ``livemig bench`` measured; ``to_json()`` is its ``--json`` object."""

    figures: list[Figure]
    settings: dict[str, Any]
    machine: dict[str, Any]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "machine": self.machine,
            "seconds": self.seconds,
            "figures": [asdict(f) for f in self.figures],
        }


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPUs, memory, kernel, and who else was using the CPUs."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "loadavg_at_start": list(os.getloadavg()),
        "page_size": PAGE,
        "python": platform.python_version(),
    }


class Bench:
    """Runs scenarios: ``repeat`` runs of each migration, ``micro`` runs of each cheap loop."""

    def __init__(
        self,
        repeat: int = 3,
        micro: int = 5,
        settle_s: float = 0.5,
        deadline_s: float = 600.0,
        dirty_rate: float = 20000.0,
        step: StepFn | None = None,
    ) -> None:
        if repeat < 1 or micro < 1:
            raise ValueError("repeat and micro must be at least 1")
        self.repeat, self.micro = repeat, micro
        self.settle_s, self.deadline_s, self.dirty_rate = settle_s, deadline_s, dirty_rate
        self.step = step or (lambda _text: None)
        self.base = Baselines()

    # -- entry point --
    def run(self, chosen: Sequence[Scenario], settings: dict[str, Any] | None = None) -> Report:
        t0 = time.perf_counter()
        machine = machine_info()
        figures: list[Figure] = []
        no_postcopy: str | None = None
        if any(needs_postcopy(sc) for sc in chosen):
            from livemig.destination import postcopy_unsupported_reason

            no_postcopy = postcopy_unsupported_reason()
        for sc in chosen:
            self.step(sc.name)
            if no_postcopy is not None and needs_postcopy(sc):
                figures.append(failed_figure(sc.name, sc.group, f"{SKIPPED}{no_postcopy}"))
                continue
            try:
                figures.extend(getattr(self, f"_run_{sc.kind}")(sc))
            except Exception as e:  # noqa: BLE001 (one scenario failing does not lose the others)
                figures.append(failed_figure(sc.name, sc.group, f"{type(e).__name__}: {e}"))
        figures = self.base.figures() + figures
        order = {g: i for i, g in enumerate(GROUPS)}
        figures.sort(key=lambda f: order.get(f.group, len(order)))
        machine["loadavg_at_end"] = list(os.getloadavg())
        return Report(figures, dict(settings or {}), machine, time.perf_counter() - t0)

    def _migrate(self, size: int, guest: GuestConfig, config: MigrationConfig) -> MigrationResult:
        # The destination's silence timeout counts time between events, and a long first round
        # (4 GiB on a loaded machine) has none: allow two minutes, not the default 20 s.
        dest = DestinationConfig(timeout=PEER_TIMEOUT_S)
        config = replace(config, timeout=PEER_TIMEOUT_S)
        result, _ = migrate_locally(
            guest, config, size=size, dest=dest, settle_s=self.settle_s, deadline_s=self.deadline_s
        )
        if not result.ok:
            raise RuntimeError(f"migration failed: {result.error}")
        if result.verify is not None and result.verify.mismatches:
            raise RuntimeError(f"migration verified with {result.verify.mismatches} mismatches")
        return result

    # -- scenario kinds --
    def _run_baselines(self, sc: Scenario) -> list[Figure]:
        """The bandwidth and latency baselines not tied to one scenario."""
        n = min(int(sc.arg("size")), 256 * MIB)
        for _ in range(self.micro):
            self.base.memcpy_gbps(n)
            self.base.read_gbps(n)
            self.base.socket_copy_warm_gbps(n)
            self.base.uffd_copy_us()
            self.base.pingpong_us()
        for _ in range(min(self.micro, 3)):
            self.base.first_touch_gbps(n)
        return []

    def _run_migration(self, sc: Scenario) -> list[Figure]:
        size, mode, workload = int(sc.arg("size")), sc.arg("mode"), sc.arg("workload")
        guest = GuestConfig(
            workload=workload, rate=0.0 if workload == "idle" else self.dirty_rate, seed=1
        )
        config = MigrationConfig(postcopy=mode == "postcopy", hints=False, verify=True)
        eng, raw, warm, results = [], [], [], []
        for _ in range(self.repeat):
            raw.append(self.base.socket_copy_gbps(size))
            warm.append(self.base.socket_copy_warm_gbps(size))
            r = self._migrate(size, guest, config)
            results.append(r)
            eng.append(first_round_gbps(r))
        details = {
            "region_bytes": size,
            "workload": workload,
            "dirty_rate": guest.rate,
            "raw_copy_warm_destination_gbps": statistics.median(warm),
            "ratio_vs_warm_destination": statistics.median(eng) / statistics.median(warm),
            "downtime_ms": Stat.of(r.downtime_ms for r in results).median,
            "total_ms": Stat.of(r.total_ms for r in results).median,
            "precopy_rounds": Stat.of(r.precopy_rounds for r in results).median,
            "bytes_sent": Stat.of(r.bytes_sent for r in results).median,
        }
        if mode == "postcopy":
            details["requests"] = Stat.of(r.postcopy.requests for r in results).median
            details["fault_p50_us"] = Stat.of(
                histogram_quantile_us(r.postcopy.histogram, 0.5) for r in results
            ).median
        goal = "precopy >= 75% of a raw socket copy" if mode == "precopy" else None
        figs = [
            engine_figure(
                f"{sc.name} first round",
                "migration",
                "GB/s",
                "higher",
                Stat.of(eng),
                Stat.of(raw),
                f"raw socket copy {size_label(size)}",
                goal,
                0.75 if mode == "precopy" else None,
                **details,
            )
        ]
        if mode == "precopy" and workload == "idle":
            figs.append(self._switchover_figure(sc, size, results))
        return figs

    def _switchover_figure(self, sc: Scenario, size: int, results: list[MigrationResult]) -> Figure:
        """Downtime of an idle guest's precopy against its floor: one bare PAGEMAP_SCAN of the
        region (the final sync) plus one raw ping-pong (the device state and the resume ack)."""
        scan = self._bare_scans_ms(size, self.micro)
        ping = [self.base.pingpong_us(500) / 1e3 for _ in range(3)]
        floor = Stat.of(s + statistics.median(ping) for s in scan)
        return engine_figure(
            f"switchover-{size_label(size)} downtime",
            "scaling",
            "ms",
            "lower",
            Stat.of(r.downtime_ms for r in results),
            floor,
            "bare PAGEMAP_SCAN of the region + raw ping-pong",
            None,
            None,
            region_bytes=size,
            scan_ms=statistics.median(scan),
            pingpong_ms=statistics.median(ping),
        )

    @staticmethod
    def _bare_scans_ms(size: int, runs: int) -> list[float]:
        """Milliseconds of `runs` bare PAGEMAP_SCAN walks over a populated, tracked region with
        nothing written (what a final sync of an idle guest must do at least)."""
        from livemig.source import Source

        src = Source(size // PAGE)  # unmapped when the last reference goes
        _core._source_bench.touch_pages(src.address, src.pages, 1, 1)
        src.sync()
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            _core._source_bench.pagemap_scan_loop(src.address, src.nbytes, 1024)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def _run_zero(self, sc: Scenario) -> list[Figure]:
        """An all-zero idle guest: wire bytes per page against a page (what a raw copy moves)."""
        size = int(sc.arg("size"))
        guest = GuestConfig(workload="idle", fill="zero", seed=1)
        per_page = []
        results = []
        for _ in range(self.repeat):
            r = self._migrate(size, guest, MigrationConfig(hints=False, verify=True))
            results.append(r)
            per_page.append(r.bytes_sent / (size // PAGE))
        return [
            engine_figure(
                f"{sc.name} wire bytes per page",
                "zero",
                "B/page",
                "lower",
                Stat.of(per_page),
                Stat.of([float(PAGE)]),
                "one page's bytes (what a raw copy sends)",
                "zero pages cost no payload bytes (< 1% of a page)",
                0.01,
                region_bytes=size,
                zero_pages=results[0].zero_pages,
                bytes_sent=results[0].bytes_sent,
            )
        ]

    def _run_hints(self, sc: Scenario) -> list[Figure]:
        """An idle guest with a share of its memory free: bytes sent with hints against without
        (same run); and what a hinted page cost on the wire."""
        size, free = int(sc.arg("size")), float(sc.arg("free"))
        guest = GuestConfig(workload="idle", free_fraction=free, seed=2)
        on, off, hinted = [], [], []
        for _ in range(self.repeat):
            off.append(
                float(
                    self._migrate(size, guest, MigrationConfig(hints=False, verify=True)).bytes_sent
                )
            )
            r = self._migrate(size, guest, MigrationConfig(hints=True, verify=True))
            on.append(float(r.bytes_sent))
            hinted.append(float(r.hints.pages_hinted))
        pages_hinted = statistics.median(hinted)
        figs = [
            engine_figure(
                f"{sc.name} bytes sent",
                "hints",
                "MB",
                "lower",
                Stat.of(x / 1e6 for x in on),
                Stat.of(x / 1e6 for x in off),
                "bytes sent with hints off",
                None,
                None,
                region_bytes=size,
                free_fraction=free,
                pages_hinted=pages_hinted,
                expected_ratio=1 - free,
            )
        ]
        if pages_hinted > 0:
            cost = [
                max(0.0, b_on - (b_off - h * PAGE)) / h
                for b_on, b_off, h in zip(on, off, hinted)
                if h
            ]
            figs.append(
                engine_figure(
                    f"{sc.name} wire bytes per hinted page",
                    "hints",
                    "B/page",
                    "lower",
                    Stat.of(cost),
                    Stat.of([float(PAGE)]),
                    "one page's bytes (hints off)",
                    "hinted pages cost no payload bytes (< 1% of a page)",
                    0.01,
                    pages_hinted=pages_hinted,
                )
            )
        return figs

    def _run_faults(self, sc: Scenario) -> list[Figure]:
        """Postcopy after one precopy round with a writing guest (increment: address order;
        random), urgent channel on or off: fault service p50 against a raw ping-pong p50 plus one
        raw UFFDIO_COPY, measured between the migrations."""
        size, access, urgent = int(sc.arg("size")), sc.arg("access"), bool(sc.arg("urgent"))
        # Sequential: the increment writer at full speed dirties whole passes during the first
        # round, so after switchover it faults page after page in address order, racing the push.
        workload: Workload = "increment" if access == "sequential" else "random"
        guest = GuestConfig(
            workload=workload, rate=0.0 if access == "sequential" else 5 * self.dirty_rate, seed=3
        )
        off = frozenset() if urgent else frozenset({"urgent-channel"})
        config = MigrationConfig(postcopy=True, hints=False, verify=True, disable_capabilities=off)
        p50, p99, floor, requests, ping, copy, push = [], [], [], [], [], [], []
        hist_sum = [0] * 32
        for _ in range(self.repeat):
            ping.append(self.base.pingpong_us())
            copy.append(self.base.uffd_copy_us())
            floor.append(ping[-1] + copy[-1])
            r = self._migrate(size, guest, config)
            for k, n in enumerate(r.postcopy.histogram[:32]):
                hist_sum[k] += int(n)
            if ("urgent-channel" in r.capabilities) != urgent:
                raise RuntimeError(
                    f"urgent channel negotiated: {'urgent-channel' in r.capabilities}"
                )
            p50.append(histogram_quantile_us(r.postcopy.histogram, 0.5))
            p99.append(histogram_quantile_us(r.postcopy.histogram, 0.99))
            requests.append(float(r.postcopy.requests))
            if r.push_seconds > 0:
                push.append(r.push_bytes / r.push_seconds / 1e9)
        if statistics.median(requests) == 0:
            raise RuntimeError("no postcopy faults were requested: nothing to measure")
        return [
            engine_figure(
                f"{sc.name} fault p50",
                "faults",
                "us",
                "lower",
                Stat.of(p50),
                Stat.of(floor),
                "raw ping-pong p50 + raw UFFDIO_COPY",
                "fault service p50 within 1.5x of raw ping-pong + UFFDIO_COPY",
                1.5,
                region_bytes=size,
                workload=workload,
                urgent_channel=urgent,
                p99_us=statistics.median(p99),
                requests=statistics.median(requests),
                dirty_rate=guest.rate,
                histogram=hist_sum,
                pingpong_p50_us=statistics.median(ping),
                uffd_copy_us=statistics.median(copy),
                push_gbps=statistics.median(push) if push else 0.0,
            )
        ]

    def _run_channels(self, sc: Scenario) -> list[Figure]:
        size, n = int(sc.arg("size")), int(sc.arg("channels"))
        guest = GuestConfig(workload="idle", seed=1)
        config = MigrationConfig(channels=n, hints=False, verify=True)
        eng, raw = [], []
        for _ in range(self.repeat):
            raw.append(self.base.socket_copy_gbps(size, n))
            r = self._migrate(size, guest, config)
            eng.append(first_round_gbps(r))
        return [
            engine_figure(
                f"{sc.name} first round",
                "channels",
                "GB/s",
                "higher",
                Stat.of(eng),
                Stat.of(raw),
                f"raw socket copy x{n}",
                "precopy >= 75% of a raw socket copy",
                0.75,
                region_bytes=size,
                channels=n,
            )
        ]

    def _run_sync(self, sc: Scenario) -> list[Figure]:
        """A dirty sync of a tracked region with 1% of its pages written, against the bare
        PAGEMAP_SCAN loop over the same writes, alternating."""
        from livemig.source import Source

        size = int(sc.arg("size"))
        src = Source(size // PAGE)
        B = _core._source_bench
        eng, raw = [], []
        B.touch_pages(src.address, src.pages, 1, 1)  # warm: every page populated
        src.sync()
        for i in range(self.micro):
            B.touch_pages(src.address, src.pages, 100, 2 + i)
            t0 = time.perf_counter()
            src.sync()
            eng.append((time.perf_counter() - t0) * 1e3)
            B.touch_pages(src.address, src.pages, 100, 3 + i)
            t0 = time.perf_counter()
            B.pagemap_scan_loop(src.address, src.nbytes, 1024)
            raw.append((time.perf_counter() - t0) * 1e3)
        del src
        return [
            engine_figure(
                f"{sc.name} sync, 1% written",
                "scaling",
                "ms",
                "lower",
                Stat.of(eng),
                Stat.of(raw),
                "bare PAGEMAP_SCAN loop",
                None,
                None,
                region_bytes=size,
            )
        ]

    def _run_bitmap(self, sc: Scenario) -> list[Figure]:
        """PageBitmap count and harvest of the whole bitmap, dense (every bit) and sparse (one bit
        in 1024), against numpy on the same words: bitwise_count().sum(), and copyto + fill(0)."""
        pages = int(sc.arg("pages"))
        region = size_label(pages * PAGE)
        figs = []
        goal_applies = pages == BITMAP_PAGES[-1]
        for density, words in (
            ("dense", np.full(pages // 64, np.uint64(2**64 - 1), dtype=np.uint64)),
            ("sparse", self._sparse_words(pages)),
        ):
            bm = _core.PageBitmap(pages)
            bm.load_bytes(words.data)
            expect = int(np.bitwise_count(words).sum())
            out = np.ones_like(words)
            scratch = words.copy()
            runs = max(self.micro, 5)
            c_eng, c_np, h_eng, h_np = [], [], [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                got = bm.count()
                c_eng.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                np.bitwise_count(words).sum()
                c_np.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                bm.harvest(out=out)
                h_eng.append((time.perf_counter() - t0) * 1e3)
                if got != expect or bm.count() != 0:
                    raise RuntimeError("bitmap count or harvest gave a wrong result")
                bm.load_bytes(words.data)
                np.copyto(scratch, words)
                t0 = time.perf_counter()
                np.copyto(out, scratch)
                scratch.fill(0)
                h_np.append((time.perf_counter() - t0) * 1e3)
            goal = "at least numpy's speed (1 TiB bitmap)" if goal_applies else None
            g = 1.0 if goal_applies else None
            figs.append(
                engine_figure(
                    f"bitmap-{region} count, {density}",
                    "bitmap",
                    "ms",
                    "lower",
                    Stat.of(c_eng),
                    Stat.of(c_np),
                    "numpy bitwise_count().sum()",
                    goal,
                    g,
                    pages=pages,
                    bits_set=expect,
                )
            )
            figs.append(
                engine_figure(
                    f"bitmap-{region} harvest, {density}",
                    "bitmap",
                    "ms",
                    "lower",
                    Stat.of(h_eng),
                    Stat.of(h_np),
                    "numpy copyto + fill(0)",
                    goal,
                    g,
                    pages=pages,
                    bits_set=expect,
                    nonzero_words=int(np.count_nonzero(words)),
                )
            )
        return figs

    @staticmethod
    def _sparse_words(pages: int) -> npt.NDArray[np.uint64]:
        """Bit 1024*i + (i mod 64) for every i: one bit in 1024, spread over the word positions."""
        words = np.zeros(pages // 64, dtype=np.uint64)
        i = np.arange(pages // 1024, dtype=np.uint64)
        bits = i * np.uint64(1024) + (i % np.uint64(64))
        words[(bits // np.uint64(64)).astype(np.intp)] |= np.left_shift(
            np.uint64(1), bits % np.uint64(64)
        )
        return words


# ---- output ----


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def table(report: Report) -> Any:
    """The report as a rich Table (figures in group order; a failed scenario shows its error)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=escape("livemig bench: engine vs raw baselines, same run (median [min-max])"),
        title_justify="left",
    )
    for col, just in (
        ("figure", "left"),
        ("value", "right"),
        ("baseline", "left"),
        ("ratio", "right"),
        ("goal", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    group = None
    for f in report.figures:
        if f.group != group:
            group = f.group
            t.add_section()
        if f.error is not None:
            skipped = f.error.startswith(SKIPPED)
            status = "[yellow]skipped[/yellow]" if skipped else "[red]failed[/red]"
            t.add_row(escape(f.name), status, escape(f.error.removeprefix(SKIPPED)), "", "")
            continue
        lo, hi = f.spread or (None, None)
        value = escape(f"{_fmt(f.value)} {f.unit} [{_fmt(lo)}-{_fmt(hi)}]")
        if f.is_baseline:
            t.add_row(escape(f.name), value, escape(str(f.details.get("how", ""))), "", "")
            continue
        base = escape(f"{_fmt(f.baseline)} {f.unit} {f.baseline_name}")
        goal = ""
        if f.goal_ratio is not None:
            mark = "[green]met[/green]" if f.met else "[red]not met[/red]"
            goal = f"{'>=' if f.better == 'higher' else '<='} {f.goal_ratio:g}: {mark}"
        t.add_row(escape(f.name), value, base, _fmt(f.ratio), goal)
    return t


def plot(report: Report, directory: str) -> list[str]:
    """One PNG per group with engine figures (value and baseline bars, ratio on top) in
    ``directory``; returns the paths. Needs matplotlib."""
    from matplotlib.figure import Figure as MplFigure  # optional dependency

    os.makedirs(directory, exist_ok=True)
    paths = []
    for group in GROUPS[1:]:
        figs = [
            f
            for f in report.figures
            if f.group == group and f.value is not None and f.baseline is not None
        ]
        if not figs:
            continue
        units = sorted({f.unit for f in figs})
        fig = MplFigure(figsize=(10, 3 + 2.5 * len(units)), layout="constrained")
        axes = fig.subplots(len(units), 1, squeeze=False)[:, 0]
        for ax, unit in zip(axes, units):
            sel = [f for f in figs if f.unit == unit]
            xs = np.arange(len(sel))
            vals = [f.value or 0.0 for f in sel]
            bases = [f.baseline or 0.0 for f in sel]
            yerr = np.array(
                [
                    [v - (f.spread or (v, v))[0] for v, f in zip(vals, sel)],
                    [(f.spread or (v, v))[1] - v for v, f in zip(vals, sel)],
                ]
            )
            ax.bar(
                xs - 0.2, vals, 0.4, yerr=np.clip(yerr, 0, None), label="livemig", color="tab:blue"
            )
            ax.bar(xs + 0.2, bases, 0.4, label="raw baseline", color="tab:gray")
            for x, f in zip(xs, sel):
                colour = "black" if f.met is None else ("tab:green" if f.met else "tab:red")
                ax.annotate(
                    f"x{_fmt(f.ratio)}",
                    (x, max(f.value or 0, f.baseline or 0)),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=colour,
                )
            ax.set_xticks(xs, [f.name for f in sel], rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(unit)
            if (
                unit in ("ms", "us")
                and max(vals + bases) / max(min(v for v in vals + bases if v > 0), 1e-9) > 100
            ):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.suptitle(f"livemig bench: {group} (ratio = livemig / baseline)")
        path = os.path.join(directory, f"{group}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    hists = [
        f for f in report.figures if f.group == "faults" and any(f.details.get("histogram", ()))
    ]
    if hists:
        fig = MplFigure(figsize=(9, 5), layout="constrained")
        ax = fig.subplots()
        for f in hists:
            h = list(f.details["histogram"])
            total = sum(h)
            ax.step(range(len(h)), [100.0 * n / total for n in h], where="mid", label=f.name)
            if f.baseline:
                ax.axvline(
                    math.log2(max(f.baseline, 1.0)) + 1, color="gray", linestyle=":", linewidth=1
                )
        ax.set_xticks(
            range(0, 32, 2), [f"<{2**k}" if k else "<1" for k in range(0, 32, 2)], rotation=45
        )
        ax.set_xlim(0, 20)
        ax.set_xlabel("fault service time, us (power-of-two buckets; dotted: the raw baselines)")
        ax.set_ylabel("% of faults")
        ax.legend(fontsize=7)
        fig.suptitle("livemig bench: postcopy fault latency distribution")
        path = os.path.join(directory, "fault-latency.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


# ---- progress on stderr ----


@contextmanager
def progress(console: Any, enabled: bool | None, total: int) -> Iterator[StepFn]:
    """A step function for :class:`Bench`: a rich bar over the scenarios on a terminal, one plain
    line per scenario otherwise (``enabled`` None: only on a terminal), or nothing."""
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield lambda _name: None
    elif console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.fields[name]:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        task = bar.add_task("bench", total=total, name="")
        started = [False]

        def step(name: str) -> None:
            bar.update(task, name=name, advance=1 if started[0] else 0)
            started[0] = True

        with bar:
            yield step
    else:
        count = [0]

        def line(name: str) -> None:
            count[0] += 1
            console.file.write(f"livemig: bench {name} ({count[0]}/{total})\n")
            console.file.flush()

        yield line


__all__ = [
    "Baselines",
    "Bench",
    "Figure",
    "Report",
    "Scenario",
    "Stat",
    "histogram_quantile_us",
    "plot",
    "progress",
    "scenarios",
    "select",
    "table",
]
