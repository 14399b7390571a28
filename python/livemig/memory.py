"""The memory a workload lives in: :class:`Region`.

A region is one writable, page-aligned, contiguous buffer (an ``mmap.mmap``, a numpy array over
one, livemig's own allocation), its page size, and how writes to it are tracked: by the kernel
(userfaultfd asynchronous write-protect and ``PAGEMAP_SCAN``; nothing for the writer to do) or
explicitly (the writer calls :meth:`Region.mark_written` after it writes). The region holds its
buffer exported for its whole life, so the buffer cannot be closed or resized under a migration.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.errors import UnsupportedError

if TYPE_CHECKING:
    from typing_extensions import Buffer

Tracking = Literal["kernel", "explicit"]
TRACKING: tuple[Tracking, ...] = ("kernel", "explicit")


def system_page_size() -> int:
    """This system's base page size in bytes."""
    return int(_core.system_page_size())


def check_page_size(page_size: int) -> int:
    """``page_size`` when a region may have it here: ValueError for a value that is not a power of
    two of at least 64, UnsupportedError (feature "huge pages") for any other than the system's
    base page size."""
    if page_size < 64 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two of at least 64 bytes")
    if page_size != system_page_size():
        raise UnsupportedError(
            f"page size {page_size} is not this system's base page size ({system_page_size()} bytes);"
            " huge pages are not supported yet",
            feature="huge pages",
        )
    return page_size


def allocate(nbytes: int, page_size: int | None = None) -> mmap.mmap:
    """Private anonymous memory of ``nbytes`` (a positive page multiple), transparent huge pages
    off (dirty tracking is per base page: one written byte must not mark 2 MiB)."""
    ps = check_page_size(page_size or system_page_size())
    if nbytes <= 0 or nbytes % ps:
        raise ValueError(f"a region must be a positive multiple of {ps} bytes, got {nbytes}")
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
    except (OSError, AttributeError):  # advisory: only the tracking's precision suffers
        pass
    return m


