"""Hostile input: who may connect, malformed handshakes, oversized frames after the handshake, slow
and silent peers. Each is refused with a clear error, and the listener keeps serving: a real
``livemig listen`` process (secret, 1 s timeout) takes the abuse, and a good migration follows."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig import local, migration, wire
from livemig.errors import AuthenticationError, ConnectionLost, MigrationError, ProtocolError
from livemig.guest import Guest, GuestConfig
from livemig.migration import device_state
from livemig.protocol import ACK_NEVER_RAN, AckKind, Command, FrameType
from livemig.workload import ModelGuest

PAGE = 4096
SECRET = b"hostile-test-secret"
REGION = 16 << 20  # 4096 pages: room for a PAGES frame past the 1024-page frame limit
_PREFIX = struct.Struct("<8sHBBI")
_HELLO = struct.Struct("<BBHIQQHBB16s32s")
_FRAME = struct.Struct("<BBHIQQ")  # type, flags, reserved, count, arg, length
PAGES, DISCARD, DEVICE_STATE, COMMAND, ERROR = 0x01, 0x03, 0x05, 0x06, 0x13


def opts(secret: bytes | None = SECRET, timeout: float = 5.0, **kw: Any) -> wire.WireOptions:
    args: dict[str, Any] = {"page_size": PAGE, "region_bytes": REGION, "secret": secret, "timeout": timeout}
    return wire.WireOptions(**{**args, **kw})


def frame(t: int, count: int = 0, arg: int = 0, length: int = 0) -> bytes:
    return _FRAME.pack(t, 0, 0, count, arg, length)


def hello(role: int = 1, kind: int = 0, page_size: int = PAGE, region: int = REGION, auth: int = 0,
          reserved: int = 0, mtype: int = 1, body_len: int | None = None) -> bytes:
    body = _HELLO.pack(role, kind, 0, page_size, region, 0, 0, auth, reserved, b"s" * 16, b"n" * 32)
    n = len(body) if body_len is None else body_len
    return _PREFIX.pack(wire.MAGIC, 1, mtype, 0, n) + body[:n]


# ---- the listener: a real `livemig listen` process ----


class Listen:
    """``livemig listen`` (no --once) with a secret, a 1 s timeout and a 1 s resume deadline; one JSON
    line per attempt."""

    def __init__(self, dest: local.LocalDestination) -> None:
        self.dest = dest
        self.address = dest.address
        self.host, port = dest.address.rsplit(":", 1)
        self.port = int(port)
        self._buf = bytearray()
        self._refusals_seen = 0

    def summary(self, deadline: float = 20.0) -> dict[str, Any]:
        """The listener's next JSON summary line."""
        out = self.dest.process.stdout
        assert out is not None
        end = time.monotonic() + deadline
        with selectors.DefaultSelector() as sel:
            sel.register(out.fileno(), selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = end - time.monotonic()
                assert left > 0 and sel.select(left), "the listener printed no summary in time"
                chunk = os.read(out.fileno(), 65536)
                assert chunk, f"the listener exited: {self.dest.stderr_text()}"
                self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return dict(json.loads(line))

    def failure(self) -> str:
        s = self.summary()
        assert s["ok"] is False, s
        return str(s["error"])

    def refusal(self, deadline: float = 20.0) -> str:
        """The listener's next refused connection, from its log (one line each: interval 0). A
        refused handshake is no migration: no summary line comes for it."""
        end = time.monotonic() + deadline
        while True:
            lines = self.dest.stderr_text().splitlines()
            new = [ln for ln in lines if ln.startswith("livemig: refused ")][self._refusals_seen:]
            if new:
                self._refusals_seen += 1
                return new[0]
            assert time.monotonic() < end, f"the listener logged no refusal in time: {lines[-5:]}"
            time.sleep(0.02)  # polling the log file the listener writes

    def raw(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=10)

    def good_migration(self, postcopy: bool = False) -> None:
        """A real migration (with the secret) still works, verified on the destination."""
        cfg = migration.MigrationConfig(postcopy=postcopy, secret=SECRET, verify=True, timeout=5.0)
        try:
            r = migration.migrate(self.address, ModelGuest(4 << 20, GuestConfig(workload="increment")), cfg)
        except migration.MigrationFailed as e:  # the listener's side of it says why
            err = self.dest.stderr_text()[-2000:]
            raise AssertionError(f"{e}; the listener: {self.summary().get('error')}; its stderr: {err}") from e
        assert r.ok and r.verify is not None and r.verify.mismatches == 0, r
        s = self.summary()
        assert s["ok"] is True and s["verify"]["mismatches"] == 0, s
        assert self.dest.process.poll() is None


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listen]:
    secret_file = tmp_path_factory.mktemp("hostile") / "secret"
    secret_file.write_bytes(SECRET)
    argv = [sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--announce", "--json", "--quiet",
            "--no-progress", "--timeout", "1", "--resume-deadline", "1", "--secret-file", str(secret_file),
            "--refusal-log-interval", "0"]
    with local.local_destination(command=argv) as dest:
        yield Listen(dest)
        assert dest.process.poll() is None, "the listener died"


