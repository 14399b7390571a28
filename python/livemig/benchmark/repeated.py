"""One ``livemig migrate`` command run many times (``bench/postcopy_runs.py``), each run beside the
raw floor of a postcopy fault measured just before it: a loopback ping-pong (24 B out, a header
and a page back) plus one bare ``UFFDIO_COPY``. Prints every run's three latency measures and the
kernel's TCP counters around it, then the medians with their ratios to the floor and the goals of
docs/performance.md ("Postcopy faults"): no fault above 1 ms, p50 at most 30 us and p99 at most
100 us (or, on a busy machine, within 1.3x of the floor), no retransmitted segment.

The runs happen in a network namespace of their own when the process may make one (root), so the
TCP counters move only for the migration's own connections."""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The README's kind of run (issue 22): postcopy after one round, hints, churn, verified.
DEFAULT_ARGS = ("--size", "256M", "--workload", "random", "--dirty-rate", "50000", "--postcopy", "--postcopy-after",
                "1", "--hints", "--free-fraction", "0.5", "--churn", "20000", "--verify")
#: TCP counters that say a segment was lost, dropped or sent again (/proc/net/snmp, /proc/net/netstat),
#: and the receiver's reports of segments it got twice (DSACK: the retransmission was spurious).
COUNTERS = ("Tcp.RetransSegs", "TcpExt.TCPTimeouts", "TcpExt.RcvPruned", "TcpExt.OfoPruned", "TcpExt.TCPRcvQDrop",
            "TcpExt.TCPZeroWindowDrop", "TcpExt.TCPBacklogDrop", "TcpExt.TCPLossProbes", "TcpExt.TCPFastRetrans",
            "TcpExt.TCPDSACKRecv", "TcpExt.TCPDSACKOfoRecv", "TcpExt.TCPSpuriousRTOs", "TcpExt.TCPLostRetransmit",
            "TcpExt.TCPToZeroWindowAdv", "TcpExt.TCPWinProbe")
MEASURES = (("fault", "fault_latency_us"), ("request", "request_latency_us"), ("blocked", "blocked_us"))
QUIET_P50_US, QUIET_P99_US, BUSY_RATIO, MAX_US = 30.0, 100.0, 1.3, 1000.0
CLONE_NEWNET = 0x40000000


@dataclass
class RunFigures:
    """One run: its floor (us), each measure's p50 / p99 / max (us) and samples over 1 ms, the
    counters that moved, and the load average when it started."""

    floor_p50_us: float
    floor_p99_us: float
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    ok: bool = True
    load: float = 0.0
    total_ms: float = 0.0  #: the migration's total time


def read_counters() -> dict[str, int]:
    """This network namespace's TCP counters as ``Group.Name`` (pairs of lines: names, values)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            group, _, keys = names.partition(":")
            for k, v in zip(keys.split(), values.partition(":")[2].split(), strict=True):
                out[f"{group}.{k}"] = int(v)
    return out


def private_netns() -> str | None:
    """Moves this process (and what it spawns) into a new network namespace with its loopback
    up; None, or why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sh14x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
    return None


def one_run(args: Sequence[str], floor: Callable[[], tuple[float, float]], timeout: float,
            pythonpath: str | None = None) -> RunFigures:
    """The floor, then one ``livemig migrate ARGS --json`` (the livemig of ``pythonpath`` when
    given) with the counters read around it."""
    p50, p99 = floor()
    run = RunFigures(p50, p99, load=os.getloadavg()[0])
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    before = read_counters()
    proc = subprocess.run([sys.executable, "-m", "livemig", "migrate", *args, "--json"], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
    time.sleep(0.3)  # let the closed connections' last segments (FIN, acks) be counted with this run
    after = read_counters()
    run.counters = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS if after.get(k, 0) != before.get(k, 0)}
    try:
        r = json.loads(proc.stdout)
    except ValueError:
        r = {"ok": False, "postcopy": {}}
    run.ok = bool(r.get("ok")) and proc.returncode == 0
    run.total_ms = float(r.get("total_ms") or 0.0)
    for name, key in MEASURES:
        lat = r.get("postcopy", {}).get(key, {})
        run.latency[name] = {k: float(lat.get(k, 0.0)) for k in ("p50", "p99", "max", "over_1ms", "count")}
    return run


def raw_floor() -> tuple[float, float]:
    """The raw floor of one fault now: ping-pong p50 and p99, each plus one UFFDIO_COPY (us)."""
    from livemig.benchmark.baselines import Baselines

    b = Baselines()
    p50, copy = b.pingpong_us(), b.uffd_copy_us(16 << 20)
    return p50 + copy, b.pingpong_p99 + copy


