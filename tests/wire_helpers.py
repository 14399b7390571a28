"""Shared fixtures for the wire tests: configs, page patterns, a byte-cutting TCP proxy."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import numpy as np

from livemig import _core

PAGE = 4096


def config(region_pages: int = 64, checksums: bool = False, timeout: float = 5.0, **kw: int) -> _core.WireConfig:
    return _core.WireConfig(page_size=PAGE, region_pages=region_pages, checksums=checksums, timeout=timeout, **kw)


def pattern(npages: int, seed: int = 0, zero_every: int = 0) -> np.ndarray:
    """npages pages of random bytes (warm: written here), every `zero_every`-th page all zero."""
    a = np.random.default_rng(seed).integers(0, 256, size=npages * PAGE, dtype=np.uint8)
    if zero_every:
        a.reshape(npages, PAGE)[::zero_every] = 0
    return a


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC32C (reflected polynomial 0x82F63B78), the oracle for the SSE4.2 version."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@dataclass
class CuttingProxy:
    """Forwards one TCP connection to `target`, but only the first `limit` bytes from the client;
    then it closes both sides (a peer vanishing at that exact byte). The other direction is
    forwarded whole. Threads end when both sockets are done."""

    target: tuple[str, int]
    limit: int
    listener: socket.socket = field(init=False)
    threads: list[threading.Thread] = field(default_factory=list)
    forwarded: int = 0

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        self.threads.append(t)

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}"

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target, timeout=10)
        client.settimeout(10)
        done = threading.Event()

        def close_both() -> None:
            done.set()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def back() -> None:
            try:
                while not done.is_set():
                    data = upstream.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
            except OSError:
                pass
            close_both()

        t = threading.Thread(target=back, daemon=True)
        t.start()
        self.threads.append(t)
        try:
            while self.forwarded < self.limit:
                data = client.recv(min(65536, self.limit - self.forwarded))
                if not data:
                    break
                upstream.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass
        close_both()
        t.join(10)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(10)
