"""Handshake, capabilities, authentication, transports, and peers that vanish at every stage."""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig import _core, wire
from livemig.errors import AuthenticationError, ConnectionLost, ProtocolError
from livemig.migration import DestinationConfig, MigrationConfig
from livemig.protocol import AckKind, Command, FrameType

from wire_helpers import PAGE, CuttingProxy, pattern

NPAGES = 64
REGION = NPAGES * PAGE


def opts(**kw: Any) -> wire.WireOptions:
    base: dict[str, Any] = {"page_size": PAGE, "region_bytes": REGION, "timeout": 5.0}
    base.update(kw)
    return wire.WireOptions(**base)


class Server:
    """Runs Listener.accept in a thread; result() gives the Connection or raises its error."""

    def __init__(self, address: str, options: wire.WireOptions) -> None:
        self.listener = wire.Listener(address, strict=True)  # its first refusal is the result
        self.options = options
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome.append(self.listener.accept(self.options))
        except BaseException as e:  # handed to the test thread
            self.outcome.append(e)

    def result(self) -> wire.Connection:
        self.thread.join(20)
        assert not self.thread.is_alive()
        out = self.outcome[0]
        if isinstance(out, BaseException):
            raise out
        assert isinstance(out, wire.Connection)
        return out

    def close(self) -> None:
        self.thread.join(20)
        if self.outcome and isinstance(self.outcome[0], wire.Connection):
            self.outcome[0].close()
        self.listener.close()


def pair(src: wire.WireOptions, dst: wire.WireOptions, address: str = "127.0.0.1:0") -> tuple[wire.Connection, wire.Connection, Server]:
    server = Server(address, dst)
    try:
        s = wire.connect(str(server.listener.address), src)
    except BaseException:
        server.close()
        raise
    return s, server.result(), server


# ---- addresses ----


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:80", wire.Address("tcp", "127.0.0.1", 80)),
        ("localhost:0", wire.Address("tcp", "localhost", 0)),
        ("[::1]:4444", wire.Address("tcp", "::1", 4444)),
        ("unix:/tmp/x.sock", wire.Address("unix", path="/tmp/x.sock")),
    ],
)
def test_parse_address(text: str, expect: wire.Address) -> None:
    assert wire.parse_address(text) == expect
    assert str(expect) == text


@pytest.mark.parametrize("text", ["nohost", "::1:80", "[::1]80", "h:99999", "h:x", "unix:", ":80"])
def test_parse_address_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        wire.parse_address(text)


# ---- transports and channels ----


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp4", "tcp6", "unix"])
def test_connect_negotiates_all_channels_and_moves_pages(transport: str, tmp_path: Path) -> None:
    if transport == "tcp6" and not has_ipv6():
        pytest.skip("no IPv6 loopback on this host")
    address = {"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0", "unix": f"unix:{tmp_path / 'mig.sock'}"}[transport]
    src_o = opts(capabilities=wire.Capabilities.all(extra_channels=2), secret=b"k")
    dst_o = opts(region_bytes=0, capabilities=wire.Capabilities.all(extra_channels=3), secret=b"k")
    s, d, server = pair(src_o, dst_o, address)
    with s, d:
        assert s.negotiated == d.negotiated == wire.Negotiated(wire.ALL_CAPABILITIES, 2)
        assert s.session == d.session and d.region_bytes == REGION and d.page_size == PAGE
        assert d.urgent is not None and [c.index for c in d.pages] == [0, 1]
        # Pages over every source-to-destination channel, each straight into the region.
        region = pattern(NPAGES, seed=9)
        dst = np.zeros_like(region)
        received = _core.PageBitmap(NPAGES)
        chans = s.channels()
        slices = np.array_split(np.arange(NPAGES), len(chans))

        def send(ch: wire.Channel, pages: np.ndarray) -> None:
            w = s.writer(ch)
            w.send_region(region, [(int(pages[0]), len(pages))])
            w.send_end()

        threads = [threading.Thread(target=send, args=(c, p)) for c, p in zip(chans, slices)]
        for t in threads:
            t.start()
        for ch in d.channels():
            r = d.reader(ch)
            r.attach_region(dst, received)
            assert wire.read_frame(r) == wire.Frame(FrameType.END)
        for t in threads:
            t.join()
        assert received.count() == NPAGES and np.array_equal(region, dst)
        # The return path is main's other direction.
        d.writer().send_request(5, 2)
        assert wire.read_frame(s.reader()) == wire.Frame(FrameType.REQUEST, 5, 2)
    server.close()