# ---- who may connect ----


@pytest.mark.timeout(30)
def test_listener_beyond_loopback_needs_a_secret_before_it_takes_a_connection() -> None:
    with wire.Listener("0.0.0.0:0") as L:
        c = socket.create_connection(("127.0.0.1", L.address.port))  # waits in the backlog
        with c, pytest.raises(AuthenticationError, match=r"refusing to accept sources on 0\.0\.0\.0:\d+ beyond "
                                                          r"loopback without a shared secret"):
            L.accept(opts(secret=None))
        with pytest.raises(AuthenticationError, match="beyond loopback"):
            migration.serve(L, migration.DestinationConfig(), wait=1.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [SECRET, None])
def test_listener_beyond_loopback_accepts_with_a_secret_or_when_insecure(secret: bytes | None) -> None:
    with wire.Listener("0.0.0.0:0", insecure=secret is None) as L:
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(L.accept(opts(secret=secret))))
        t.start()
        with wire.connect(f"127.0.0.1:{L.address.port}", opts(secret=secret)) as c:
            t.join(10)
            assert c.negotiated == out[0].negotiated
            out[0].close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("secret", [None, b"wrong secret"])
def test_a_source_without_the_secret_is_refused_and_the_listener_serves_on(listener: Listen,
                                                                           secret: bytes | None) -> None:
    cfg = migration.MigrationConfig(secret=secret, timeout=5.0)
    with pytest.raises(MigrationError, match="connect: .*(secret|authentication)"):
        migration.migrate(listener.address, ModelGuest(4 << 20, GuestConfig()), cfg)
    err = listener.refusal()
    assert ("wrong shared secret" in err or "does not know the shared secret" in err
            or "peer offered no authentication" in err), err
    listener.good_migration()


# ---- malformed handshakes ----


def _garbage() -> bytes:
    return bytes(range(256)) * 2


MALFORMED = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
    (_garbage(), "bad magic"),
    (wire.MAGIC[:5], "closed the connection while we waited for HELLO (got 5 of 16 bytes)"),
    (hello()[:40], "closed the connection while we waited for HELLO (got 24 of 76 bytes)"),
    (hello(body_len=10), "HELLO body of 10 bytes, expected 76"),
    (_PREFIX.pack(wire.MAGIC, 1, 1, 0, 4097), "HELLO of 4097 bytes, past the limit of 4096"),
    (_PREFIX.pack(wire.MAGIC, 1, 1, 0, 0xFFFFFFFF), "HELLO of 4294967295 bytes, past the limit of 4096"),
    (hello(mtype=3), "expected HELLO, got message type 3"),
    (hello(mtype=77), "expected HELLO, got message type 77"),
    (hello(role=2), "expected a source, the peer says it is a destination"),
    (hello(role=9), "unknown role 9"),
    (hello(kind=7), "unknown channel kind 7"),
    (hello(auth=5), "bad auth flag 5"),
    (hello(reserved=1), "reserved byte 1"),
    (hello(page_size=0), "page size 0 is not a power of two"),
    (hello(kind=2), "a shared secret is configured here but the peer offered no authentication"),
]


@pytest.mark.timeout(60)
def test_malformed_handshakes_are_refused_and_the_listener_serves_on(listener: Listen) -> None:
    for data, message in MALFORMED:
        with listener.raw() as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # it refused and closed before we were done
                pass
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:  # it closed with our extra bytes unread
                pass
        err = listener.refusal()
        assert message in err, (data[:20], err)
        types = []  # what the peer heard: at most our HELLO, then a REJECT; never an ACCEPT
        while len(answer) >= _PREFIX.size:
            magic, _v, mtype, _r, n = _PREFIX.unpack_from(answer)
            assert magic == wire.MAGIC
            types.append(mtype)
            answer = answer[_PREFIX.size + n:]
        assert types in ([], [4], [1, 4]), types
    listener.good_migration()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mac", [b"", b"x" * 31, b"x" * 33, b"x" * 4096])
