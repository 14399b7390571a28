"""The destination side of a migration: the region, its received bitmap, and postcopy placement.

A :class:`Destination` owns a region of memory (anonymous, or shared memory with ``memfd=True``;
4 KiB base pages, huge pages are not supported). During precopy it is plain memory: ``place``
copies pages in (overwriting older versions) and marks them received. ``start_postcopy()``
registers it with userfaultfd in MISSING mode and starts a C++ fault thread that never takes the
GIL: faults on pages marked local-fill are resolved on the spot, others become page requests that
``drain_requests()`` hands out (or that a C++ request sink sends to the source). In postcopy
``place`` never places a page twice and never overwrites one the guest may have written.

Reading a missing page of ``array``/``memoryview`` in postcopy blocks the reading thread (with the
GIL held, if it is a Python thread) until the page is placed by another thread or process.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig._core import PageBitmap
from livemig.errors import UnsupportedError
from livemig.memory import Region, system_page_size

if TYPE_CHECKING:
    from typing_extensions import Self

Runs = npt.ArrayLike | Sequence[tuple[int, int]]
"""Page runs: an (n, 2) array-like of (first_page, count) rows."""

State = Literal["precopy", "postcopy", "stopped"]


DestCounters = _core.DestCounters
#: One latency measure: log-linear buckets (bounds in ``lower_us`` / ``upper_us``) and quantiles.
LatencyStats = _core.LatencySnapshot
#: The three postcopy latency measures (fault, request, blocked).
FaultLatencies = _core.FaultLatencies


def _runs_array(runs: Runs) -> npt.NDArray[np.uint64]:
    arr = np.asarray(runs, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), np.uint64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"page runs must be an (n, 2) array of (first_page, count), got shape {arr.shape}"
        )
    if (arr < 0).any():
        raise ValueError("page runs must not be negative")
    return arr.astype(np.uint64)


class Destination:
    """A destination region with received bitmap, placement and (in postcopy) a fault thread."""

    def __init__(self, nbytes: int, *, memfd: bool = False, page_size: int | None = None) -> None:
        """A new region of ``nbytes`` (a positive page multiple); ``memfd`` for shared memory."""
        self._r = _core.DestRegion(nbytes, memfd, page_size or system_page_size())
        self._array: npt.NDArray[np.uint8] | None = None

    @classmethod
    def adopt(cls, region: Region) -> Destination:
        """A destination over a region's memory (kept exported by the engine while it lives)."""
        self = cls.__new__(cls)
        self._r = region._dest_engine()
        self._array = None
        return self

    def as_region(self) -> Region:
        """The destination's memory as a :class:`Region` (for the workload rebuilt on it)."""
        return Region(self.array, page_size=self.page_size)

    # ---- the region ----
    @property
    def region(self) -> _core.DestRegion:
        """The C++ engine (for C++ request sinks and receivers)."""
        return self._r

    @property
    def nbytes(self) -> int:
        return self._r.nbytes

    @property
    def pages(self) -> int:
        return self._r.pages

    @property
    def page_size(self) -> int:
        return self._r.page_size

    @property
    def state(self) -> State:
        """``"precopy"``, ``"postcopy"`` or ``"stopped"``."""
        s: State = self._r.state  # type: ignore[assignment]
        return s

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The region as a zero-copy, writable uint8 numpy array."""
        if self._array is None:
            self._array = self._r.memory()
        return self._array

    @property
    def memoryview(self) -> memoryview:
        """The region as a writable memoryview (zero-copy)."""
        return self.array.data

    @property
    def received(self) -> PageBitmap:
        """Pages placed (set only after a successful placement)."""
        return self._r.received

    @property
    def requested(self) -> PageBitmap:
        """Pages requested and not yet placed."""
        return self._r.requested

    @property
    def local_fill(self) -> PageBitmap:
        """Pages the fault thread resolves itself (with ``local_fill_value``)."""
        return self._r.local_fill

    @property
    def last_error(self) -> str:
        """The last error the fault thread caught, or ``""``."""
        return self._r.last_error

    # ---- life cycle ----
    def start_prefault(self, max_threads: int = 0, chunk_bytes: int = 0) -> None:
        """Populate the region ahead of the precopy receivers from C++ threads (precopy, before any
        page arrived, once). 0: the thread count is chosen by a short measurement (up to twice the
        CPUs, at most 8), chunks are 2 MiB. Pages not received by postcopy are made missing again."""
        self._r.start_prefault(max_threads, chunk_bytes)

    def settle_prefault(self) -> int:
        """Stop the prefault and make the pages it populated that were not received missing again
        (``start_postcopy`` does it too); returns how many were dropped (0 after the first call)."""
        return int(self._r.settle_prefault())

    def prefault_stats(self) -> _core.PrefaultStats:
        """What the prefault did (all zero when it never ran)."""
        return self._r.prefault_stats()

    def start_postcopy(self) -> None:
        """Register the region (MISSING mode) and start the fault thread.

        Raises UnsupportedError when userfaultfd or the mapping kind cannot do it."""
        self._r.start_postcopy()

    def stop(self) -> None:
        """Unregister (waiters wake; missing pages then read as zero) and join. Idempotent."""
        self._r.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- placement ----
    def place(self, first_page: int, data: Any) -> int:
        """Place whole pages from a buffer at ``first_page``; returns pages placed (received pages
        are dropped and counted in postcopy)."""
        return self._r.place(first_page, data)

    def place_zero(self, first_page: int, npages: int) -> int:
        """Place zero pages; returns pages placed."""
        return self._r.place_zero(first_page, npages)

    def place_fill(self, first_page: int, npages: int, pattern: int) -> int:
        """Place pages of the 32-bit ``pattern`` repeated (0: zero pages); returns pages placed."""
        return self._r.place_fill(first_page, npages, pattern)

    def mark_received(self, first_page: int, npages: int) -> None:
        """Mark pages written directly into ``array`` as received (precopy only)."""
        self._r.mark_received(first_page, npages)

    def set_local_fill(self, runs: Runs, value: int) -> None:
        """Mark page runs the fault thread resolves itself with ``value`` (32-bit; 0: zero page)."""
        self._r.set_local_fill(_runs_array(runs), value)

    def discard(self, runs: Runs) -> int:
        """Drop page runs and clear their received bits; returns how many were received."""
        return self._r.discard(_runs_array(runs))

    # ---- requests and statistics ----
    def drain_requests(self) -> npt.NDArray[np.uint64]:
        """Queued requests as an (n, 2) uint64 array of (first_page, count), oldest first."""
        return self._r.drain_requests()

    def wait_requests(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a request; True when one is queued."""
        return self._r.wait_requests(timeout)

    def counters(self) -> DestCounters:
        """A snapshot of the counters."""
        return self._r.counters()

    def latency(self) -> FaultLatencies:
        """The postcopy latency histograms: fault read to placed, request sent to placed, and
        faulting thread blocked (fault read to wake)."""
        return self._r.latency()

    # ---- the generic oracle ----
    def enable_digests(self) -> None:
        """Keep a digest of every page as it is placed (before anything is placed)."""
        self._r.enable_digests()

    @property
    def digests(self) -> npt.NDArray[np.uint64] | None:
        """What each page's last placement put there, as digests (0: nothing); None when off."""
        return self._r.digests


__all__ = ["DestCounters", "Destination", "FaultLatencies", "LatencyStats", "postcopy_unsupported_reason"]


def postcopy_unsupported_reason() -> str | None:
    """None when this process can run a postcopy destination; otherwise why not (the missing
    kernel feature or permission, as :class:`livemig.UnsupportedError` words it)."""
    try:
        d = Destination(system_page_size())
        d.start_postcopy()
        d.stop()
    except UnsupportedError as e:
        return str(e)
    return None
