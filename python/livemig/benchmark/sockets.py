"""Sockets and buffers for raw baselines, shared by ``livemig bench`` and bench/ (pytest-benchmark)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt


def warm(n: int, value: int = 0x5A) -> npt.NDArray[np.uint8]:
    """n bytes, every page written (no first-touch faults in what is timed)."""
    a = np.empty(n, dtype=np.uint8)
    a.fill(value)
    return a


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
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


def parallel(jobs: list[Callable[[], object]]) -> float:
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


__all__ = ["parallel", "tcp_pairs", "warm"]
