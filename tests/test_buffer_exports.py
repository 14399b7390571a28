"""Buffers handed to the core stay exported for as long as the core uses them (one RAII helper in
every binding): closing or resizing one from another thread while the core reads it is a clear
BufferError, never a crash or a read of freed memory."""

from __future__ import annotations

import mmap
import socket
import threading

import numpy as np
import pytest

from livemig import _core
from livemig.destination import Destination
from livemig.memory import Region, allocate
from livemig.source import Source

from wire_helpers import config

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.timeout(60)


def test_closing_or_resizing_a_buffer_mid_send_is_refused_and_the_send_completes() -> None:
    pages = 1024  # 4 MiB: far more than a socket buffer holds, so the send blocks inside the core
    m = mmap.mmap(-1, pages * PAGE)
    m[:] = bytes(range(256)) * (pages * PAGE // 256)
    a, b = socket.socketpair()
    with a, b:
        w = _core.FrameWriter(a.fileno(), config(region_pages=pages))
        box: list[BaseException] = []

        def send() -> None:
            try:
                w.send_pages(0, m)
            except BaseException as e:  # handed to the test
                box.append(e)

        t = threading.Thread(target=send)
        t.start()
        got = bytearray(b.recv(65536))  # bytes arrived: the writer is inside send_pages, blocked
        assert got
        with pytest.raises(BufferError):
            m.close()
        with pytest.raises(BufferError):
            m.resize(PAGE)
        want = pages * PAGE + 24 * (pages // 256)  # the pages and one header per 256-page frame
        while len(got) < want:
            chunk = b.recv(1 << 20)
            assert chunk
            got += chunk
        t.join(30)
        assert not box, box
        assert len(got) == want
    frames = _core.wire_decode(bytes(got), config(region_pages=pages), "to_destination")
    assert b"".join(f.data for f in frames) == m[:]
    m.close()  # the core let go: the buffer is the caller's again


def test_an_adopted_buffer_is_held_for_the_engines_life() -> None:
    m = allocate(16 * PAGE)
    region = Region(m)
    src = Source(region)
    with pytest.raises(BufferError, match="still in use"):
        region.release()  # the engine holds it
    with pytest.raises(BufferError):
        m.close()
    src.close()
    del src
    region.release()
    m.close()


def test_a_destination_over_a_users_buffer_holds_it() -> None:
    m = allocate(16 * PAGE)
    region = Region(m)
    d = Destination.adopt(region)
    with pytest.raises(BufferError):
        m.close()
    assert d.place(3, np.full(PAGE, 7, np.uint8)) == 1 and m[3 * PAGE] == 7
    d.stop()
    del d
    region.release()
    m.close()


def test_a_buffer_placed_from_is_held_while_it_is_placed() -> None:
    d = Destination(64 * PAGE)
    data = bytearray(b"\x11" * (64 * PAGE))
    assert d.place(0, data) == 64
    data.extend(b"x")  # after the call the export is gone: the caller may resize again
    assert bytes(d.array[:PAGE]) == b"\x11" * PAGE
