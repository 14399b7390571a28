"""A destination that breaks rule 1 on purpose, for the oracle's negative tests: as its workload
starts, it drops pages it holds (MADV_DONTNEED, as a guest freeing memory would), so a copy of them
that arrives again is placed a second time."""

from __future__ import annotations

import ctypes
import mmap
import threading

from livemig.memory import Region
from livemig.workload import StandardFactory, Workload

ZAPPED = (0, 64)  #: the pages the destination drops: the first PAGES frame of round 1 (64-page routing runs)
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


class _Zapping:
    """Wraps a workload: start() drops ZAPPED first."""

    def __init__(self, inner: Workload) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def start(self) -> None:
        r = self._inner.region
        first, n = ZAPPED
        # The kernel sends the region's userfaultfd a REMOVE event; the fault thread drops R. madvise
        # returns once the event is read, not handled; a second drop of the first page returns once
        # its own event is read, which the fault thread does only after handling the batch that held
        # the first: R is dropped for every zapped page before the start is acknowledged.
        for length in (n * mmap.PAGESIZE, mmap.PAGESIZE):
            rc = _libc.madvise(ctypes.c_void_p(r.address + first * mmap.PAGESIZE), length, _MADV_DONTNEED)
            if rc != 0:
                raise OSError(ctypes.get_errno(), "madvise")
        # The second drop's own event may still be unhandled: were it handled after the replay placed
        # the first page, R would be dropped for a page that is there. A read of another zapped page
        # faults; its event comes after the second drop's, so its REQUEST (what the relay waits for
        # before it replays) goes out only once both drops are handled. The reader blocks until the
        # replay places its page (this runs in the destination's child process, under a deadline).
        # (memmove releases the GIL while it waits; ctypes.string_at would hold it and stop the start.)
        page, into = r.address + (first + 1) * mmap.PAGESIZE, ctypes.create_string_buffer(1)
        threading.Thread(target=ctypes.memmove, args=(into, page, 1), daemon=True).start()
        self._inner.start()


class ZappingFactory(StandardFactory):
    """The standard factory, whose workloads drop ZAPPED as they start."""

    def build(self, kind: str, version: int, region: Region, state: bytes) -> Workload:
        return _Zapping(super().build(kind, version, region, state))  # type: ignore[return-value]
