"""The workload process's side of the attach protocol for a Python program (docs/attach.md): its
state lives in a memfd-backed numpy array that livemig migrates while the program keeps running.

    from livemig.attach.client import AttachClient

    with AttachClient(64 << 20, name="counter") as client:   # a memfd, mapped MAP_SHARED
        counts = client.ndarray(np.uint64)                    # the program's state, in that memory
        client.connect("/run/livemig.sock")                   # livemig migrate --attach /run/livemig.sock
        with client.writer():
            while client.checkpoint():                        # parks here while livemig pauses
                counts[i % len(counts)] += 1

On a destination (``role="destination"``) the memory starts empty: ``checkpoint()`` holds every
writer until livemig resumes the program with its migrated memory, which it then continues from.
The C library ``livemig_attach`` does the protocol; its callbacks come here on its own thread.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.memory import system_page_size

if TYPE_CHECKING:
    from typing_extensions import Self

Role = Literal["source", "destination"]
#: What check() returns: items checked, failures, a line of text.
CheckFn = Callable[[], tuple[int, int, str]]


class _Callbacks:
    """What the library's serving thread calls (with the GIL): writers parked at checkpoints on
    pause, let go on resume. Holds no reference to the attachment (no cycle through C++)."""

    def __init__(self, role: Role, pause_timeout: float, save_state: Callable[[], bytes] | None,
                 load_state: Callable[[bytes], None] | None, check: CheckFn | None) -> None:
        self.cond = threading.Condition()
        self.pause_timeout = pause_timeout
        self.paused = role == "destination"  # a destination runs once livemig resumes it
        self.writers = 0
        self.parked = 0
        self.stopped = False  # the workload must not run here any more (migrated away, or closed)
        self.started = threading.Event()
        self.ended = threading.Event()
        self.lost_info: _core.AttachLost | None = None
        self.user_save, self.user_load, self.user_check = save_state, load_state, check

    def pause(self) -> int:
        with self.cond:
            self.paused = True
            self.cond.notify_all()
            if self.cond.wait_for(lambda: self.parked >= self.writers, self.pause_timeout):
                return 0
            self.paused = False  # gave up within the bound: the workload runs on
            self.cond.notify_all()
            return -errno.ETIMEDOUT

    def resume(self) -> int:
        with self.cond:
            self.paused = False
            self.cond.notify_all()
        self.started.set()
        return 0

    def save_state(self) -> bytes:
        return self.user_save() if self.user_save is not None else b""

    def load_state(self, state: bytes) -> int:
        if self.user_load is not None:
            self.user_load(state)
        elif state:
            return -errno.EOPNOTSUPP
        return 0

    def check(self) -> tuple[int, int, str]:
        assert self.user_check is not None
        return self.user_check()

    def lost(self, info: _core.AttachLost) -> None:
        with self.cond:
            self.lost_info = info
            # A source handed off: the workload runs elsewhere now and must stay stopped here.
            # A destination that never ran: its memory is incomplete; it must not run either.
            if info.paused and (info.handed_off or (info.role == "destination" and not self.started.is_set())):
                self.stopped = True
            self.cond.notify_all()
        self.ended.set()


class AttachClient:
    """``nbytes`` of memfd memory (a whole number of pages) that livemig can migrate. ``role``:
    "source" (memory to migrate away) or "destination" (empty memory livemig fills). Optional
    callbacks: ``save_state() -> bytes`` / ``load_state(bytes)`` (state kept outside the memory,
    carried with it), ``check() -> (items, failures, text)`` (the program verifies its memory).
    ``pause_timeout``: how long a pause waits for every writer to reach a checkpoint."""

    def __init__(self, nbytes: int, *, role: Role = "source", name: str = "python",
                 save_state: Callable[[], bytes] | None = None, load_state: Callable[[bytes], None] | None = None,
                 check: CheckFn | None = None, pause_timeout: float = 1.0, io_timeout: float = 5.0) -> None:
        ps = system_page_size()
        if nbytes <= 0 or nbytes % ps:
            raise ValueError(f"the memory must be a positive multiple of the page size ({ps} bytes), got {nbytes}")
        if role not in ("source", "destination"):
            raise ValueError(f"role must be 'source' or 'destination', got {role!r}")
        self.role: Role = role
        self.name = name
        self._memfd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._memfd, nbytes)
            self.memory = mmap.mmap(self._memfd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._memfd)
            raise
        self._cb = _Callbacks(role, pause_timeout, save_state, load_state, check)
        self._client = _core.AttachClient(self.memory, self._memfd, 0, role, name, check is not None,
                                          int(io_timeout * 1000), self._cb)
        self._local = threading.local()

    # ---- the memory ----
    @property
    def nbytes(self) -> int:
        return len(self.memory)

    @property
    def memfd(self) -> int:
        """The memfd behind the memory (owned by the client: closed by :meth:`close`)."""
        return self._memfd

    def ndarray(self, dtype: npt.DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None,
                offset: int = 0) -> npt.NDArray[Any]:
        """A numpy view of the memory (no copy): ``shape`` items of ``dtype`` from byte ``offset``
        (default: as many as fit). On a destination, touch it only after :meth:`wait_started`."""
        dt = np.dtype(dtype)
        count = (self.nbytes - offset) // dt.itemsize if shape is None else int(np.prod(shape))
        arr = np.frombuffer(self.memory, dtype=dt, count=count, offset=offset)
        return arr if shape is None else arr.reshape(shape)

    # ---- the attachment ----
    def connect(self, path: str | os.PathLike[str]) -> None:
        """Attaches to livemig listening at the Unix socket ``path`` (``livemig migrate --attach``
        on a source, ``livemig listen --attach`` on a destination) and answers it from a library
        thread from now on. ConnectionLost, ProtocolError or KernelError saying why not."""
        self._cb.ended.clear()
        self._client.connect(os.fspath(path))

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """Marks the calling thread as one that writes the memory: a pause waits until it is parked
        at :meth:`checkpoint` (or has left this block)."""
        cb = self._cb
        with cb.cond:
            cb.writers += 1
        try:
            yield
        finally:
            with cb.cond:
                cb.writers -= 1
                cb.cond.notify_all()

    def checkpoint(self) -> bool:
        """Call between two operations of a writer: returns True at once while the workload runs,
        waits while livemig has it paused (on a destination, until it first runs). False when it
        must stop here: its memory moved to a destination (a source handed off), a destination's
        memory never arrived whole, or the client was closed."""
        cb = self._cb
        with cb.cond:
            if not cb.paused and not cb.stopped:
                return True
            cb.parked += 1
            cb.cond.notify_all()
            try:
                cb.cond.wait_for(lambda: not cb.paused or cb.stopped)
            finally:
                cb.parked -= 1
            return not cb.stopped

    def wait_started(self, timeout: float | None = None) -> bool:
        """A destination: True once livemig resumed it (its memory is here, or arrives on touch)."""
        return self._cb.started.wait(timeout)

    def wait_lost(self, timeout: float | None = None) -> _core.AttachLost | None:
        """Waits for the attachment to end (livemig detached, died or broke the protocol); what the
        library restored then (see docs/attach.md), or None after ``timeout`` s."""
        return self._cb.lost_info if self._cb.ended.wait(timeout) else None

    @property
    def lost(self) -> _core.AttachLost | None:
        """What the library restored when the last attachment ended; None while attached."""
        return self._cb.lost_info if self._cb.ended.is_set() else None

    @property
    def migrated_away(self) -> bool:
        """A source whose workload now runs on the destination: stop here, do not resume."""
        info = self.lost
        return info is not None and info.role == "source" and info.handed_off

    @property
    def capabilities(self) -> int:
        return int(self._client.capabilities)

    def detach(self) -> None:
        """Ends the attachment politely; the memory is ordinary again (see docs/attach.md)."""
        self._client.detach()

    def close(self) -> None:
        """Detaches, lets every writer out of :meth:`checkpoint` (returning False) and closes the
        memfd; the memory stays mapped while arrays use it. Idempotent."""
        if self._client.closed:
            return
        self._client.close()
        with self._cb.cond:
            self._cb.stopped = True
            self._cb.cond.notify_all()
        with contextlib.suppress(OSError):
            os.close(self._memfd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AttachClient", "CheckFn", "Role"]
