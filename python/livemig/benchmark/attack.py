"""Strangers for a listener to shrug off (tests and bench/listener_attack.py): connections that send a
valid handshake prefix and stall, held at a steady count (one that the listener closes is opened
again), and a connect/close flood at a steady rate. Loopback only; each from its own source address
(127.0.0.x) when asked, so per-address limits can be seen or avoided."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from livemig.protocol import PROTOCOL_VERSION
from livemig.wire.handshake import MAGIC

if TYPE_CHECKING:
    from typing_extensions import Self

#: A HELLO's prefix announcing a 76-byte body that never comes.
STALL_PREFIX = struct.pack("<8sHBBI", MAGIC, PROTOCOL_VERSION, 1, 0, 76)


@dataclass
class AttackStats:
    """What the strangers did."""

    stalled_opened: int = 0  #: stalled connections opened (the listener closing one makes another)
    stalled_closed_by_listener: int = 0
    flood_connections: int = 0  #: connect/close pairs made
    flood_failures: int = 0  #: connects that failed (refused, reset, timeout)
    seconds: float = 0.0


class Attack:
    """``stalled`` connections held open (each sends :data:`STALL_PREFIX` and nothing more) and a
    flood of ``flood_per_s`` connect/close per second, against ``host:port``, until :meth:`stop`."""

    def __init__(self, host: str, port: int, *, stalled: int = 0, flood_per_s: float = 0.0,
                 stall_from: str | None = None, flood_from: str | None = None) -> None:
        self.target = (host, port)
        self.stalled, self.flood_per_s = stalled, flood_per_s
        self.stall_from, self.flood_from = stall_from, flood_from
        self.stats = AttackStats()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    def _open(self, source: str | None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            s.bind((source, 0))
        s.settimeout(2.0)
        s.connect(self.target)
        return s

    def _stall_loop(self) -> None:
        while not self._stop.is_set():
            while len(self._held) < self.stalled and not self._stop.is_set():
                try:
                    s = self._open(self.stall_from)
                    s.sendall(STALL_PREFIX)
                    s.setblocking(False)
                except OSError:
                    continue
                self._held.append(s)
                self.stats.stalled_opened += 1
            for s in list(self._held):  # the listener closed it: it is opened again above
                try:
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._held.remove(s)
                s.close()
                self.stats.stalled_closed_by_listener += 1
            self._stop.wait(0.02)  # the attacker's own pace

    def _flood_loop(self) -> None:
        period = 1.0 / self.flood_per_s
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self._open(self.flood_from).close()
                self.stats.flood_connections += 1
            except OSError:
                self.stats.flood_failures += 1
            due += period
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)  # the flood's rate
            elif delay < -1.0:
                due = time.monotonic()  # fell behind (a busy machine): do not burst to catch up

    def start(self) -> None:
        self._t0 = time.monotonic()
        if self.stalled:
            self._threads.append(threading.Thread(target=self._stall_loop, name="attack-stall", daemon=True))
        if self.flood_per_s > 0:
            self._threads.append(threading.Thread(target=self._flood_loop, name="attack-flood", daemon=True))
        for t in self._threads:
            t.start()

    def held(self) -> int:
        """Stalled connections open right now."""
        return len(self._held)

    def wait_held(self, n: int, timeout: float) -> bool:
        """Waits until ``n`` stalled connections are open (False at the timeout)."""
        end = time.monotonic() + timeout
        while len(self._held) < n:
            if time.monotonic() > end:
                return False
            self._stop.wait(0.01)  # polling the stall thread's count
        return True

    def stop(self) -> AttackStats:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        for s in self._held:
            s.close()
        self._held.clear()
        self.stats.seconds = time.monotonic() - self._t0
        return self.stats

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m livemig.benchmark.attack HOST PORT [--stalled N] [--flood R] [--stall-from A]
    [--flood-from A]``: attacks until stdin closes, in a process of its own (so a source measured
    beside it shares no interpreter with it); prints ``held N`` once the stalled connections are
    open, and the stats as JSON at the end."""
    import argparse
    import json
    import sys
    from dataclasses import asdict

    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--stalled", type=int, default=0)
    ap.add_argument("--flood", type=float, default=0.0)
    ap.add_argument("--stall-from", default=None)
    ap.add_argument("--flood-from", default=None)
    a = ap.parse_args(argv)
    attack = Attack(a.host, a.port, stalled=a.stalled, flood_per_s=a.flood, stall_from=a.stall_from,
                    flood_from=a.flood_from)
    with attack:
        held = attack.wait_held(a.stalled, 30)
        print(f"held {attack.held() if held else -1}", flush=True)
        sys.stdin.read()  # until the caller closes it
        held_at_end = attack.held()
    print(json.dumps({**asdict(attack.stats), "held_at_end": held_at_end}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["STALL_PREFIX", "Attack", "AttackStats"]
