"""The source side of a migration: the region, its dirty tracking, the page state and the scanner.

Python decides, C++ moves pages: every method here is one call into the core, none loops over pages.
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from livemig import _core

TrackMode = Literal["kernel", "explicit"]
Backing = Literal["anonymous", "memfd"]

class RunFlag(enum.IntFlag):
    """Flags of a run taken by :meth:`Source.next_batch`."""

    URGENT = 1  #: served for a request from the destination
    DIRTY_TAKEN = 2  #: the dirty bit was set and the take cleared it
    SENT_WAS_CLEAR = 4  #: the sent bit was clear and the take set it


@dataclass(frozen=True)
class SourceCounters:
    """A snapshot of the source's counters."""

    syncs: int
    pages_written: int
    requests: int
    request_pages_served: int
    request_pages_dropped: int
    requests_invalid: int
    background_pages: int
    pages_put_back: int
    scan_calls: int
    hints_accepted: int
    pages_hinted: int
    hints_dropped_stale: int
    hints_dropped_invalid: int
    hints_failed: int


@dataclass(frozen=True)
class SwitchoverSets:
    """Range lists, (n, 2) uint64 arrays of (first page, npages), computed at switchover."""

    discard: npt.NDArray[np.uint64]  #: dirty and sent: dropped on the destination (rule 3)
    local_fill: npt.NDArray[np.uint64]  #: hinted, clean, unsent: filled locally (rule 4)


class Source:
    """A memory region being migrated out, with its page state.

    ``mode="kernel"`` tracks writes with userfaultfd asynchronous write-protect and PAGEMAP_SCAN
    (raises :class:`livemig.UnsupportedError` naming the missing kernel feature);
    ``mode="explicit"`` relies on the writer calling :meth:`mark_written`. The dirty bitmap starts
    all set: every page is sent at least once.
    """

    def __init__(
        self, pages: int, *, mode: TrackMode = "kernel", backing: Backing = "anonymous"
    ) -> None:
        self._core = _core.Source(pages, mode, backing)
        self._buffer: mmap.mmap | None = None

    @classmethod
    def adopt(cls, buffer: mmap.mmap, *, mode: TrackMode = "kernel") -> Source:
        """Track an existing writable, page-aligned buffer (kept alive by the source)."""
        self = cls.__new__(cls)
        self._core = _core.Source.adopt(buffer, mode)
        self._buffer = buffer
        return self

    # ---- the region ----
    @property
    def pages(self) -> int:
        """Number of pages."""
        return self._core.pages

    @property
    def nbytes(self) -> int:
        """Size of the region in bytes."""
        return self._core.nbytes

    @property
    def address(self) -> int:
        """Address of the region (for C++ writer threads)."""
        return self._core.address

    @property
    def memfd(self) -> int:
        """The memfd behind the region, or -1."""
        return self._core.memfd

    @property
    def mode(self) -> TrackMode:
        """How writes are tracked."""
        return "kernel" if self._core.mode == "kernel" else "explicit"

    @property
    def memory(self) -> npt.NDArray[np.uint8]:
        """The region as a writable uint8 numpy view (no copy)."""
        return self._core.memory

    def page(self, index: int) -> npt.NDArray[np.uint8]:
        """A view of one page."""
        if not 0 <= index < self.pages:
            raise IndexError(f"page {index} out of range [0, {self.pages})")
        size = mmap.PAGESIZE
        return self._core.memory[index * size : (index + 1) * size]

    # ---- page state ----
    @property
    def dirty(self) -> _core.PageBitmap:
        """D: pages that must be (re)sent."""
        return self._core.dirty

    @property
    def sent(self) -> _core.PageBitmap:
        """S: pages the destination holds or is about to receive."""
        return self._core.sent

    @property
    def hinted(self) -> _core.PageBitmap:
        """H: pages the guest hinted free and has not written since."""
        return self._core.hinted

    def sync(self) -> int:
        """Fold every write since the last sync into D (clearing H of written pages); returns the
        number of pages written."""
        return self._core.sync()

    def mark_written(self, first_page: int, npages: int = 1) -> None:
        """Explicit mode: record a write to ``npages`` pages from ``first_page``."""
        self._core.mark_written(first_page, npages)

    def switchover_sets(self) -> SwitchoverSets:
        """With the guest stopped and a final sync done: the discard and local-fill sets."""
        discard, local_fill = self._core.switchover_sets()
        return SwitchoverSets(discard, local_fill)

    def take_stale_sent(self) -> npt.NDArray[np.uint64]:
        """Ahead of switchover (guest running, after a sync): the pages sent and dirty again, as
        (first page, npages) runs, now marked unsent. The destination drops them before the guest
        stops, so the switchover's own discard set holds only what is written after this."""
        return self._core.take_stale_sent()

    def dirty_hinted_unsent(self) -> int:
        """For a peer without local fill: make hinted, unsent pages dirty; returns how many."""
        return self._core.dirty_hinted_unsent()

    def resync_with_received(self, received: _core.PageBitmap, *, local_fill: bool) -> int:
        """Recovery after a broken channel: every page the destination has not received (its
        ``received`` bitmap) becomes dirty and unsent again, except hinted pages it fills locally
        when ``local_fill``. Returns how many pages are queued again."""
        return self._core.resync_with_received(received, local_fill)

    # ---- hints ----
    @property
    def hints(self) -> _core.HintSink:
        """The hint sink (the host side of the virtio-balloon device)."""
        return self._core.hints

    # ---- scanner ----
    def request(self, first_page: int, npages: int = 1) -> bool:
        """Queue an urgent request from the destination; False if outside the region."""
        return self._core.request(first_page, npages)

    def next_batch(self, max_pages: int) -> npt.NDArray[np.uint64]:
        """Take up to ``max_pages`` pages to send, urgent first: (n, 3) rows of (first, npages,
        :class:`RunFlag`). Their dirty bits are cleared and sent bits set."""
        return self._core.next_batch(max_pages)

    def send_failed(self, runs: npt.NDArray[np.uint64]) -> None:
        """Put back what ``runs`` (as returned by :meth:`next_batch`) took: nothing is lost."""
        self._core.send_failed(runs)

    def wait_for_request(self, timeout: float) -> bool:
        """Block (without the GIL) until a request is queued or ``timeout`` seconds pass; True
        when requests are queued."""
        return self._core.wait_for_request(timeout)

    def wake(self) -> None:
        """Wake every :meth:`wait_for_request` (for shutdown)."""
        self._core.wake()

    @property
    def pending_requests(self) -> int:
        """Requested pages queued and not yet taken."""
        return self._core.pending_requests

    @property
    def cursor(self) -> int:
        """Where the background scan continues."""
        return self._core.cursor

    def is_zero(self, page: int) -> bool:
        """True when the page is all zero bytes (it travels as a header only)."""
        return self._core.is_zero(page)

    def counters(self) -> SourceCounters:
        """A snapshot of the sync, scanner and hint counters."""
        c = self._core.counters()
        c.update(self._core.hints.counters())
        return SourceCounters(**c)

    def __repr__(self) -> str:
        return (
            f"Source(pages={self.pages}, mode={self.mode!r}, dirty={self.dirty.count()}, "
            f"sent={self.sent.count()}, hinted={self.hinted.count()})"
        )


__all__ = ["RunFlag", "Source", "SourceCounters", "SwitchoverSets"]