def test_auth_of_the_wrong_length_is_refused(mac: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        mine = hello(auth=1)
        a.sendall(mine + _PREFIX.pack(wire.MAGIC, 1, 2, 0, len(mac)) + mac)
        with pytest.raises(AuthenticationError, match="does not know the shared secret"):
            wire.handshake_destination(b, opts())


_ALLOWED = (ProtocolError, ConnectionLost)  # AuthenticationError is a ProtocolError


def _handshake_with(data: bytes, side: str, with_secret: bool) -> None:
    """Feeds ``data`` (then end of stream) to one side's handshake: it must fail cleanly or pass."""
    a, b = socket.socketpair()
    with a, b:
        peer, mine = (a, b) if side == "destination" else (b, a)
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        handshake = wire.handshake_destination if side == "destination" else wire.handshake_source
        try:
            handshake(mine, opts(secret=SECRET if with_secret else None, timeout=2.0))
        except _ALLOWED:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_handshake_destination(data: bytes, with_secret: bool) -> None:
    _handshake_with(data, "destination", with_secret)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 16 + 76 - 1), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 16 + 76), st.booleans())
def test_fuzz_mutated_hello(flips: list[tuple[int, int]], cut: int, with_secret: bool) -> None:
    data = bytearray(hello(auth=int(with_secret)))
    for at, x in flips:
        data[at] ^= x
    _handshake_with(bytes(data[:cut]), "destination", with_secret)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_handshake_source(data: bytes, with_secret: bool) -> None:
    _handshake_with(data, "source", with_secret)


# ---- oversized and misplaced frames after the handshake ----


def _fake_source(address: str, extra: int = 1) -> wire.Connection:
    """A source that passes the handshake (secret, urgent channel, `extra` page channels)."""
    caps = wire.Capabilities.all(extra_channels=extra).without("checksums")
    return wire.connect(address, opts(capabilities=caps))


OVERSIZED: list[tuple[str, bytes, str]] = [
    ("main", frame(DEVICE_STATE, length=1 << 40), "DEVICE_STATE frame: length 1099511627776 past the limit of 268435456"),
    ("main", frame(COMMAND, arg=1, length=1 << 20), "COMMAND frame: length 1048576 past the limit of 65536"),
    ("main", frame(DISCARD, count=1 << 20, length=16 << 20), "DISCARD frame: 1048576 ranges, more than the limit of 65536"),
    ("main", frame(ERROR, length=1 << 63), "ERROR frame: length 9223372036854775808 past the limit of 4096"),
    ("main", frame(PAGES, 2048, 0, 2048 * PAGE), "PAGES frame: 2048 pages, more than the limit of 1024"),
    ("main", frame(PAGES, 1, 0, 1 << 62), "PAGES frame: length 4611686018427387904 is not 1 pages of 4096 bytes"),
    ("pages", frame(PAGES, 2048, 0, 2048 * PAGE), "PAGES frame: 2048 pages, more than the limit of 1024"),
    ("pages", frame(PAGES, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0), "outside the region of 4096 pages"),
    ("pages", frame(DEVICE_STATE, length=8) + b"12345678", "control frame on an extra page channel"),
    ("urgent", frame(ERROR, length=1 << 40), "ERROR frame: length 1099511627776 past the limit of 4096"),
    ("urgent", frame(0x10, 1, 0), "REQUEST frame: not allowed on a source-to-destination channel"),
]


@pytest.mark.timeout(60)
def test_oversized_frames_on_every_channel_are_refused_and_the_listener_serves_on(listener: Listen) -> None:
    for channel, data, message in OVERSIZED:
        with _fake_source(listener.address) as c:
            ch = {"main": c.main, "pages": c.pages[0] if c.pages else None, "urgent": c.urgent}[channel]
            assert ch is not None
            ch.sock.sendall(data)
            err = listener.failure()
            assert message in err, (channel, err)
            # The destination told us why on the return path (after "never ran": its workload had
            # not started), then closed.
            with pytest.raises((ProtocolError, ConnectionLost)) as told:
                first = wire.expect(c.reader(), FrameType.END, FrameType.ACK)
                assert (first.count, first.value) == (AckKind.GUEST_RUNS, ACK_NEVER_RAN)
                wire.expect(c.reader(), FrameType.END)
            assert isinstance(told.value, ConnectionLost) or message in str(told.value)
    listener.good_migration(postcopy=True)