def queued_until_full(sock: socket.socket) -> int:
    """Bytes the kernel takes from a sender whose peer reads nothing, until a send would block."""
    sock.setblocking(False)
    total, chunk = 0, b"x" * PAGE
    while True:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("transport", "nbytes"), [("tcp", 256 << 10), ("unix", 64 << 10)])
def test_bound_queue_caps_what_the_kernel_holds_ahead(transport: str, nbytes: int, tmp_path: Path) -> None:
    """Postcopy's bound on the main channel (both sides): with the peer not reading, the kernel
    takes about ``nbytes`` (a page more at most) where its own buffers take several times that."""
    address = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path / 'q.sock'}"
    held = []
    for bound in (0, nbytes):
        s, d, server = pair(opts(), opts(region_bytes=0), address)
        with s, d:
            s.main.bound_queue("source", bound)
            d.main.bound_queue("destination", bound)
            held.append(queued_until_full(s.main.sock))
        server.close()
    unbounded, bounded = held
    assert bounded <= nbytes + PAGE
    assert unbounded > 2 * nbytes


@pytest.mark.parametrize("config", [MigrationConfig, DestinationConfig])
def test_a_queue_bound_below_the_minimum_is_refused(config: Any) -> None:
    with pytest.raises(ValueError, match="131072 bytes is below the minimum of 256 KiB"):
        config(postcopy_queue_bytes=128 << 10)
    assert config(postcopy_queue_bytes=0).postcopy_queue_bytes == 0  # no bound
    default = config().postcopy_queue_bytes
    assert default == wire.POSTCOPY_QUEUE_BYTES == wire.MIN_POSTCOPY_QUEUE_BYTES


def test_bound_queue_sets_the_options_each_side_owns() -> None:
    s, d, server = pair(opts(), opts(region_bytes=0))
    with s, d:
        rcvbuf = d.main.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        s.main.bound_queue("source", 0)  # 0: nothing changes
        d.main.bound_queue("destination", 0)
        assert s.main.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
        assert d.main.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == rcvbuf
        s.main.bound_queue("source", 256 << 10)
        d.main.bound_queue("destination", 256 << 10)
        assert s.main.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 64 << 10
        assert d.main.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP) == 256 << 10
        # The receive buffer never shrinks (under a window already advertised that drops
        # segments); it is locked at no less than four times the bound (the kernel's accounting).
        assert d.main.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == max(rcvbuf, 4 * (256 << 10))
    server.close()


# ---- capability negotiation ----


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("src_caps", "dst_caps", "expect"),
    [
        (wire.Capabilities.all(4), wire.Capabilities.all(1), wire.Negotiated(wire.ALL_CAPABILITIES, 1)),
        (wire.Capabilities.all(4), wire.Capabilities.all(4).without("multichannel"),
         wire.Negotiated(wire.ALL_CAPABILITIES - {"multichannel"}, 0)),
        (wire.Capabilities.all().without("checksums"), wire.Capabilities.all(),
         wire.Negotiated(wire.ALL_CAPABILITIES - {"checksums"}, 0)),
        (wire.Capabilities.none(), wire.Capabilities.all(2), wire.Negotiated(frozenset(), 0)),
    ],
)
def test_a_capability_is_used_only_when_both_announce_it(
    src_caps: wire.Capabilities, dst_caps: wire.Capabilities, expect: wire.Negotiated
) -> None:
    s, d, server = pair(opts(capabilities=src_caps), opts(capabilities=dst_caps))
    with s, d:
        assert s.negotiated == d.negotiated == expect
        assert len(s.pages) == len(d.pages) == expect.extra_channels
        assert (s.urgent is not None) == (d.urgent is not None) == expect.urgent_channel
        assert s.config().checksums == d.config().checksums == expect.checksums
    server.close()


def test_policy_without_hints_postcopy_or_local_fill() -> None:
    old = wire.Capabilities.all().without("hints-postcopy", "local-fill")
    n = wire.Capabilities.all().negotiate(old)
    assert n.hinting_allowed(postcopy_possible=False)  # precopy only: hints are safe
    assert not n.hinting_allowed(postcopy_possible=True)  # QEMU >= 6.2 behaviour
    assert not n.local_fill  # hinted pages are requested and served like any other
    full = wire.Capabilities.all().negotiate(wire.Capabilities.all())
    assert full.hinting_allowed(postcopy_possible=True) and full.local_fill