def summary(runs: list[RunFigures], say: Callable[[str], None] = print, label: str = "") -> bool:
    """Prints the medians over runs against the floor and the goals; True when all are met."""
    ok = all(r.ok for r in runs)
    f50 = statistics.median(r.floor_p50_us for r in runs)
    f99 = statistics.median(r.floor_p99_us for r in runs)
    say(f"\n{label}{len(runs)} runs; raw floor (ping-pong + UFFDIO_COPY, median of the runs): p50 {f50:.1f} us,"
        f" p99 {f99:.1f} us; load average {min(r.load for r in runs):.1f}-{max(r.load for r in runs):.1f};"
        f" total time median {statistics.median(r.total_ms for r in runs):,.0f} ms")
    say(f"{'measure':<10}{'p50 med':>10}{'p50 range':>18}{'p99 med':>10}{'p99 range':>18}{'max':>11}"
        f"{'>1 ms':>7}{'p50/floor':>11}{'p99/floor':>11}")
    for name, _ in MEASURES:
        p50 = [r.latency[name]["p50"] for r in runs]
        p99 = [r.latency[name]["p99"] for r in runs]
        top = max(r.latency[name]["max"] for r in runs)
        over = sum(int(r.latency[name]["over_1ms"]) for r in runs)
        say(f"{name:<10}{statistics.median(p50):>10.1f}{f'{min(p50):.1f}-{max(p50):.1f}':>18}"
            f"{statistics.median(p99):>10.1f}{f'{min(p99):.1f}-{max(p99):.1f}':>18}{top:>11,.1f}{over:>7}"
            f"{statistics.median(p50) / f50:>11.2f}{statistics.median(p99) / f99:>11.2f}")
    fault = [r.latency["fault"] for r in runs]
    m50, m99 = statistics.median(x["p50"] for x in fault), statistics.median(x["p99"] for x in fault)
    moved: dict[str, int] = {}
    for r in runs:
        for k, v in r.counters.items():
            moved[k] = moved.get(k, 0) + v
    goals = [
        ("every run completed and verified", ok),
        (f"no fault above 1 ms (worst {max(x['max'] for x in fault):,.1f} us)", all(x["max"] <= MAX_US for x in fault)),
        (f"fault p50 {m50:.1f} us <= {QUIET_P50_US:g} us, or <= {BUSY_RATIO:g}x floor ({m50 / f50:.2f}x)",
         m50 <= QUIET_P50_US or m50 <= BUSY_RATIO * f50),
        (f"fault p99 {m99:.1f} us <= {QUIET_P99_US:g} us, or <= {BUSY_RATIO:g}x floor ({m99 / f99:.2f}x)",
         m99 <= QUIET_P99_US or m99 <= BUSY_RATIO * f99),
        (f"0 retransmitted segments ({moved.get('Tcp.RetransSegs', 0)}; counters moved: {moved or 'none'})",
         moved.get("Tcp.RetransSegs", 0) == 0),
    ]
    for text, met in goals:
        say(f"  {'met' if met else 'NOT met'}: {text}")
    return all(met for _, met in goals)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="postcopy_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="migrations (default 20)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one migration may take (default 300)")
    p.add_argument("--json", dest="json_file", help="write every run's figures to this file")
    p.add_argument("--ab", metavar="ARGS", default=None,
                   help="A/B: every other run (B) adds these migrate arguments, e.g. '--disable-capability X'")
    p.add_argument("--b-pythonpath", metavar="DIR", default=None,
                   help="A/B: B runs the livemig found there (e.g. another checkout's python/ directory)")
    p.add_argument("migrate_args", nargs="*", help=f"livemig migrate's arguments (default: {' '.join(DEFAULT_ARGS)})")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs takes at least 1")
    args = a.migrate_args or list(DEFAULT_ARGS)
    ab = a.ab is not None or a.b_pythonpath is not None
    variants = [("A ", args), ("B ", [*args, *shlex.split(a.ab or "")])] if ab else [("", args)]
    why = private_netns()
    print(f"livemig migrate {' '.join(args)} --json, {a.runs} times"
          + (f"; host network namespace ({why}): other traffic moves the counters too" if why else
             "; in a network namespace of its own"), flush=True)
    if ab:
        print(f"A/B, alternated: B adds {a.ab or 'nothing'}, runs livemig from {a.b_pythonpath or 'here'}", flush=True)
    groups: list[list[RunFigures]] = [[] for _ in variants]
    for i in range(a.runs * len(variants)):
        name, run_args = variants[i % len(variants)]
        r = one_run(run_args, raw_floor, a.timeout, a.b_pythonpath if name == "B " else None)
        groups[i % len(variants)].append(r)
        lat = r.latency
        print(f"{name}run {i // len(variants) + 1:>2}: {'ok' if r.ok else 'FAILED'}; floor {r.floor_p50_us:.1f}/{r.floor_p99_us:.1f} us;"
              + "".join(f" {n} {lat[n]['p50']:.1f}/{lat[n]['p99']:.1f}/{lat[n]['max']:,.1f} us;" for n, _ in MEASURES)
              + f" counters {r.counters or 'none'}", flush=True)
    verdicts = [summary(runs, label=name) for (name, _), runs in zip(variants, groups, strict=True)]  # all printed
    met = all(verdicts)
    if a.json_file:
        doc: dict[str, Any] = {"netns": why is None, "variants": [
            {"args": v, "runs": [asdict(r) for r in runs]} for (_, v), runs in zip(variants, groups, strict=True)]}
        Path(a.json_file).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if met else 1


__all__ = ["DEFAULT_ARGS", "RunFigures", "main", "one_run", "raw_floor", "read_counters", "summary"]
