"""Dirty tracking on the source: every write is seen by the next sync, and none is invented.

Kernel mode uses userfaultfd WP_ASYNC: write faults are resolved inside the kernel and never block,
so these tests run in-process.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np
import pytest

from livemig import _core
from livemig.errors import UnsupportedError
from livemig.memory import Region
from livemig.source import Source

from source_helpers import bits, device_for, make_source

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.timeout(60)


def _clean(src: Source) -> None:
    src.sync()
    src.dirty.reset()


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_python_numpy_and_cpp_writes_are_seen(backing: str) -> None:
    src = make_source(2048, backing=backing)  # type: ignore[arg-type]
    assert src.dirty.count() == src.pages  # everything must be sent once
    _clean(src)
    # Reads, of touched and untouched pages, are not writes.
    mem = src.memory
    assert int(mem[::PAGE].sum()) == 0
    assert src.sync() == 0 and src.dirty.count() == 0

    view = memoryview(mem)  # plain Python stores
    view[3 * PAGE] = 7
    view[10 * PAGE + PAGE - 1] = 1
    mem[100 * PAGE : 103 * PAGE] = 9  # numpy, three pages
    mem[500 * PAGE + 17] += 1
    cpp_pages = np.array([1000, 1001, 1500, 2047, 7], dtype=np.uint64)
    _core._bench.source_write_pages_threads(src.address, cpp_pages, 3, 5)

    expected = {3, 10, 100, 101, 102, 500} | {int(p) for p in cpp_pages}
    assert src.sync() == len(expected)
    assert bits(src.dirty) == expected
    # Nothing new: the next sync finds nothing.
    assert src.sync() == 0
    # Writing the same pages again is seen again.
    view[3 * PAGE] = 8
    src.dirty.reset()
    assert src.sync() == 1 and bits(src.dirty) == {3}
    assert src.counters().sync.pages_written == len(expected) + 1


def test_adopted_mmap_is_tracked() -> None:
    buf = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        src = Source(Region(buf))
    except UnsupportedError as e:
        pytest.skip(f"kernel lacks {e.feature}: {e}")
    _clean(src)
    buf[5 * PAGE] = 1
    buf[63 * PAGE : 64 * PAGE] = b"\1" * PAGE
    assert src.sync() == 2 and bits(src.dirty) == {5, 63}
    assert src.memory.ctypes.data == src.address


def test_adopt_rejects_bad_buffers() -> None:
    with pytest.raises(ValueError, match="tracking"):
        Region(mmap.mmap(-1, PAGE), tracking="nonsense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the page size"):
        Region(bytearray(PAGE + 1))
    with pytest.raises(ValueError, match="read-only"):
        Region(bytes(PAGE))
    with pytest.raises(ValueError, match="pages must be > 0"):
        Source.allocate(0)


def test_many_scattered_writes_cross_the_output_vector() -> None:
    """More written runs than one PAGEMAP_SCAN output vector holds (1024): the walk continues
    from walk_end when the vector is full and stops when it is not, so each page is reported
    once."""
    src = make_source(8192)
    _clean(src)
    calls = src.counters().scan_calls
    mem = src.memory
    written = list(range(0, 8192, 3))  # 2731 separate runs
    mem[np.array(written) * PAGE] = 1
    assert src.sync() == len(written)
    assert bits(src.dirty) == set(written)
    assert src.counters().scan_calls - calls == 3  # 1024 + 1024 + 683
    assert src.sync() == 0


def test_explicit_mode() -> None:
    src = Source.allocate(256, mode="explicit")
    _clean(src)
    src.memory[5 * PAGE] = 1  # not marked: explicit mode trusts the writer
    assert src.sync() == 0
    src.mark_written(5)
    src.mark_written(64, 70)
    assert src.sync() == 71 and bits(src.dirty) == {5} | set(range(64, 134))
    assert src.sync() == 0
    with pytest.raises(IndexError):
        src.mark_written(250, 7)
    # A hint forgets marks made before it (rule 5), in explicit mode too.
    src.dirty.reset()
    src.mark_written(10, 4)
    dev = device_for(src)
    dev.host_request(0x80000001)
    assert dev.guest_ack(0x80000001)
    assert dev.guest_hint(0x80000001, 8, 8)
    dev.host_stop()
    assert src.sync() == 0 and src.dirty.count() == 0 and bits(src.hinted) == set(range(8, 16))


def test_sync_clears_hinted_bits_of_written_pages() -> None:
    src = make_source(128)
    _clean(src)
    h = device_for(src)
    h.host_request(0x80000001)
    assert h.guest_ack(0x80000001)
    assert h.guest_hint(0x80000001, 10, 20)
    src.memory[15 * PAGE] = 1
    h.host_stop()
    assert src.sync() == 1
    assert bits(src.dirty) == {15}
    assert bits(src.hinted) == set(range(10, 30)) - {15}


def test_hint_resets_kernel_write_tracking_and_keeps_memory() -> None:
    """Rule 5: a page written before its hint is not brought back by the next sync, and the hint
    does not change memory."""
    src = make_source(64)
    _clean(src)
    mem = src.memory
    mem[8 * PAGE : 12 * PAGE] = 0xAB
    h = device_for(src)
    h.host_request(0x80000005)
    h.guest_ack(0x80000005)
    assert h.guest_hint(0x80000005, 8, 4)
    h.host_stop()
    assert src.sync() == 0
    assert src.dirty.count() == 0 and bits(src.hinted) == {8, 9, 10, 11}
    assert bool(np.all(mem[8 * PAGE : 12 * PAGE] == 0xAB))


def test_zero_page_detection() -> None:
    src = make_source(8)
    mem = src.memory
    mem[1 * PAGE + PAGE - 1] = 1  # last byte only
    mem[2 * PAGE] = 1  # first byte only
    mem[3 * PAGE + 1000] = 0x80
    assert [src.is_zero(p) for p in range(8)] == [True, False, False, False, True, True, True, True]
    assert _core._bench.source_count_zero_pages(src.address, 8) == 5
    with pytest.raises(IndexError):
        src.is_zero(8)


def test_zero_page_detection_every_offset() -> None:
    """One non-zero byte anywhere in a page (each 64-byte line, each position in a line) makes it
    non-zero, whatever SIMD path is used."""
    n = PAGE // 64
    buf = np.zeros((n + 1) * PAGE, dtype=np.uint8)
    base = (-buf.ctypes.data) % PAGE  # page-align the view
    pages = buf[base : base + n * PAGE].reshape(n, PAGE) if base + n * PAGE <= buf.size else None
    assert pages is not None
    for k in range(n):
        pages[k, k * 64 + (k * 7) % 64] = 1 << (k % 8)
    assert _core._bench.source_count_zero_pages(pages.ctypes.data, n) == 0
    pages[:] = 0
    assert _core._bench.source_count_zero_pages(pages.ctypes.data, n) == n


def test_writes_racing_syncs_are_never_lost() -> None:
    """Python threads and C++ threads write while the main thread syncs again and again: every
    written page is in D after the final sync (a write racing a harvest is reported by it or by the
    next one), and no unwritten page is."""
    src = make_source(4096)
    _clean(src)
    rng = np.random.default_rng(1)
    py_pages = [rng.choice(2048, size=300, replace=False) for _ in range(2)]
    cpp_pages = rng.choice(np.arange(2048, 4096), size=600, replace=False).astype(np.uint64)
    mem = src.memory

    def py_writer(pages: np.ndarray) -> None:
        for p in pages:
            mem[int(p) * PAGE + 1] = 1

    threads = [threading.Thread(target=py_writer, args=(pages,)) for pages in py_pages]
    cpp_writer = _core._bench.source_write_pages_threads
    threads.append(threading.Thread(target=cpp_writer, args=(src.address, cpp_pages, 2, 3)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        src.sync()
    for t in threads:
        t.join()
    src.sync()
    expected = {int(p) for pages in py_pages for p in pages} | {int(p) for p in cpp_pages}
    assert bits(src.dirty) == expected


def test_guest_discarding_a_page_is_a_change_and_tracking_survives() -> None:
    """MADV_DONTNEED on anonymous memory turns a page to zeros: the next sync reports it (its
    content changed), and writes after it are still tracked."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    src = make_source(16)
    _clean(src)
    mem = src.memory
    mem[3 * PAGE] = 1
    assert src.sync() == 1
    src.dirty.reset()
    assert libc.madvise(src.address + 3 * PAGE, PAGE, mmap.MADV_DONTNEED) == 0
    assert mem[3 * PAGE] == 0
    assert src.sync() == 1 and bits(src.dirty) == {3}
    src.dirty.reset()
    mem[3 * PAGE] = 2
    assert src.sync() == 1 and bits(src.dirty) == {3}
