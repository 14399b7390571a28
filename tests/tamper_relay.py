"""A relay that reads the wire as it forwards it: after each connection's handshake it follows the
frames of the main channel (and of the return path), and tampers with them on request, the way a
broken network card, a bad switch or a buggy peer would: flip one byte of a page in flight, or play
an old page frame again once the destination says its workload runs. The oracle's negative tests
prove the generic oracle catches what it does (docs/design.md rule 10).

Only the first connection (the main channel and its return path) is parsed; the others (urgent,
extra page channels) are forwarded untouched. Frames are assumed without the checksums trailer
(the tests do not negotiate it: a CRC would catch a flip before any oracle)."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from livemig.protocol import AckKind, Command, FrameType

if TYPE_CHECKING:
    from typing_extensions import Self

_PREFIX = struct.Struct("<8sHBBI")  # handshake message: magic, version, type, reserved, length
_HELLO, _AUTH, _ACCEPT = 1, 2, 3
_HEADER = struct.Struct("<BBHIQQ")  # frame: type, flags, reserved, count, arg, length


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


@dataclass
class Tampering:
    """What to do to the main channel's page frames (to the destination)."""

    flip_frame: int | None = None  #: flip one byte of the payload of this PAGES frame (0: the first), or of
    #: the first later one long enough for ``flip_offset``
    flip_offset: int = 100  #: ... at this byte of its payload
    replay_frame: int | None = None  #: capture this PAGES frame and send it again after the destination's
    #: ACK that its workload runs (postcopy start), or after its first REQUEST (``replay_on``)
    replay_on: str = "ack"  #: "ack" or "request" (the first page request on the return path after the ACK)
    flipped_page: int | None = field(default=None, init=False)  #: the page whose byte was flipped
    replayed: tuple[int, int] | None = field(default=None, init=False)  #: (first page, count) sent again
    acked: threading.Event = field(default_factory=threading.Event, init=False)


class TamperRelay:
    """Listens on 127.0.0.1 and relays to ``target`` ("host:port"), tampering as ``plan`` says."""

    def __init__(self, target: str, plan: Tampering) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.plan = plan
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._first = True
        self._replay: bytes | None = None  # a captured frame to send to the destination again
        self._main_dst: socket.socket | None = None  # the destination's end of the main channel
        self._send_lock = threading.Lock()  # whole frames to the destination, never interleaved
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
            up = socket.create_connection(self._target)
            with self._lock:
                self._socks += [client, up]
                main, self._first = self._first, False
            if main:
                self._spawn(self._to_destination, client, up)
                self._spawn(self._to_source, up, client)
            else:
                self._spawn(self._plain, client, up)
                self._spawn(self._plain, up, client)

    @staticmethod
    def _plain(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _handshake(src: socket.socket, dst: socket.socket, messages: int) -> bool:
        """Forwards ``messages`` handshake messages (the source: HELLO, and AUTH when it has a
        secret); False when the stream ended."""
        for _ in range(messages):
            prefix = _recv_exact(src, _PREFIX.size)
            if prefix is None:
                return False
            body = _recv_exact(src, _PREFIX.unpack(prefix)[4])
            if body is None:
                return False
            dst.sendall(prefix + body)
            if _PREFIX.unpack(prefix)[2] == _HELLO and len(body) > 26 and body[26] == 1:
                messages += 1  # the source authenticates: an AUTH follows
        return True

    def _frames(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        pages_seen = 0
        requested = False  # a REQUEST came back (the return path only)
        held: list[bytes] | None = None  # return-path frames held back until the replay
        try:
            while (head := _recv_exact(src, _HEADER.size)) is not None:
                ftype, _flags, _res, count, arg, length = _HEADER.unpack(head)
                payload = _recv_exact(src, length) if length else b""
                if payload is None:
                    break
                frame = head + payload
                if tamper:
                    if ftype == FrameType.PAGES:
                        frame = self._tamper_pages(pages_seen, arg, count, frame)
                        pages_seen += 1
                    with self._send_lock:
                        dst.sendall(frame)
                    continue
                if ftype == FrameType.REQUEST:
                    requested = True
                if ftype == FrameType.ACK and count == AckKind.GUEST_RUNS and arg == Command.POSTCOPY_START:
                    self.plan.acked.set()
                    held = []
                # The destination's workload runs (and, with replay_on "request", has asked for a
                # page): play the captured frame to it now, before the source hears of the ack (so
                # before it can send COMPLETE). Until then the return path is held back.
                if held is not None and (self.plan.replay_on == "ack" or requested):
                    self._play_replay()
                    for f in (*held, frame):
                        dst.sendall(f)
                    held = None
                    continue
                if held is not None and self._replay is not None:
                    held.append(frame)
                    continue
                dst.sendall(frame)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _tamper_pages(self, index: int, first: int, count: int, frame: bytes) -> bytes:
        plan = self.plan
        if index == plan.replay_frame:
            plan.replayed = (first, count)
            self._replay = frame
        at = _HEADER.size + plan.flip_offset
        if plan.flip_frame is not None and index >= plan.flip_frame and plan.flipped_page is None and at < len(frame):
            # This frame or, when it is too short for the offset, the first later one that is not.
            plan.flipped_page = first + plan.flip_offset // 4096
            frame = frame[:at] + bytes([frame[at] ^ 0x5A]) + frame[at + 1:]
        return frame

    def _play_replay(self) -> None:
        frame, self._replay = self._replay, None
        if frame is not None and self._main_dst is not None:
            with self._send_lock:  # at a frame boundary of the main channel
                self._main_dst.sendall(frame)

    def _to_destination(self, src: socket.socket, dst: socket.socket) -> None:
        self._main_dst = dst
        if self._handshake(src, dst, 1):
            self._frames(src, dst, tamper=True)

    def _to_source(self, src: socket.socket, dst: socket.socket) -> None:
        # The destination's HELLO, its AUTH when the source authenticated (the source's HELLO said
        # so; the tests run without a secret), and its ACCEPT; then the return path's frames.
        if self._handshake(src, dst, 2):
            self._frames(src, dst, tamper=False)

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
