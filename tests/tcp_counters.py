"""The kernel's TCP counters around loopback migrations, in a network namespace of their own (so
nothing else on the machine moves them): a spawned child unshares its network namespace, brings
its loopback up, and every process it spawns (the destination) shares that namespace."""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing as mp
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Counters that say a segment was lost or thrown away on this host (each must stay 0), with the
#: retransmissions that repaired such losses; TcpExt names from /proc/net/netstat, Tcp from snmp.
DROPS = ("TcpExt.RcvPruned", "TcpExt.OfoPruned", "TcpExt.TCPRcvQDrop", "TcpExt.TCPZeroWindowDrop",
         "TcpExt.TCPBacklogDrop", "TcpExt.TCPTimeouts")
#: Retransmissions, and the receiver's count of segments it got twice (the original had arrived:
#: the retransmission was spurious, a timing artefact, nothing lost).
RETRANS = "Tcp.RetransSegs"
DUPLICATES = ("TcpExt.DelayedACKLost", "TcpExt.TCPDSACKOfoSent")
PROBES = "TcpExt.TCPLossProbes"  #: tail-loss probes: sent when an ACK is late
FAST = "TcpExt.TCPFastRetrans"  #: retransmits the receiver's SACKs asked for (reordering, here)
SHOWN = DROPS + (RETRANS,) + DUPLICATES + (PROBES, FAST,
                                           "TcpExt.TCPSACKReorder", "TcpExt.TCPOFOQueue")

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def read_counters() -> dict[str, int]:
    """Every counter of this network namespace's /proc/net/netstat and /proc/net/snmp, as
    ``Group.Name`` (pairs of lines: names, then values)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            group, _, keys = names.partition(":")
            for k, v in zip(keys.split(), values.partition(":")[2].split(), strict=True):
                out[f"{group}.{k}"] = int(v)
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters in SHOWN that moved, and by how much."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in SHOWN if after.get(k, 0) != before.get(k, 0)}


def enter_private_netns() -> str | None:
    """Moves this process into a new network namespace with its loopback up; None, or why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))
    return None


#: /proc/net/tcp states of a connection still sending: ESTABLISHED, SYN_SENT, SYN_RECV,
#: FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING.
_BUSY = {"01", "02", "03", "04", "08", "09", "0B"}


def wait_closed(timeout_s: float) -> bool:
    """Waits until no connection of this namespace is left with anything to send (polled: the
    kernel tells nobody); False when some still had after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        busy = 0
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(path).read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            busy += sum(1 for r in rows if r.split()[3] in _BUSY)
        if busy == 0:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.01)


def _child(q: Any, runs: list[tuple[str, Callable[[], object]]]) -> None:
    why = enter_private_netns()
    if why is not None:
        q.put(("unavailable", why))
        return
    for name, run in runs:
        before = read_counters()
        try:
            run()
            err = ""
        except Exception as e:  # reported to the test, which fails on it
            err = f"{type(e).__name__}: {e}"
        # Closed connections may still be finishing (FIN, its ack): count what they send too.
        wait_closed(5.0)
        q.put(("mode", (name, err, delta(before, read_counters()))))
    q.put(("done", None))


def counters_in_private_netns(runs: list[tuple[str, Callable[[], object]]],
                              deadline_s: float) -> tuple[str | None, list[tuple[str, str, dict[str, int]]]]:
    """Runs each (name, picklable callable) in one spawned child in a private network namespace
    and returns (None, [(name, error or "", counter deltas)]), or (why, []) when the namespace
    cannot be made."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, runs))
    proc.start()
    out: list[tuple[str, str, dict[str, int]]] = []
    try:
        end = time.monotonic() + deadline_s
        while True:
            kind, payload = q.get(timeout=max(end - time.monotonic(), 0.1))
            if kind == "unavailable":
                return str(payload), []
            if kind == "done":
                return None, out
            out.append(payload)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