class Region:
    """A workload's memory. ``buffer``: writable, C-contiguous, page-aligned, a positive whole
    number of ``page_size`` pages (default: the system's). ``tracking``: "kernel" or "explicit"."""

    #: False for memory another process owns (an attached process's memfd): a destination does not
    #: prefault it (its pages are the process's to allocate as they arrive).
    prefaultable = True

    def __init__(self, buffer: Buffer | npt.NDArray[Any], *, page_size: int | None = None,
                 tracking: Tracking = "kernel") -> None:
        if tracking not in TRACKING:
            raise ValueError(f"tracking must be 'kernel' or 'explicit', got {tracking!r}")
        ps = check_page_size(page_size or system_page_size())
        try:
            view = memoryview(buffer)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"a region needs a buffer (mmap.mmap, numpy array, bytearray), got"
                            f" {type(buffer).__name__}") from None
        if view.readonly:
            view.release()
            raise ValueError("the buffer is read-only; a region must be writable")
        if not view.c_contiguous:
            view.release()
            raise ValueError("the buffer is not contiguous; a region must be one run of bytes")
        nbytes = view.nbytes
        if nbytes == 0 or nbytes % ps:
            view.release()
            raise ValueError(f"the buffer holds {nbytes} bytes; a region must be a positive multiple of"
                             f" the page size ({ps} bytes)")
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        array = np.frombuffer(flat, dtype=np.uint8)
        address = int(array.ctypes.data)
        if address % ps:
            view.release()
            raise ValueError(f"the buffer starts at 0x{address:x}, not on a page boundary; allocate it"
                             " with mmap.mmap (or livemig.memory.allocate) and view it with numpy")
        self._owner = buffer
        self._views = (view, flat) if flat is not view else (view,)
        self._view = flat
        self._array = array
        self.page_size = ps
        self.nbytes = nbytes
        self.pages = nbytes // ps
        self.tracking: Tracking = tracking
        self.address = address
        self._tracker: _core.Source | None = None

    @classmethod
    def allocate(cls, nbytes: int, *, page_size: int | None = None, tracking: Tracking = "kernel") -> Region:
        """A region of new private anonymous memory (see :func:`allocate`)."""
        return cls(allocate(nbytes, page_size), page_size=page_size, tracking=tracking)

    @property
    def buffer(self) -> memoryview:
        """The region as a flat, writable byte memoryview (zero-copy)."""
        return self._view

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The region as a flat, writable uint8 numpy array (zero-copy)."""
        return self._array

    @property
    def owner(self) -> object:
        """The buffer the region was made from."""
        return self._owner

    def page(self, index: int) -> npt.NDArray[np.uint8]:
        """A view of page ``index``."""
        if not 0 <= index < self.pages:
            raise IndexError(f"page {index} out of range [0, {self.pages})")
        return self._array[index * self.page_size:(index + 1) * self.page_size]

    # ---- explicit tracking ----
    def mark_written(self, first_page: int, npages: int = 1) -> None:
        """Explicit tracking: the writer wrote pages [first_page, first_page + npages) (call it
        after the write). Outside a migration it does nothing: a migration starts with every page
        dirty. IndexError outside the region."""
        if not (0 <= first_page and 0 < npages and first_page + npages <= self.pages):
            raise IndexError(f"pages [{first_page}, {first_page + npages}) outside the region of"
                             f" {self.pages} pages")
        tracker = self._tracker
        if tracker is not None:
            tracker.mark_written(first_page, npages)

    def mark_written_runs(self, runs: npt.ArrayLike) -> None:
        """Explicit tracking: many writes at once, as (first_page, npages) rows (one C++ call)."""
        arr = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
        tracker = self._tracker
        if tracker is not None:
            tracker.mark_written_runs(arr)
        elif len(arr) and int((arr[:, 0] + arr[:, 1]).max()) > self.pages:
            raise IndexError(f"runs reach past the region of {self.pages} pages")

    # ---- where the engines come from (an attached process's region makes its own) ----
    @property
    def pagemap_path(self) -> str:
        """The pagemap that shows this memory's page table entries (the kernel's view of writes)."""
        return "/proc/self/pagemap"

    @property
    def kernel_address(self) -> int:
        """The region's address in the address space whose pagemap is :attr:`pagemap_path`."""
        return self.address

    def _source_engine(self) -> _core.Source:
        """The C++ source engine over this memory, tracking as :attr:`tracking` says."""
        return _core.Source.adopt(self.buffer, self.tracking, self.page_size)

    def page_digests(self) -> npt.NDArray[np.uint64]:
        """A digest of every page (C++, GIL released): the generic oracle's view of this memory."""
        return _core.page_digests(self.buffer, self.page_size)

    def _dest_engine(self) -> _core.DestRegion:
        """The C++ destination engine placing into this memory."""
        return _core.DestRegion.adopt(self.buffer, self.page_size)

    def _bind_tracker(self, source: _core.Source | None) -> None:
        """The migration's engine takes explicit marks from now on (None: nobody)."""
        self._tracker = source

    def release(self) -> None:
        """Lets the buffer go (it may be closed or resized after this); the region is unusable then.
        BufferError while something still uses the region's memory (an engine, an array of it)."""
        array, self._array = self._array, np.empty(0, dtype=np.uint8)
        try:
            for v in reversed(self._views):
                v.release()
        except BufferError:
            self._array = array
            raise BufferError("the region's memory is still in use (a migration engine, or an array taken from"
                              " region.array): let those go first") from None

    def __repr__(self) -> str:
        return (f"Region({self.nbytes} bytes at 0x{self.address:x}, {self.pages} pages of {self.page_size},"
                f" tracking={self.tracking!r})")


__all__ = ["TRACKING", "Region", "Tracking", "allocate", "check_page_size", "system_page_size"]