def _fake_destination(L: wire.Listener, bad: bytes, done: threading.Event) -> None:
    """Passes the handshake, sends `bad` on the return path, then drains what the source sends."""
    with L.accept(opts(capabilities=wire.Capabilities.all().without("checksums", "urgent-channel"))) as c:
        c.main.sock.sendall(bad)
        c.main.sock.settimeout(10)
        try:
            while c.main.sock.recv(1 << 20):
                pass
        except OSError:
            pass
    done.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (frame(ERROR, length=1 << 40), "ERROR frame: length 1099511627776 past the limit of 4096"),
        (frame(0x11, length=3), "RECEIVED_BITMAP frame: length 3, the region's bitmap is 512 bytes"),
        (frame(0x10, 8, 4094), "REQUEST frame: pages [4094, 4094 + 8) outside the region of 4096 pages"),
        (frame(PAGES, 1, 0, PAGE), "PAGES frame: not allowed on a return path"),
        (frame(DEVICE_STATE, length=1 << 40), "DEVICE_STATE frame: length 1099511627776 past the limit"),
    ],
)
def test_oversized_frames_on_the_return_path_fail_the_source_cleanly(bad: bytes, message: str) -> None:
    with wire.Listener("127.0.0.1:0") as L:
        done = threading.Event()
        t = threading.Thread(target=_fake_destination, args=(L, bad, done))
        t.start()
        try:
            cfg = migration.MigrationConfig(secret=SECRET, timeout=5.0, disable_capabilities=frozenset({"urgent-channel"}))
            with pytest.raises(MigrationError, match="destination: ") as e:
                migration.migrate(str(L.address), ModelGuest(REGION, GuestConfig(workload="increment")), cfg)
            assert message in str(e.value)
        finally:
            t.join(20)
        assert done.is_set()


# ---- slow and silent peers ----


@pytest.mark.timeout(30)
def test_a_trickling_handshake_is_cut_off_at_the_timeout(listener: Listen) -> None:
    """One byte every 50 ms keeps each read alive; the handshake as a whole still ends at 1 s."""
    data = hello(auth=1)
    sent = [0]

    def trickle(s: socket.socket) -> None:
        try:
            for i in range(len(data)):
                s.sendall(data[i:i + 1])
                sent[0] += 1
                time.sleep(0.05)  # the slow peer under test, not synchronisation
        except OSError:
            pass

    with listener.raw() as s:
        t = threading.Thread(target=trickle, args=(s,))
        t.start()
        err = listener.refusal()
        with contextlib.suppress(OSError):  # the listener may have reset it already
            s.shutdown(socket.SHUT_RDWR)
        t.join(10)
    assert "too slow: no whole HELLO within the handshake's 1.0 s" in err, err
    assert sent[0] < len(data)
    listener.good_migration()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut", [10, 24 + PAGE // 2], ids=["in-header", "in-payload"])
def test_a_source_silent_after_the_handshake_times_out_and_the_listener_serves_on(listener: Listen,
                                                                                   cut: int) -> None:
    whole = frame(PAGES, 1, 0, PAGE) + b"\x5a" * PAGE
    with _fake_source(listener.address, extra=0) as c:
        c.main.sock.sendall(whole + whole[:cut])  # one whole frame, then part of the next
        err = listener.failure()
        assert "the source was silent for 1.0 s" in err, err
        # Its workload never ran: it says so first (a source that sent its start command resumes its own)
        ack = wire.expect(c.reader(), FrameType.ACK)
        assert (ack.count, ack.value) == (AckKind.GUEST_RUNS, ACK_NEVER_RAN)
        with pytest.raises(ProtocolError, match="the source was silent"):
            wire.expect(c.reader(), FrameType.END)
    listener.good_migration()


@pytest.mark.timeout(30)
def test_a_source_silent_in_postcopy_fails_the_destination_without_a_hang(listener: Listen) -> None:
    """The destination guest runs and blocks on faults for pages that never come: the destination
    pauses at its timeout, gives up when no resume comes by its resume deadline (its guest's
    blocked threads are woken, not waited for) and serves on."""
    state = Guest(np.zeros(REGION, np.uint8), GuestConfig(workload="increment")).export_state()
    blob = device_state.pack(device_state.KindLine(ModelGuest.kind, ModelGuest.version), {"cmd_id": 1, "last_round_id": None}, state)
    with _fake_source(listener.address, extra=0) as c:
        w = c.writer()
        w.send_device_state(blob)
        w.send_command(Command.POSTCOPY_START)
        first = wire.expect(c.reader(), FrameType.REQUEST, FrameType.ACK)  # its guest runs (and faults) here
        assert first.type in (FrameType.REQUEST, FrameType.ACK)
        err = listener.failure()
        assert "the source was silent for 1.0 s" in err, err
    listener.good_migration()


@pytest.mark.timeout(60)
def test_a_destination_silent_after_the_handshake_fails_the_source_within_its_timeout() -> None:
    with wire.Listener("127.0.0.1:0") as L:
        got: list[wire.Connection] = []
        release = threading.Event()

        def silent() -> None:
            got.append(L.accept(opts(region_bytes=0)))
            release.wait(30)  # accepts, then never reads or answers
            got[0].close()

        t = threading.Thread(target=silent)
        t.start()
        try:
            cfg = migration.MigrationConfig(secret=SECRET, timeout=1.0)
            with pytest.raises(MigrationError, match=r"read nothing for 1\.0+ s \(timeout\)|did not resume the guest within 1\.0 s"):
                migration.migrate(str(L.address), ModelGuest(16 << 20, GuestConfig(workload="increment")), cfg)
        finally:
            release.set()
            t.join(20)