def test_unknown_capability_bits_from_a_newer_peer_are_ignored() -> None:
    assert wire.Capabilities.from_bits(0xFFFF_0000_0000_0000 | 1).names == {"hints-postcopy"}
    with pytest.raises(ValueError, match="unknown capabilities"):
        wire.Capabilities.all().without("teleport")


@pytest.mark.timeout(30)
def test_checksummed_connection_really_checks() -> None:
    s, d, server = pair(opts(), opts())
    with s, d:
        assert s.negotiated.checksums
        w = _core.FrameWriter(-1, s.config())
        w.send_pages(0, bytes(pattern(1)))
        data = bytearray(w.take_bytes())
        data[500] ^= 0x80
        s.main.sock.sendall(bytes(data))
        with pytest.raises(ProtocolError, match="CRC32C mismatch"):
            d.reader().next()
    server.close()


# ---- authentication ----


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("src_secret", "dst_secret", "src_msg", "dst_msg"),
    [
        (b"right", b"wrong", "wrong shared secret", "does not know the shared secret"),
        (None, b"secret", "requires a shared secret and none is configured here", "offered no authentication"),
        (b"secret", None, "offered no authentication", "requires a shared secret and none is configured here"),
    ],
)
def test_wrong_or_missing_secret_is_refused_before_any_page_moves(
    src_secret: bytes | None, dst_secret: bytes | None, src_msg: str, dst_msg: str
) -> None:
    server = Server("127.0.0.1:0", opts(secret=dst_secret))
    with pytest.raises(AuthenticationError, match=src_msg):
        wire.connect(str(server.listener.address), opts(secret=src_secret))
    with pytest.raises(AuthenticationError, match=dst_msg):
        server.result()  # no Connection: nothing can be sent or received
    server.close()


def test_load_secret_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret"
    p.write_bytes(b"hunter2\n")
    assert wire.load_secret(p) == b"hunter2"
    monkeypatch.setenv(wire.SECRET_ENV, "from-env")
    assert wire.load_secret() == b"from-env"
    monkeypatch.delenv(wire.SECRET_ENV)
    assert wire.load_secret() is None
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        wire.load_secret(p)


# ---- refusals: version, magic, region ----


def raw_hello(version: int = 1, page_size: int = PAGE, region: int = REGION, magic: bytes = wire.MAGIC) -> bytes:
    body = struct.pack("<BBHIQQHBB16s32s", 1, 0, 0, page_size, region, 0, 0, 0, 0, b"s" * 16, b"n" * 32)
    return struct.pack("<8sHBBI", magic, version, 1, 0, len(body)) + body


def talk_to_destination(data: bytes, dst: wire.WireOptions) -> tuple[bytes, BaseException | None]:
    """Sends `data` as a source would, then reads whatever the destination answers until it closes."""
    a, b = socket.socketpair()
    err: list[BaseException] = []

    def dest() -> None:
        try:
            wire.handshake_destination(b, dst)
        except BaseException as e:
            err.append(e)
        finally:
            b.close()

    t = threading.Thread(target=dest)
    t.start()
    a.sendall(data)
    a.settimeout(10)
    got = bytearray()
    try:
        while chunk := a.recv(65536):
            got += chunk
    except ConnectionResetError:  # it closed with our bytes unread
        pass
    t.join(10)
    a.close()
    return bytes(got), err[0] if err else None


@pytest.mark.timeout(30)
def test_unknown_version_is_refused_with_a_clear_message() -> None:
    answer, err = talk_to_destination(raw_hello(version=2), opts())
    assert isinstance(err, ProtocolError)
    assert "the peer speaks protocol version 2; this side speaks only version 1" in str(err)
    assert b"unsupported protocol version 2; this peer speaks version 1" in answer  # a REJECT it can read


@pytest.mark.timeout(30)
def test_source_reads_a_newer_destinations_refusal() -> None:
    a, b = socket.socketpair()
    with a, b:
        # A "version 9" destination refusing us: the REJECT prefix is frozen across versions.
        text = b"\x00I only speak version 9"
        b.sendall(struct.pack("<8sHBBI", wire.MAGIC, 9, 4, 0, len(text)) + text)
        with pytest.raises(ProtocolError, match="the peer refused us: I only speak version 9"):
            wire.handshake_source(a, opts())


