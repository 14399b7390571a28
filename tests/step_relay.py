"""A relay that loses one direction of the first connection's main channel from a chosen frame on:
the one-way losses of the commit point tests (docs/protocol.md, "The commit point"). It follows
the frames both ways (the handshake, then the frames of main and of the return path), and once
a frame matching the plan goes by in the planned direction, that frame and everything after it
that way are dropped, the end of the stream included (a lost link carries no FIN either), while
the other direction flows on. Optionally every connection is cut a moment later, as keepalive
would end a link that lost its acknowledgements. Later connections (the resumes) are relayed
untouched. ``dropped`` records what was lost, so a test can check the loss really happened; ``log``
records every frame of the first main channel as it went by, both ways, in the order the relay saw
them (a frame one side sent in answer to another is logged after it)."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from livemig.protocol import FrameType

if TYPE_CHECKING:
    from typing_extensions import Self

Direction = Literal["to_destination", "to_source"]
_PREFIX = struct.Struct("<8sHBBI")  # handshake message: magic, version, type, reserved, length
_HELLO = 1
_HEADER = struct.Struct("<BBHIQQ")  # frame: type, flags, reserved, count, arg, length


@dataclass
class Loss:
    """Lose ``direction`` from the first frame of ``frame_type`` (with ``count``/``arg`` when
    given: a COMMAND's number is its arg, an ACK's kind its count and value its arg)."""

    direction: Direction
    frame_type: FrameType
    count: int | None = None
    arg: int | None = None
    cut_after_s: float | None = None  #: then cut every connection this long after the loss began
    dropped: list[tuple[FrameType, int, int]] = field(default_factory=list)  #: (type, count, arg) lost
    lost: threading.Event = field(default_factory=threading.Event)
    cut: threading.Event = field(default_factory=threading.Event)

    def matches(self, direction: Direction, ftype: int, count: int, arg: int) -> bool:
        return (direction == self.direction and ftype == self.frame_type
                and (self.count is None or count == self.count) and (self.arg is None or arg == self.arg))


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class StepRelay:
    """Listens on 127.0.0.1 and relays to ``target`` ("host:port"), losing what ``loss`` says
    (None: nothing, the relay only logs)."""

    def __init__(self, target: str, loss: Loss | None = None) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.loss = loss or Loss("to_source", FrameType.ERROR, count=-1)  # (no ERROR has count -1)
        self.log: list[tuple[Direction, FrameType, int, int]] = []  #: (direction, type, count, arg)
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._first = True
        self.connections = 0
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
                main, self._first = self._first, False
                self.connections += 1
            if main:
                self._spawn(self._frames, client, up, "to_destination", 1)
                self._spawn(self._frames, up, client, "to_source", 2)
            else:
                self._spawn(self._plain, client, up)
                self._spawn(self._plain, up, client)

    def cut(self) -> None:
        """Shuts every connection down both ways."""
        with self._lock:
            socks = list(self._socks)
        self.loss.cut.set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _plain(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._shut(src, dst)

    @staticmethod
    def _handshake(src: socket.socket, dst: socket.socket, messages: int) -> bool:
        for _ in range(messages):
            prefix = _recv_exact(src, _PREFIX.size)
            body = None if prefix is None else _recv_exact(src, _PREFIX.unpack(prefix)[4])
            if prefix is None or body is None:
                return False
            dst.sendall(prefix + body)
            if _PREFIX.unpack(prefix)[2] == _HELLO and len(body) > 26 and body[26] == 1:
                messages += 1  # an AUTH follows
        return True

    def _frames(self, src: socket.socket, dst: socket.socket, direction: Direction, messages: int) -> None:
        loss = self.loss
        losing = False
        try:
            if not self._handshake(src, dst, messages):
                raise OSError("handshake ended")
            while (head := _recv_exact(src, _HEADER.size)) is not None:
                ftype, _flags, _res, count, arg, length = _HEADER.unpack(head)
                payload = _recv_exact(src, length) if length else b""
                if payload is None:
                    break
                if not losing and loss.matches(direction, ftype, count, arg):
                    losing = True
                    loss.lost.set()
                    if loss.cut_after_s is not None:
                        t = threading.Timer(loss.cut_after_s, self.cut)
                        t.daemon = True
                        t.start()
                if losing:
                    loss.dropped.append((FrameType(ftype), count, arg))
                    continue
                with self._lock:
                    self.log.append((direction, FrameType(ftype), count, arg))
                dst.sendall(head + payload)
        except OSError:
            pass
        if losing:
            loss.cut.wait(60)  # a lost link carries no FIN: the other side learns of it from a cut only
        self._shut(src, dst)

    def close(self) -> None:
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        self.cut()
        for t in self._threads:
            t.join(10)
        with self._lock:
            for s in self._socks:
                s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Direction", "Loss", "StepRelay"]
