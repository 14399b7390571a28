"""The source side of a migration: the engine over a workload's memory, its dirty tracking, the
page state and the scanner.

Python decides, C++ moves pages: every method here is one call into the core, none loops over pages.
"""

from __future__ import annotations

import enum
from typing import Literal

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.memory import Region, Tracking, system_page_size

Backing = Literal["anonymous", "memfd"]
TrackMode = Tracking
SourceCounters = _core.SourceCounters
SwitchoverSets = _core.SwitchoverSets


class RunFlag(enum.IntFlag):
    """Flags of a run taken by :meth:`Source.next_batch`."""

    URGENT = 1  #: served for a request from the destination
    DIRTY_TAKEN = 2  #: the dirty bit was set and the take cleared it
    SENT_WAS_CLEAR = 4  #: the sent bit was clear and the take set it


class Source:
    """The engine over a region being migrated out, with its page state.

    Kernel tracking uses userfaultfd asynchronous write-protect and PAGEMAP_SCAN (raises
    :class:`livemig.UnsupportedError` naming the missing kernel feature); explicit tracking relies
    on the writer calling :meth:`Region.mark_written`. The dirty bitmap starts all set: every page is
    sent at least once. :meth:`close` ends tracking (the memory is ordinary again)."""

    def __init__(self, region: Region) -> None:
        self.region: Region | None = region
        self._core = region._source_engine()
        region._bind_tracker(self._core)

    @classmethod
    def allocate(cls, pages: int, *, mode: TrackMode = "kernel", backing: Backing = "anonymous") -> Source:
        """A source over memory of its own (private anonymous, or a memfd's shared memory)."""
        self = cls.__new__(cls)
        self.region = None
        self._core = _core.Source(pages, mode, backing, system_page_size())
        return self

    def close(self) -> None:
        """Ends tracking now (docs/design.md rule 9): the region's write protection is dropped and
        explicit marks go nowhere. The bitmaps stay readable. Idempotent."""
        if self.region is not None:
            self.region._bind_tracker(None)
        self._core.stop_tracking()

    # ---- the region ----
    @property
    def core(self) -> _core.Source:
        """The C++ engine (for the sessions)."""
        return self._core

    @property
    def pages(self) -> int:
        """Number of pages."""
        return self._core.pages

    @property
    def page_size(self) -> int:
        return self._core.page_size

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
        size = self.page_size
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

    @property
    def hint_target(self) -> _core.HintTarget:
        """Where a workload's balloon device sends the hints it accepts (they land in D and H)."""
        return self._core.hint_target

    def sync(self) -> int:
        """Fold every write since the last sync into D (clearing H of written pages); returns the
        number of pages written."""
        return self._core.sync()

    def mark_written(self, first_page: int, npages: int = 1) -> None:
        """Explicit mode: record a write to ``npages`` pages from ``first_page``."""
        self._core.mark_written(first_page, npages)

    def switchover_sets(self) -> SwitchoverSets:
        """With the guest stopped and a final sync done: the discard and local-fill sets."""
        return self._core.switchover_sets()

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
        """A snapshot of the sync and scanner counters."""
        return self._core.counters()

    def __repr__(self) -> str:
        return (
            f"Source(pages={self.pages}, mode={self.mode!r}, dirty={self.dirty.count()}, "
            f"sent={self.sent.count()}, hinted={self.hinted.count()})"
        )


__all__ = ["Backing", "RunFlag", "Source", "SourceCounters", "SwitchoverSets", "TrackMode"]
