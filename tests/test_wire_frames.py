"""Frames: round trips, validation, the decoder under fuzzing, receiving into a region."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig import _core, wire
from livemig.errors import ConnectionLost, ProtocolError
from livemig.protocol import Command, FrameType

from wire_helpers import PAGE, config, crc32c_reference, pattern

HDR = struct.Struct("<BBHIQQ")


def header(t: int, count: int = 0, arg: int = 0, length: int = 0, flags: int = 0, reserved: int = 0) -> bytes:
    return HDR.pack(t, flags, reserved, count, arg, length)


# ---- CRC32C ----


def test_crc32c_check_value() -> None:
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"") == 0


@given(st.binary(max_size=300))
def test_crc32c_matches_bitwise_reference(data: bytes) -> None:
    assert _core.crc32c(data) == crc32c_reference(data)


@pytest.mark.parametrize("n", [767, 768, 769, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 768 + 13])
def test_crc32c_three_way_path_matches_reference(n: int) -> None:
    # Lengths around the 3 x 256 and 3 x 8192 byte blocks where the three-chain path kicks in.
    data = bytes(pattern(8, seed=n)[:n])
    assert _core.crc32c(data) == crc32c_reference(data)


# ---- round trips ----

ALL_FRAMES = [
    wire.Frame(FrameType.PAGES, 3, 2, data=bytes(pattern(2, seed=1))),
    wire.Frame(FrameType.ZERO, 10, 5),
    wire.Frame(FrameType.DISCARD, ranges=((1, 2), (40, 24))),
    wire.Frame(FrameType.LOCAL_FILL, value=0xDEADBEEF, ranges=((0, 1), (63, 1))),
    wire.Frame(FrameType.DEVICE_STATE, data=b"\x00device\xffstate" * 100),
    wire.Frame(FrameType.DEVICE_STATE, data=b""),
    wire.Frame(FrameType.COMMAND, value=Command.SWITCHOVER),
    wire.Frame(FrameType.COMMAND, value=Command.POSTCOPY_START, data=b"args"),
    wire.Frame(FrameType.COMMAND, value=Command.COMPLETE),
    wire.Frame(FrameType.ERROR, data=b"something broke"),
    wire.Frame(FrameType.END),
]
RETURN_FRAMES = [
    wire.Frame(FrameType.REQUEST, 7, 3),
    wire.Frame(FrameType.RECEIVED_BITMAP, data=bytes([0xFF] * 7 + [0x01])),  # 64 pages
    wire.Frame(FrameType.ACK, count=1, value=42),
    wire.Frame(FrameType.ACK, count=0, value=2**64 - 1),
    wire.Frame(FrameType.ERROR, data="ünïcode".encode()),
    wire.Frame(FrameType.END),
]


def write_frame(w: _core.FrameWriter, f: wire.Frame) -> None:
    if f.type == FrameType.PAGES:
        w.send_pages(f.first, f.data)
    elif f.type == FrameType.ZERO:
        w.send_zero(f.first, f.count)
        w.flush()
    elif f.type == FrameType.DISCARD:
        w.send_discard(list(f.ranges))
    elif f.type == FrameType.LOCAL_FILL:
        w.send_local_fill(list(f.ranges), f.value)
    elif f.type == FrameType.DEVICE_STATE:
        w.send_device_state(f.data)
    elif f.type == FrameType.COMMAND:
        w.send_command(f.value, f.data)
    elif f.type == FrameType.END:
        w.send_end()
    elif f.type == FrameType.REQUEST:
        w.send_request(f.first, f.count)
    elif f.type == FrameType.RECEIVED_BITMAP:
        bm = _core.PageBitmap.from_bytes(64, f.data)
        w.send_received_bitmap(bm)
    elif f.type == FrameType.ACK:
        w.send_ack(f.count, f.value)
    elif f.type == FrameType.ERROR:
        w.send_error(f.data.decode())
    else:  # pragma: no cover
        raise AssertionError(f.type)


@pytest.mark.parametrize("checksums", [False, True])
@pytest.mark.parametrize(("frames", "direction"), [(ALL_FRAMES, "to_destination"), (RETURN_FRAMES, "to_source")])
def test_every_frame_round_trips_in_memory(frames: list[wire.Frame], direction: str, checksums: bool) -> None:
    cfg = config(checksums=checksums)
    w = _core.FrameWriter(-1, cfg)
    for f in frames:
        write_frame(w, f)
    data = w.take_bytes()
    assert wire.decode(data, cfg, direction) == frames


@pytest.mark.timeout(20)
@pytest.mark.parametrize("checksums", [False, True])
@pytest.mark.parametrize(("frames", "direction"), [(ALL_FRAMES, "to_destination"), (RETURN_FRAMES, "to_source")])
def test_every_frame_round_trips_on_a_socket(frames: list[wire.Frame], direction: str, checksums: bool) -> None:
    cfg = config(checksums=checksums)
    a, b = socket.socketpair()
    with a, b:
        w = _core.FrameWriter(a.fileno(), cfg)
        t = threading.Thread(target=lambda: [write_frame(w, f) for f in frames])
        t.start()
        r = _core.FrameReader(b.fileno(), cfg, direction)
        got = [wire.read_frame(r) for _ in frames]
        t.join()
        a.shutdown(socket.SHUT_WR)
        assert got == frames
        assert wire.read_frame(r) is None  # clean end of stream at a frame boundary


# A plain model: a list of frames. Hypothesis draws sequences; what is decoded must equal them.
ranges_st = st.lists(
    st.tuples(st.integers(0, 63), st.integers(1, 64)).map(lambda t: (t[0], min(t[1], 64 - t[0]))),
    min_size=1,
    max_size=5,
).map(tuple)
frame_st = st.one_of(
    st.builds(lambda f, n, s: wire.Frame(FrameType.PAGES, f, min(n, 64 - f), data=bytes(pattern(min(n, 64 - f), s))),
              st.integers(0, 63), st.integers(1, 3), st.integers(0, 9)),
    st.builds(lambda f, n: wire.Frame(FrameType.ZERO, f, min(n, 64 - f)), st.integers(0, 63), st.integers(1, 64)),
    st.builds(lambda r: wire.Frame(FrameType.DISCARD, ranges=r), ranges_st),
    st.builds(lambda r, v: wire.Frame(FrameType.LOCAL_FILL, value=v, ranges=r), ranges_st, st.integers(0, 2**32 - 1)),
    st.builds(lambda d: wire.Frame(FrameType.DEVICE_STATE, data=d), st.binary(max_size=100)),
    st.builds(lambda c, d: wire.Frame(FrameType.COMMAND, value=c, data=d), st.integers(1, 3), st.binary(max_size=20)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(frame_st, max_size=8), st.booleans())
def test_frame_sequences_round_trip(frames: list[wire.Frame], checksums: bool) -> None:
    cfg = config(checksums=checksums)
    w = _core.FrameWriter(-1, cfg)
    for f in frames:
        write_frame(w, f)
    assert wire.decode(w.take_bytes(), cfg) == frames


def test_large_runs_are_split_into_frames_and_zero_pages_detected() -> None:
    cfg = config(region_pages=1000, frame_pages=64)
    data = pattern(1000, seed=2, zero_every=10)
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(0, data, detect_zero=True)
    frames = wire.decode(w.take_bytes(), cfg)
    assert all(f.count <= 64 for f in frames if f.type == FrameType.PAGES)
    assert sum(f.count for f in frames if f.type == FrameType.ZERO) == 100
    rebuilt = np.zeros_like(data)
    for f in frames:
        if f.type == FrameType.PAGES:
            rebuilt[f.first * PAGE : (f.first + f.count) * PAGE] = np.frombuffer(f.data, np.uint8)
    assert np.array_equal(rebuilt, data)
    assert w.stats.pages == 900 and w.stats.zero_pages == 100


def test_writer_refuses_caller_mistakes() -> None:
    w = _core.FrameWriter(-1, config(region_pages=8))
    with pytest.raises(IndexError, match="outside the region"):
        w.send_pages(7, bytes(2 * PAGE))
    with pytest.raises(ValueError, match="whole number"):
        w.send_pages(0, bytes(100))
    with pytest.raises(ValueError, match="empty range"):
        w.send_discard([(1, 0)])
    with pytest.raises(IndexError):
        w.send_local_fill([(5, 4)], 0)
    with pytest.raises(ValueError, match="unknown command"):
        w.send_command(9)
    with pytest.raises(ValueError, match="unknown ack kind"):
        w.send_ack(7, 0)
    with pytest.raises(IndexError, match="past the end"):
        w.send_region(bytes(4 * PAGE), [(3, 2)])
    assert w.take_bytes() == b""


# ---- validation: every malformed field is a ProtocolError naming it ----

BAD = [
    (header(0x42), "to_destination", "unknown frame type 0x42"),
    (header(0x10, 1, 0), "to_destination", "REQUEST frame: not allowed on a source-to-destination channel"),
    (header(0x01, 1, 0, PAGE) + bytes(PAGE), "to_source", "PAGES frame: not allowed on a return path"),
    (header(0x07, flags=1), "to_destination", "END frame: flags 0x1 set"),
    (header(0x07, reserved=5), "to_destination", "END frame: reserved field is 0x5"),
    (header(0x01, 0, 0, 0), "to_destination", "PAGES frame: zero pages"),
    (header(0x01, 2, 63, 2 * PAGE), "to_destination", r"PAGES frame: pages \[63, 63 \+ 2\) outside the region of 64"),
    (header(0x01, 1, 2**64 - 1, PAGE), "to_destination", "outside the region"),
    (header(0x01, 2, 0, PAGE), "to_destination", "PAGES frame: length 4096 is not 2 pages"),
    (header(0x02, 1, 0, 8), "to_destination", "ZERO frame: length 8, must be 0"),
    (header(0x02, 65, 0), "to_destination", "ZERO frame: pages .* outside the region"),
    (header(0x03, 0, 0, 0), "to_destination", "DISCARD frame: no ranges"),
    (header(0x03, 1, 0, 15), "to_destination", "DISCARD frame: length 15 is not 1 ranges"),
    (header(0x03, 1, 0, 16) + struct.pack("<QQ", 3, 0), "to_destination", "DISCARD frame: empty range at page 3"),
    (header(0x03, 1, 0, 16) + struct.pack("<QQ", 60, 5), "to_destination", r"DISCARD frame: pages \[60, 60 \+ 5\)"),
    (header(0x03, 2**20, 0, 16 * 2**20), "to_destination", "DISCARD frame: 1048576 ranges, more than the limit"),
    (header(0x04, 1, 2**32, 16) + struct.pack("<QQ", 0, 1), "to_destination", "LOCAL_FILL frame: fill value 0x100000000"),
    (header(0x05, 0, 0, 2**40), "to_destination", "DEVICE_STATE frame: length 1099511627776 past the limit"),
    (header(0x06, 0, 9), "to_destination", "COMMAND frame: unknown command 9"),
    (header(0x06, 0, 0), "to_destination", "COMMAND frame: unknown command 0"),
    (header(0x06, 0, 1, 2**20), "to_destination", "COMMAND frame: length 1048576 past the limit"),
    (header(0x07, 0, 0, 4), "to_destination", "END frame: length 4, must be 0"),
    (header(0x10, 0, 0), "to_source", "REQUEST frame: zero pages"),
    (header(0x10, 1, 64), "to_source", "REQUEST frame: pages .* outside the region"),
    (header(0x11, 0, 0, 9) + bytes(9), "to_source", "RECEIVED_BITMAP frame: length 9, the region's bitmap is 8"),
    (header(0x12, 4, 0), "to_source", "ACK frame: unknown ack kind 4"),
    (header(0x13, 0, 0, 5000), "to_source", "ERROR frame: length 5000 past the limit"),
    (header(0x01, 1, 0, PAGE) + bytes(100), "to_destination", "truncated a PAGES frame: 124 of 4120 bytes"),
    (header(0x07)[:10], "to_destination", "truncated a frame header: 10 of 24 bytes"),
    (header(0x05, 0, 0, 10) + b"abc", "to_destination", "truncated a DEVICE_STATE frame"),
]


@pytest.mark.parametrize(("data", "direction", "message"), BAD)
def test_malformed_frames_are_protocol_errors_naming_the_field(data: bytes, direction: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        wire.decode(data, config(), direction)


def test_bitmap_with_bits_past_the_region_is_refused() -> None:
    cfg = config(region_pages=60)
    with pytest.raises(ProtocolError, match="bits set past the region's 60 pages"):
        wire.decode(header(0x11, 0, 0, 8) + bytes(7) + b"\x10", cfg, "to_source")


@pytest.mark.parametrize("where", [0, 5, 23, 24, 24 + PAGE - 1, 24 + PAGE, 24 + PAGE + 3])
def test_a_flipped_bit_anywhere_in_a_checksummed_frame_is_caught(where: int) -> None:
    cfg = config(checksums=True)
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(5, bytes(pattern(1, 3)))
    data = bytearray(w.take_bytes())
    assert len(data) == 24 + PAGE + 4
    data[where] ^= 0x04
    with pytest.raises(ProtocolError):
        wire.decode(bytes(data), cfg)
    if where >= 24:  # the header still parses: the CRC catches the damage and says so
        with pytest.raises(ProtocolError, match="PAGES frame: CRC32C mismatch"):
            wire.decode(bytes(data), cfg)


def test_peer_error_frame_is_delivered_not_raised() -> None:
    cfg = config()
    w = _core.FrameWriter(-1, cfg)
    w.send_error("disk on fire")
    assert wire.decode(w.take_bytes(), cfg) == [wire.Frame(FrameType.ERROR, data=b"disk on fire")]


# ---- fuzzing the decoder: anything at all gives frames or ProtocolError, never a crash ----


def _seed_stream(checksums: bool) -> bytes:
    cfg = config(checksums=checksums)
    w = _core.FrameWriter(-1, cfg)
    for f in ALL_FRAMES:
        write_frame(w, f)
    return w.take_bytes()


SEEDS = {False: _seed_stream(False), True: _seed_stream(True)}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.booleans(), st.sampled_from(["to_destination", "to_source"]))
def test_fuzz_arbitrary_bytes(data: bytes, checksums: bool, direction: str) -> None:
    try:
        wire.decode(data, config(checksums=checksums), direction)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6),
    st.integers(0, 2**31),
)
def test_fuzz_mutated_valid_streams(checksums: bool, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[checksums])
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: len(data) - cut % 64] if cut % 3 == 0 else data
    try:
        frames = wire.decode(bytes(data), config(checksums=checksums))
    except ProtocolError:
        return
    for f in frames:  # whatever got through is within the limits
        assert f.first + f.count <= 64 or f.type == FrameType.ACK
        assert all(a + n <= 64 and n > 0 for a, n in f.ranges)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.binary(max_size=64))
def test_fuzz_any_header(t: int, count: int, arg: int, length: int, tail: bytes) -> None:
    for direction in ("to_destination", "to_source"):
        try:
            wire.decode(header(t, count, arg, length) + tail, config(), direction)
        except ProtocolError:
            pass


# ---- receiving into a region (precopy) ----


@pytest.mark.timeout(20)
@pytest.mark.parametrize("checksums", [False, True])
def test_precopy_receive_lands_in_the_region_and_marks_received(checksums: bool) -> None:
    n = 300
    cfg = config(region_pages=n, checksums=checksums, frame_pages=16)
    src = pattern(n, seed=4, zero_every=7)
    dst = np.full(n * PAGE, 0xEE, dtype=np.uint8)  # stale bytes: zero runs must clear them
    received = _core.PageBitmap(n)
    a, b = socket.socketpair()
    with a, b:
        w = _core.FrameWriter(a.fileno(), cfg)

        def send() -> None:
            w.send_region(src, [(0, 100), (100, 200)], detect_zero=True)
            w.send_discard([(10, 5)])
            w.send_end()

        t = threading.Thread(target=send)
        t.start()
        r = _core.FrameReader(b.fileno(), cfg, "to_destination")
        r.attach_region(dst, received)
        assert wire.read_frame(r) == wire.Frame(FrameType.DISCARD, ranges=((10, 5),))
        assert wire.read_frame(r) == wire.Frame(FrameType.END)
        t.join()
        assert np.array_equal(src, dst)
        assert received.count() == n - 5 and not received.test(10) and received.test(15)
        st_ = r.stats
        assert st_.pages + st_.zero_pages == n
        assert w.stats.syscalls < w.stats.frames / 4  # batched: never a syscall per frame, let alone per page


def test_bad_crc_leaves_the_received_bit_clear() -> None:
    cfg = config(checksums=True)
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(5, bytes(pattern(1, 3)))
    data = bytearray(w.take_bytes())
    data[100] ^= 1
    a, b = socket.socketpair()
    with a, b:
        a.sendall(bytes(data))
        r = _core.FrameReader(b.fileno(), cfg, "to_destination")
        received = _core.PageBitmap(64)
        region = np.zeros(64 * PAGE, dtype=np.uint8)
        r.attach_region(region, received)
        with pytest.raises(ProtocolError, match="CRC32C mismatch"):
            r.next()
        assert received.count() == 0


def test_attach_region_checks_its_arguments() -> None:
    a, b = socket.socketpair()
    with a, b:
        r = _core.FrameReader(b.fileno(), config(), "to_destination")
        with pytest.raises(ValueError, match="smaller than 64 pages"):
            r.attach_region(np.zeros(PAGE, np.uint8), _core.PageBitmap(64))
        with pytest.raises(ValueError, match="writable"):
            r.attach_region(bytes(64 * PAGE), _core.PageBitmap(64))
        with pytest.raises(ValueError, match="region_pages"):
            r.attach_region(np.zeros(64 * PAGE, np.uint8), _core.PageBitmap(63))


# ---- a peer that vanishes or goes silent mid-frame ----


@pytest.mark.timeout(20)
@pytest.mark.parametrize("cut", [1, 23, 24, 24 + 1, 24 + PAGE - 1, 24 + PAGE, 24 + PAGE + 2])
def test_peer_closing_mid_frame_is_connection_lost(cut: int) -> None:
    cfg = config(checksums=True)
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(0, bytes(pattern(1)))
    data = w.take_bytes()
    a, b = socket.socketpair()
    with b:
        a.sendall(data[:cut])
        a.close()
        r = _core.FrameReader(b.fileno(), cfg, "to_destination")
        with pytest.raises(ConnectionLost, match="closed the connection in the middle of"):
            r.next()


@pytest.mark.timeout(20)
def test_silent_peer_times_out_as_connection_lost() -> None:
    cfg = config(timeout=0.3)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header(0x01, 1, 0, PAGE) + bytes(100))  # then nothing
        r = _core.FrameReader(b.fileno(), cfg, "to_destination")
        with pytest.raises(ConnectionLost, match="timeout"):
            r.next()


@pytest.mark.timeout(20)
def test_writer_to_a_closed_peer_is_connection_lost() -> None:
    cfg = config(region_pages=4096)
    a, b = socket.socketpair()
    with a:
        b.close()
        w = _core.FrameWriter(a.fileno(), cfg)
        with pytest.raises(ConnectionLost, match="connection lost"):
            w.send_pages(0, bytes(pattern(256)))


@pytest.mark.timeout(20)
def test_writer_to_a_peer_that_stops_reading_times_out() -> None:
    cfg = config(region_pages=8192, timeout=0.3)
    a, b = socket.socketpair()
    with a, b:
        w = _core.FrameWriter(a.fileno(), cfg)
        with pytest.raises(ConnectionLost, match="timeout"):
            w.send_pages(0, bytes(pattern(8192)))


@pytest.mark.parametrize("checksums", [False, True])
def test_many_small_frames_across_batch_boundaries(checksums: bool) -> None:
    # Alternating zero and data pages: hundreds of tiny frames, so batches flush on the iovec and
    # slot limits in the middle of a call; every page must still arrive intact with a good CRC.
    n = 3000
    cfg = config(region_pages=n, checksums=checksums)
    data = pattern(n, seed=6, zero_every=2)
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(0, data, detect_zero=True)
    frames = wire.decode(w.take_bytes(), cfg)
    assert len(frames) == n
    rebuilt = np.zeros_like(data)
    for f in frames:
        if f.type == FrameType.PAGES:
            rebuilt[f.first * PAGE : (f.first + f.count) * PAGE] = np.frombuffer(f.data, np.uint8)
    assert np.array_equal(rebuilt, data)


def test_checksummed_pages_survive_a_flush_between_small_and_large_frames() -> None:
    # Many tiny frames fill a batch's iovecs (the flush comes in the middle of queueing a frame),
    # then large frames follow: the bounce buffer must not be reused under a queued frame.
    n = 2000
    cfg = config(region_pages=n, checksums=True)
    data = pattern(n, seed=8)
    data.reshape(n, PAGE)[0:400:2] = 0  # 400 one-page frames: one flush on the slot limit
    w = _core.FrameWriter(-1, cfg)
    w.send_pages(0, data, detect_zero=True)
    frames = wire.decode(w.take_bytes(), cfg)
    rebuilt = np.zeros_like(data)
    for f in frames:
        if f.type == FrameType.PAGES:
            rebuilt[f.first * PAGE : (f.first + f.count) * PAGE] = np.frombuffer(f.data, np.uint8)
    assert np.array_equal(rebuilt, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=3),
    st.integers(0, 40),
    st.lists(st.integers(1, 6000), min_size=1, max_size=8),
)
def test_socket_reader_agrees_with_the_buffer_decoder(
    checksums: bool, flips: list[tuple[int, int]], cut: int, chunks: list[int]
) -> None:
    # The same bytes, delivered over a real socket in arbitrary pieces (so the read-ahead sees
    # headers and payloads split anywhere), decode to the same frames and fail at the same point.
    data = bytearray(SEEDS[checksums])
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: len(data) - cut]
    cfg = config(checksums=checksums)
    try:
        expect: list[wire.Frame] | type[Exception] = wire.decode(bytes(data), cfg)
    except ProtocolError as e:
        expect = ConnectionLost if "truncated" in str(e) else ProtocolError
    a, b = socket.socketpair()
    with a, b:

        def feed() -> None:
            pos, k = 0, 0
            try:
                while pos < len(data):
                    n = chunks[k % len(chunks)]
                    a.sendall(bytes(data[pos : pos + n]))
                    pos, k = pos + n, k + 1
                a.shutdown(socket.SHUT_WR)
            except OSError:  # the reader stopped early and shut its side
                pass

        t = threading.Thread(target=feed)
        t.start()
        r = _core.FrameReader(b.fileno(), cfg, "to_destination")
        got: list[wire.Frame] = []
        try:
            while (f := wire.read_frame(r)) is not None:
                got.append(f)
            outcome: list[wire.Frame] | type[Exception] = got
        except (ProtocolError, ConnectionLost) as e:
            outcome = type(e)
            b.shutdown(socket.SHUT_RD)  # unblock the feeder if we stopped early
        t.join(10)
    assert outcome == expect


@pytest.mark.parametrize("checksums", [False, True])
def test_urgent_pages_overtake_queued_bulk_frames(checksums: bool) -> None:
    cfg = config(checksums=checksums)
    w = _core.FrameWriter(-1, cfg)
    w.send_zero(0, 3)  # queued, not flushed
    w.send_zero(10, 2)
    page = bytes(pattern(1, 5))
    w.send_urgent(40, page)
    assert wire.decode(w.take_bytes(), cfg) == [
        wire.Frame(FrameType.PAGES, 40, 1, data=page),
        wire.Frame(FrameType.ZERO, 0, 3),
        wire.Frame(FrameType.ZERO, 10, 2),
    ]
