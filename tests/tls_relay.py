"""A man in the middle for encrypted connections: a TCP relay on loopback that follows each
connection's plaintext handshake (HELLO one way; HELLO and ACCEPT the other) and then the TLS
records after it, and does to them what an attacker on the path could: flip one byte of a record
that carries pages, stop forwarding in the middle of the TLS handshake (a peer that goes silent),
or keep a copy of everything the source sent, to play it to another destination later.

Only connections that go encrypted are parsed as TLS; the relay forwards any stream untouched
once it stops being what it expects. Flips and stalls apply to the first connection (the main
channel) unless ``connection`` says otherwise; later connections (a resume) are relayed clean.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from typing_extensions import Self

Direction = Literal["to_destination", "to_source"]
_PREFIX = struct.Struct("<8sHBBI")  # handshake message: magic, version, type, reserved, body length
_TLS_HEADER = 5  # content type, legacy version (2), length (2)
_APPLICATION_DATA = 23
PAGE_RECORD = 8192  #: a record longer than this carries page bytes (frames' headers are small)


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


@dataclass
class Attack:
    """What to do to one connection (``connection``: 0 is the first, the main channel)."""

    connection: int = 0
    flip_page_record: int | None = None  #: flip a byte of this page-carrying record to the destination (0: first)
    flip_offset: int = 100  #: ... at this offset of its encrypted body
    stall: tuple[Direction, int] | None = None  #: stop forwarding this way after n TLS records
    alter_hello: int | None = None  #: flip a byte of the source's HELLO body at this offset
    flipped: threading.Event = field(default_factory=threading.Event, init=False)
    stalled: threading.Event = field(default_factory=threading.Event, init=False)


class TlsRelay:
    """Listens on 127.0.0.1 and relays to ``target`` ("host:port"), attacking as ``attack`` says
    and keeping every connection's bytes to the destination in ``captured``."""

    def __init__(self, target: str, attack: Attack | None = None) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.attack = attack or Attack()
        self.captured: list[bytearray] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._lsock.getsockname()[1]}"
        self._spawn(self._accept_loop)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, up]
                index = len(self.captured)
                self.captured.append(bytearray())
            self._spawn(self._pump, client, up, "to_destination", index)
            self._spawn(self._pump, up, client, "to_source", index)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction, index: int) -> None:
        attack = self.attack if index == self.attack.connection else None
        capture = self.captured[index] if direction == "to_destination" else None
        try:
            # The plaintext handshake: the source's HELLO; the destination's HELLO and ACCEPT.
            for _ in range(1 if direction == "to_destination" else 2):
                prefix = _recv_exact(src, _PREFIX.size)
                body = None if prefix is None else _recv_exact(src, _PREFIX.unpack(prefix)[4])
                if prefix is None or body is None:
                    return
                if attack is not None and direction == "to_destination" and attack.alter_hello is not None:
                    at = attack.alter_hello
                    body = body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1:]
                self._send(dst, prefix + body, capture)
            records = pages = 0
            while (head := _recv_exact(src, _TLS_HEADER)) is not None:
                body = _recv_exact(src, int.from_bytes(head[3:5], "big"))
                if body is None:
                    return
                if attack is not None and attack.stall == (direction, records):
                    attack.stalled.set()
                    while src.recv(65536):  # read on, forward nothing: a peer gone silent
                        pass
                    return
                if (attack is not None and direction == "to_destination" and head[0] == _APPLICATION_DATA
                        and len(body) > PAGE_RECORD):
                    if pages == attack.flip_page_record:
                        at = attack.flip_offset
                        body = body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1:]
                        attack.flipped.set()
                    pages += 1
                records += 1
                self._send(dst, head + body, capture)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _send(self, dst: socket.socket, data: bytes, capture: bytearray | None) -> None:
        if capture is not None:
            with self._lock:
                capture += data
        dst.sendall(data)

    def close(self) -> None:
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop (close alone does not)
        except OSError:
            pass
        self._lsock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(10)
        for s in socks:
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(address: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Plays ``data`` (a captured stream to a destination) to ``address`` and returns what came
    back until the destination closed the connection (or ``timeout``)."""
    host, _, port = address.rpartition(":")
    back = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # refused early: what it said is read below
        try:
            while chunk := s.recv(65536):
                back += chunk
        except OSError:
            pass
    return bytes(back)


__all__ = ["PAGE_RECORD", "Attack", "Direction", "TlsRelay", "replay"]
