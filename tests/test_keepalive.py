"""TCP keepalive on every channel (wire.Keepalive): the options are set on each socket of both
sides, and a silent partition (packets dropped, no FIN, no RST) in the middle of postcopy starts
recovery on both sides within the keepalive bound, far below the migration's own timeout; the
migration then resumes over a new connection once the link is back, verified.

The partition runs between a source and a destination namespace routed through a third one,
all made here: ``pfifo`` queues of length 0 on the router drop every packet silently either way
(this kernel has no netem, no iptables, no tc drop action); their drop counters prove the packets
were really dropped."""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from livemig import local, wire

_serial = itertools.count()


def _opts(keepalive: wire.Keepalive) -> wire.WireOptions:
    caps = wire.Capabilities(wire.ALL_CAPABILITIES, 2)
    return wire.WireOptions(page_size=4096, region_bytes=1 << 20, capabilities=caps, timeout=5, keepalive=keepalive)


def _keepalive_of(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


@pytest.mark.timeout(60)
def test_every_channel_of_both_sides_gets_the_keepalive_options() -> None:
    ka = wire.Keepalive(idle_s=2, interval_s=1, count=4)
    with wire.Listener("127.0.0.1:0") as lst:
        box: dict[str, wire.Connection] = {}
        t = threading.Thread(target=lambda: box.update(conn=lst.accept(_opts(ka), wait=10)))
        t.start()
        src = wire.connect(str(lst.address), _opts(ka))
        t.join(10)
        with src, box["conn"] as dst:
            channels = [*src.channels(), *dst.channels()]
            assert len(channels) == 2 * 4  # main, urgent, two page channels; each side
            for ch in channels:
                assert _keepalive_of(ch.sock) == (1, 2, 1, 4, 6000), ch


def test_keepalive_off_leaves_the_kernel_defaults() -> None:
    off = wire.Keepalive(idle_s=0)
    with socket.socket() as s:
        off.apply(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    assert off.bound_s == 0 and wire.DEFAULT_KEEPALIVE.bound_s <= 10


@pytest.mark.parametrize(("kw", "message"), [
    ({"idle_s": -1}, r"keepalive idle must be in \[0, 32767\], got -1"),
    ({"interval_s": 0}, r"keepalive interval must be in \[1, 32767\], got 0"),
    ({"count": 128}, r"keepalive count must be in \[1, 127\], got 128"),
])
def test_keepalive_out_of_range_is_refused(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wire.Keepalive(**kw)


# ---- a silent partition between two namespaces ----


def _run(*argv: str) -> str:
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


@dataclass
class Routed:
    """A source and a destination namespace joined through a router namespace (two veth pairs).
    The router's queues shape and drop: a packet dropped there is lost in the network, as in a
    real partition (a packet dropped by the sender's own queue counts as local congestion, and
    the kernel then retries keepalive probes for ever instead of counting them)."""

    src: str
    router: str
    dst: str
    router_devs: tuple[str, str]
    dst_ip: str

    def shape(self, rate_bits: int) -> None:
        """A token bucket each way: a slow link, so postcopy lasts long enough to be cut."""
        for dev in self.router_devs:
            _run("tc", "-n", self.router, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bits}bit",
                 "burst", "64k", "latency", "100ms")

    def drop_everything(self) -> None:
        """Router queues that hold no packet: everything either way is dropped, nothing answered."""
        for dev in self.router_devs:
            _run("tc", "-n", self.router, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0")

    def dropped(self) -> int:
        total = 0
        for dev in self.router_devs:
            m = re.search(r"dropped (\d+)", _run("tc", "-n", self.router, "-s", "qdisc", "show", "dev", dev))
            total += int(m[1]) if m else 0
        return total


@pytest.fixture
def routed() -> Iterator[Routed]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("no `ip` / `tc` commands (iproute2) on this machine")
    n = next(_serial)
    tag = f"{os.getpid() % 100000}k{n}"
    a, b = f"10.202.{n % 250}", f"10.203.{n % 250}"
    made: list[str] = []
    try:
        r = Routed(f"lmksrc{tag}", f"lmkrtr{tag}", f"lmkdst{tag}", (f"kra{tag}", f"krb{tag}"), f"{b}.2")
        for ns in (r.src, r.router, r.dst):
            _run("ip", "netns", "add", ns)
            made.append(ns)
        _run("ip", "link", "add", f"ks{tag}", "netns", r.src, "type", "veth", "peer", "name", r.router_devs[0],
             "netns", r.router)
        _run("ip", "link", "add", f"kd{tag}", "netns", r.dst, "type", "veth", "peer", "name", r.router_devs[1],
             "netns", r.router)
        for ns, dev, ip in ((r.src, f"ks{tag}", f"{a}.2"), (r.router, r.router_devs[0], f"{a}.1"),
                            (r.router, r.router_devs[1], f"{b}.1"), (r.dst, f"kd{tag}", f"{b}.2")):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", r.src, "route", "add", "default", "via", f"{a}.1")
        _run("ip", "-n", r.dst, "route", "add", "default", "via", f"{b}.1")
        _run("ip", "netns", "exec", r.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield r
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=20)


def _lines(stream: object, into: queue.Queue[tuple[float, str, str]], who: str) -> threading.Thread:
    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.put((time.monotonic(), who, line.rstrip("\n")))
        into.put((time.monotonic(), who, ""))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


KEEPALIVE = ["--keepalive-idle", "1", "--keepalive-interval", "1", "--keepalive-count", "2"]
BOUND_S = 1 + 1 * 2  # idle + interval * count
TIMEOUT_S = 60  # the migration's own silent-peer timeout: what would notice the partition without keepalive


@pytest.mark.timeout(120)
def test_a_silent_partition_starts_recovery_within_the_keepalive_bound(routed: Routed, tmp_path: Path) -> None:
    routed.shape(40_000_000)  # 16 MiB of postcopy push take about 3.5 s
    py = [sys.executable, "-m", "livemig"]
    secret = tmp_path / "secret"
    secret.write_bytes(b"keepalive-test-secret")
    listen = ["ip", "netns", "exec", routed.dst, *py, "listen", f"{routed.dst_ip}:0", "--once", "--announce", "--json",
              "--quiet", "--progress", "--timeout", str(TIMEOUT_S), "--resume-deadline", "60", "--secret-file", str(secret), *KEEPALIVE]
    lines: queue.Queue[tuple[float, str, str]] = queue.Queue()
    with local.local_destination(command=listen, deadline=20) as dest:
        # The destination's stderr goes to a file (local_destination); follow it from there.
        migrate = subprocess.Popen(
            ["ip", "netns", "exec", routed.src, *py, "migrate", "--to", dest.address, "--size", "16M", "--postcopy",
             "--postcopy-after", "0", "--verify", "--json", "--quiet", "--progress", "--timeout", str(TIMEOUT_S),
             "--reconnect-deadline", "60", "--secret-file", str(secret), *KEEPALIVE],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            _lines(migrate.stderr, lines, "source")
            t_drop = t_src = t_dst = 0.0
            src_cause = ""
            deadline = time.monotonic() + 60
            while not (t_src and t_dst):
                assert time.monotonic() < deadline, "no pause within 60 s"
                try:
                    at, who, line = lines.get(timeout=0.05)
                except queue.Empty:
                    at, who, line = time.monotonic(), "", ""
                if not t_drop and "phase postcopy" in dest.stderr_text():
                    # The destination's workload runs: pages are still being pushed and requested.
                    routed.drop_everything()
                    t_drop = time.monotonic()
                if who == "source" and "phase paused" in line:
                    t_src = at
                if who == "source" and "paused:" in line:
                    src_cause = line
                if t_drop and not t_dst and "phase paused" in dest.stderr_text():
                    t_dst = time.monotonic()  # (polled: at most 50 ms late)
            assert t_drop and routed.dropped() > 0  # the partition really dropped packets
            src_delay, dst_delay = t_src - t_drop, t_dst - t_drop
            routed.shape(40_000_000)  # the link is back: the source reconnects and pushes on
            out, _ = migrate.communicate(timeout=60)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
        assert migrate.returncode == 0, out
        assert dest.wait(30) == 0, dest.stderr_text()
        assert dest.process.stdout is not None
        dst = json.loads(dest.process.stdout.read().decode().strip().splitlines()[-1])
        dst_err = dest.stderr_text()
    src = json.loads(out)
    print(f"\nsilent partition: source paused after {src_delay:.2f} s, destination after {dst_delay:.2f} s"
          f" (keepalive bound {BOUND_S} s, timeout {TIMEOUT_S} s)")
    # Noticed by keepalive (ETIMEDOUT), not by a FIN or reset, nor by the 60 s timeout.
    assert "reset" not in src_cause and "closed the connection" not in src_cause, src_cause
    assert 0 < src_delay <= BOUND_S + 2.0 and 0 < dst_delay <= BOUND_S + 2.0, (src_delay, dst_delay, dst_err)
    assert src["ok"] and src["recoveries"] == 1 and dst["recoveries"] == 1, (src, dst)
    assert src["verify"]["mismatches"] == 0 and src["verify"]["placed_twice"] == 0 and src["verify"]["digests"]
