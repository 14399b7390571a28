"""A TCP relay between a source and a destination on loopback that cuts every connection at a
chosen point: the fault injector of the recovery tests. Real sockets both ways; the peers see
exactly what a broken network shows them (a stream that ends, mid-frame or not).

Cut points are byte offsets in everything the relay forwards (both directions, every connection
since the last cut), or "after n more bytes in one direction" (armed from a test hook). At a cut,
the chunk in flight is forwarded only up to the cut point, then every open connection is shut down
both ways. Connections made after a cut (a resume) are relayed again, towards the next cut point.
``rate_bps`` paces the relay like a slow link, so a small region takes long enough to be cut in
the middle of postcopy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from typing_extensions import Self


Direction = Literal["to_destination", "to_source"]


class FaultRelay:
    """Listens on 127.0.0.1 and relays each connection to ``target`` ("host:port")."""

    def __init__(self, target: str, *, cuts: Iterable[int] = (), rate_bps: float = 0.0) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._lock = threading.Lock()
        self._cuts = sorted(cuts)  # offsets counted from the last cut
        self._since_cut = 0
        self._armed: tuple[Direction, int] | None = None
        self._dir_bytes: dict[Direction, int] = {"to_destination": 0, "to_source": 0}
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._rate = rate_bps
        self._held: set[Direction] = set()
        self._closed = False
        self.cuts_done = 0
        self.cut_times: list[float] = []  #: time.monotonic() of each cut
        self.connections = 0
        #: bytes forwarded each way on each connection, in the order they were accepted
        self.per_connection: list[dict[Direction, int]] = []
        self.cut_event = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.address = f"127.0.0.1:{self._lsock.getsockname()[1]}"
        t = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        t.start()
        self._threads.append(t)

    # -- control --
    def forwarded(self, direction: Direction) -> int:
        """Bytes forwarded ``direction`` so far, every connection (an independent count of what the
        peers sent)."""
        with self._lock:
            return self._dir_bytes[direction]

    def arm_cut_after(self, direction: Direction, nbytes: int) -> None:
        """Cut once ``nbytes`` more bytes went ``direction``."""
        with self._lock:
            self._armed = (direction, self._dir_bytes[direction] + nbytes)

    def hold(self, direction: Direction) -> None:
        """Stops forwarding ``direction`` until the next cut, which drops what was held back."""
        with self._lock:
            self._held.add(direction)

    def retarget(self, target: str) -> None:
        """New connections go to ``target`` from now on (a destination restarted elsewhere)."""
        host, _, port = target.rpartition(":")
        with self._lock:
            self._target = (host, int(port))

    def cut(self) -> None:
        """Cuts every open connection now."""
        with self._lock:
            pairs = self._take_cut_locked()
        self._shut(pairs)

    def close(self) -> None:
        """Stops relaying and joins its threads."""
        with self._lock:
            self._closed = True
            pairs = list(self._pairs)
            self._pairs.clear()
        self.cut_event.set()  # releases pumps that hold a direction back
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        self._shut(pairs)
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --
    def _take_cut_locked(self) -> list[tuple[socket.socket, socket.socket]]:
        pairs = list(self._pairs)
        self._pairs.clear()
        self._since_cut = 0
        self._armed = None
        self._held.clear()
        self.cuts_done += 1
        self.cut_times.append(time.monotonic())
        self.cut_event.set()
        return pairs

    @staticmethod
    def _shut(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            with self._lock:
                target = self._target
            try:
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # nobody there: the source sees the connection close
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
                self.connections += 1
                counts: dict[Direction, int] = {"to_destination": 0, "to_source": 0}
                self.per_connection.append(counts)
            for src, dst, d in ((client, upstream, "to_destination"), (upstream, client, "to_source")):
                t = threading.Thread(target=self._pump, args=(src, dst, d, counts), daemon=True)
                t.start()
                self._threads.append(t)

    def _allow(self, direction: Direction, n: int) -> tuple[int, bool]:
        """How many of ``n`` bytes may go, and whether a cut follows them."""
        with self._lock:
            limit = n
            if self._cuts:
                limit = min(limit, max(0, self._cuts[0] - self._since_cut))
            if self._armed is not None and self._armed[0] == direction:
                limit = min(limit, max(0, self._armed[1] - self._dir_bytes[direction]))
            self._since_cut += limit
            self._dir_bytes[direction] += limit
            armed_hit = self._armed is not None and self._dir_bytes[self._armed[0]] >= self._armed[1]
            cut = limit < n or armed_hit or (bool(self._cuts) and self._since_cut >= self._cuts[0])
            if cut and self._cuts and self._since_cut >= self._cuts[0]:
                done = self._cuts.pop(0)
                self._cuts = [c - done for c in self._cuts]
            if cut:  # disarmed now, under the lock: another pump must not decide the same cut again
                self._armed = None
            return limit, cut

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction,
              counts: dict[Direction, int]) -> None:
        t0, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    held = direction in self._held
                    # A cut ends a hold and drops what was held: bytes read after the cut took
                    # this connection (and cleared the hold) belong to it too, not to the peer.
                    cut_off = all(src not in pair for pair in self._pairs)
                if cut_off:
                    return
                if held:  # dropped at the cut that ends the hold
                    self.cut_event.wait()
                    return
                n, cut = self._allow(direction, len(data))
                if n:
                    dst.sendall(data[:n])
                    sent += n
                    with self._lock:
                        counts[direction] += n
                if cut:
                    with self._lock:
                        pairs = self._take_cut_locked()
                    self._shut(pairs)
                    return
                if self._rate > 0:  # pace like a slow link
                    ahead = sent / self._rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._pairs = [p for p in self._pairs if src not in p]
            # both pumps of a pair end here; the second close is harmless
            src.close()
            dst.close()