@pytest.mark.timeout(30)
def test_bad_magic_is_refused() -> None:
    _, err = talk_to_destination(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", opts())
    assert isinstance(err, ProtocolError) and "bad magic" in str(err)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (raw_hello(region=REGION * 2), "larger than the local region"),
        (raw_hello(region=1 << 62), "larger than the local region"),
        (raw_hello(page_size=8192), "page size 8192 differs"),
        (raw_hello(region=REGION + 1), "not a positive whole number"),
        (raw_hello(region=0), "not a positive whole number"),
        (raw_hello(page_size=1000), "page size 1000 is not a power of two"),
    ],
)
def test_absurd_region_is_refused(hello: bytes, message: str) -> None:
    _answer, err = talk_to_destination(hello, opts())
    assert isinstance(err, ProtocolError) and message in str(err)


@pytest.mark.timeout(30)
def test_region_larger_than_memory_is_refused_even_without_a_local_region() -> None:
    too_big = (wire.physical_memory_bytes() // PAGE + 1) * PAGE
    answer, err = talk_to_destination(raw_hello(region=too_big), opts(region_bytes=0))
    assert isinstance(err, ProtocolError) and "larger than this host's memory" in str(err)
    assert b"larger than this host's memory" in answer


@pytest.mark.timeout(30)
def test_source_learns_why_its_region_was_refused() -> None:
    server = Server("127.0.0.1:0", opts(region_bytes=REGION // 2))
    with pytest.raises(ProtocolError, match="refused us: region of 262144 bytes is larger than the local region"):
        wire.connect(str(server.listener.address), opts())
    with pytest.raises(ProtocolError):
        server.result()
    server.close()


@pytest.mark.timeout(30)
def test_stray_channel_for_an_unknown_session_is_refused() -> None:
    a, b = socket.socketpair()
    err: list[BaseException] = []

    def dest() -> None:
        try:
            wire.handshake_destination(b, opts(), sessions={})
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=dest)
    t.start()
    with a, b:
        with pytest.raises(ProtocolError, match="urgent channel for an unknown session"):
            wire.handshake_source(a, opts(), kind="urgent", session=b"x" * 16)
        t.join(10)
    assert isinstance(err[0], ProtocolError)


# ---- a peer that vanishes at every stage ----


def _migrate_source(address: str, secret: bytes | None, region: np.ndarray) -> None:
    """A source sending a small migration on its main channel: pages, a switchover, device state,
    discards, local fill, complete, end."""
    with wire.connect(address, opts(secret=secret, capabilities=wire.Capabilities.all().without("urgent-channel"))) as c:
        w = c.writer()
        w.send_region(region, [(0, NPAGES)], detect_zero=True)
        w.send_command(Command.SWITCHOVER)
        w.send_device_state(b"state" * 50)
        w.send_discard([(3, 2)])
        w.send_local_fill([(10, 4)], 0xAB)
        w.send_command(Command.COMPLETE)
        w.send_end()
        # Wait for the destination's ack so the stream is read before we close.
        f = wire.expect(c.reader(), FrameType.ACK)
        assert f == wire.Frame(FrameType.ACK, count=AckKind.GUEST_RUNS, value=Command.COMPLETE)


def _migrate_destination(listener: wire.Listener, secret: bytes | None) -> np.ndarray:
    with listener.accept(opts(secret=secret)) as c:
        region = np.zeros(REGION, np.uint8)
        r = c.reader()
        r.attach_region(region, _core.PageBitmap(NPAGES))
        kinds: list[FrameType] = []
        while not kinds or kinds[-1] != FrameType.END:  # a stream that stops before END is ConnectionLost
            kinds.append(wire.expect(r, FrameType.COMMAND, FrameType.DEVICE_STATE, FrameType.DISCARD,
                                     FrameType.LOCAL_FILL, FrameType.END).type)
        assert kinds == [FrameType.COMMAND, FrameType.DEVICE_STATE, FrameType.DISCARD, FrameType.LOCAL_FILL,
                         FrameType.COMMAND, FrameType.END]
        c.writer().send_ack(AckKind.GUEST_RUNS, Command.COMPLETE)
        return region


def full_stream_length(secret: bytes | None) -> int:
    """Bytes the source sends in a whole _migrate_source run (counted through a proxy)."""
    with wire.Listener("127.0.0.1:0", strict=True) as L:
        proxy = CuttingProxy((L.address.host, L.address.port), limit=1 << 40)
        region = pattern(NPAGES, seed=3, zero_every=5)
        t = threading.Thread(target=_migrate_source, args=(proxy.address, secret, region))
        t.start()
        got = _migrate_destination(L, secret)
        t.join(20)
        proxy.close()
        assert np.array_equal(got, region)
        return proxy.forwarded


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_peer_vanishing_at_every_stage_gives_clean_errors(secret: bytes | None) -> None:
    total = full_stream_length(secret)
    hello = 16 + 76
    auth = (16 + 32) if secret else 0
    # Cut points: inside HELLO, inside AUTH, inside the first frame header, inside its payload,
    # between frames, inside the control frames near the end, one byte short of everything.
    cuts = sorted({1, 15, hello - 1, hello, hello + auth // 2, hello + auth, hello + auth + 10,
                   hello + auth + 24 + 1000, hello + auth + 24 + 4096 + 4, total // 2, total - 200,
                   total - 40, total - 1})
    for cut in cuts:
        with wire.Listener("127.0.0.1:0", strict=True) as L:
            proxy = CuttingProxy((L.address.host, L.address.port), limit=cut)
            region = pattern(NPAGES, seed=3, zero_every=5)
            src_err: list[BaseException] = []

            def source() -> None:
                try:
                    _migrate_source(proxy.address, secret, region)  # noqa: B023 (runs in this iteration)
                except BaseException as e:
                    src_err.append(e)  # noqa: B023

            t = threading.Thread(target=source)
            t.start()
            try:
                with pytest.raises((ConnectionLost, ProtocolError)):
                    _migrate_destination(L, secret)
                t.join(20)
                assert not t.is_alive()
            finally:
                proxy.close()
            assert len(src_err) == 1 and isinstance(src_err[0], (ConnectionLost, ProtocolError)), (cut, src_err)


@pytest.mark.timeout(30)
def test_silent_peer_during_handshake_times_out() -> None:
    with wire.Listener("127.0.0.1:0", strict=True) as L:
        s = socket.create_connection((L.address.host, L.address.port))
        with s, pytest.raises(ConnectionLost, match="silent"):
            L.accept(opts(timeout=0.3))


@pytest.mark.timeout(30)
def test_nobody_connecting_times_out() -> None:
    with wire.Listener("127.0.0.1:0", strict=True) as L, pytest.raises(ConnectionLost, match="no source connected"):
        L.accept(opts(timeout=0.2))


@pytest.mark.timeout(30)
def test_connect_to_nothing_is_connection_lost(tmp_path: Path) -> None:
    with pytest.raises(ConnectionLost, match="connect to unix:"):
        wire.connect(f"unix:{tmp_path / 'nobody'}", opts())


# ---- real processes ----


def _child_source(address: str, q: Any) -> None:
    try:
        region = pattern(NPAGES, seed=11, zero_every=3)
        src = opts(capabilities=wire.Capabilities.all(extra_channels=2), secret=b"proc")
        with wire.connect(address, src) as c:
            chans = c.channels()
            ws = [c.writer(ch) for ch in chans]
            parts = np.array_split(np.arange(NPAGES), len(chans))

            def go(w: _core.FrameWriter, p: np.ndarray) -> None:
                w.send_region(region, [(int(p[0]), len(p))], detect_zero=True)
                w.send_end()

            ts = [threading.Thread(target=go, args=(w, p)) for w, p in zip(ws, parts)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            f = wire.read_frame(c.reader())
            q.put(("done", None if f is None else (int(f.type), f.first, f.count, f.value)))
    except BaseException as e:
        q.put(("error", repr(e)))


@pytest.mark.timeout(60)
def test_migration_between_processes_over_all_channels() -> None:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with wire.Listener("127.0.0.1:0", strict=True) as L:
        p = ctx.Process(target=_child_source, args=(str(L.address), q))
        p.start()
        try:
            c = L.accept(opts(capabilities=wire.Capabilities.all(extra_channels=4), secret=b"proc", timeout=30))
            with c:
                assert len(c.pages) == 2 and c.urgent is not None
                region = np.zeros(REGION, np.uint8)
                received = _core.PageBitmap(NPAGES)
                readers: list[Callable[[], None]] = []
                for ch in c.channels():
                    r = c.reader(ch)
                    r.attach_region(region, received)
                    readers.append(lambda r=r: wire.read_frame(r))
                ts = [threading.Thread(target=f) for f in readers]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(20)
                c.writer().send_ack(0, 77)
                status, detail = q.get(timeout=30)
                assert status == "done", detail
                assert detail == (int(FrameType.ACK), 0, 0, 77)
                assert received.count() == NPAGES
                assert np.array_equal(region, pattern(NPAGES, seed=11, zero_every=3))
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert p.exitcode == 0
    assert os.getpid() != p.pid
