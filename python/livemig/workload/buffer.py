"""A user's buffer as a workload (kind ``buffer``): memory the user owns, in this process, that the
user's own threads keep writing while it migrates: an ``mmap``, a numpy array over one.

Writes are tracked by the kernel (nothing for the writers to do) or explicitly (the writers call
:meth:`BufferWorkload.mark_written`). Pausing is the user's: callables they supply, or a
:class:`PauseGate` their writers pass through. On the destination the memory arrives in a buffer
the user's code takes over (``serve()`` returns the workload; :attr:`BufferWorkload.array`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from livemig.errors import WorkloadError
from livemig.memory import Region, Tracking
from livemig.workload.base import CheckResult, kind_mismatch

if TYPE_CHECKING:
    from typing_extensions import Buffer

KIND = "buffer"
VERSION = 1
#: The most device-state bytes a buffer workload's ``state`` may hold.
MAX_STATE_BYTES = 64 << 20


class PauseGate:
    """Where writer threads and a migration agree on quiet. Writers wrap each burst of writes in
    ``with gate.writing():`` (or call :meth:`checkpoint` between writes); :meth:`pause` waits until
    no writer is inside and holds new ones at the door until :meth:`resume`. Thread-safe."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused = False
        self._inside = 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A burst of writes: waits while paused, then holds off pause() until the burst ends."""
        with self._cv:
            self._cv.wait_for(lambda: not self._paused)
            self._inside += 1
        try:
            yield
        finally:
            with self._cv:
                self._inside -= 1
                self._cv.notify_all()

    def checkpoint(self) -> None:
        """A point between writes where the writer may be held while paused."""
        with self._cv:
            self._cv.wait_for(lambda: not self._paused)

    @property
    def paused(self) -> bool:
        with self._cv:
            return self._paused

    def pause(self, timeout: float) -> bool:
        """Holds new writes and waits up to ``timeout`` s for the writers inside; True when quiet.
        False (and not paused) when a writer stayed inside."""
        with self._cv:
            self._paused = True
            if self._cv.wait_for(lambda: self._inside == 0, timeout):
                return True
            self._paused = False
            self._cv.notify_all()
            return False

    def resume(self) -> None:
        """Lets the writers in again (idempotent)."""
        with self._cv:
            self._paused = False
            self._cv.notify_all()


def _call_with_deadline(fn: Callable[[], object], timeout: float, what: str) -> None:
    """Runs ``fn`` on a helper thread and waits up to ``timeout`` s for it (a user callable may
    never return); WorkloadError when it does not, or re-raises what it raised."""
    done = threading.Event()
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller below)
            box.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name=f"livemig-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise WorkloadError(f"the buffer workload's {what}() did not return within {timeout:g} s")
    if box:
        raise WorkloadError(f"the buffer workload's {what}() raised {type(box[0]).__name__}: {box[0]}") from box[0]


class BufferWorkload:
    """The user's ``buffer`` as a workload. ``tracking``: "kernel" (no work for the writers) or
    "explicit" (writers call :meth:`mark_written`). ``pause``/``resume``: callables that stop and
    restart the writers, or ``gate``: a :class:`PauseGate` they pass through (default: a gate of
    its own, which writers that never use it do not notice: then pause only marks a point in
    time, and correctness needs the writers quiet there by other means). ``state``: bytes (or a
    callable returning them at switchover) the destination gets back as :attr:`state`. ``check``:
    a self-check, run paused, returning a bool or a :class:`CheckResult`."""

    kind = KIND
    version = VERSION

    def __init__(
        self,
        buffer: Buffer | npt.NDArray[Any] | Region,
        *,
        page_size: int | None = None,
        tracking: Tracking = "kernel",
        pause: Callable[[], object] | None = None,
        resume: Callable[[], object] | None = None,
        gate: PauseGate | None = None,
        state: bytes | Callable[[], bytes] = b"",
        check: Callable[[], bool | CheckResult] | None = None,
    ) -> None:
        if (pause is None) != (resume is None):
            raise ValueError("give both pause and resume callables, or neither (then a PauseGate is used)")
        if pause is not None and gate is not None:
            raise ValueError("give pause/resume callables or a gate, not both")
        if not callable(state) and not isinstance(state, (bytes, bytearray, memoryview)):
            raise TypeError(f"state must be bytes or a callable returning bytes, got {type(state).__name__}")
        self._region = buffer if isinstance(buffer, Region) else Region(buffer, page_size=page_size, tracking=tracking)
        self._pause, self._resume = pause, resume
        self.gate = gate if gate is not None or pause is not None else PauseGate()
        self._state = state
        self._check = check
        self.received_state: bytes | None = None  # set on a destination
        self._paused_at: float | None = None

    # ---- the workload protocol ----
    @property
    def region(self) -> Region:
        return self._region

    @property
    def balloon(self) -> None:
        return None

    def start(self) -> None:
        pass  # the user's writers run by themselves

    def pause(self, timeout: float) -> None:
        if self._pause is not None:
            _call_with_deadline(self._pause, timeout, "pause")
        elif self.gate is not None and not self.gate.pause(timeout):
            raise WorkloadError(f"the buffer workload's writers did not leave the gate within {timeout:g} s")
        self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._resume is not None:
            self._resume()
        elif self.gate is not None:
            self.gate.resume()
        self._paused_at = None

    def stop(self) -> None:
        pass  # the writers are the user's; the memory stays theirs

    def export_state(self) -> bytes:
        data = self._state() if callable(self._state) else self._state
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WorkloadError(f"the buffer workload's state callable returned {type(data).__name__}, not bytes")
        data = bytes(data)
        if len(data) > MAX_STATE_BYTES:
            raise WorkloadError(f"the buffer workload's state is {len(data)} bytes, past the limit of {MAX_STATE_BYTES}")
        return data

    def check(self) -> CheckResult | None:
        if self._check is None:
            return None
        r = self._check()
        return r if isinstance(r, CheckResult) else CheckResult(ok=bool(r), detail="" if r else "the user's check failed")

    def stats(self) -> dict[str, int | float]:
        return {"bytes": self._region.nbytes}

    # ---- for the user ----
    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The memory as a flat uint8 numpy array (zero-copy)."""
        return self._region.array

    @property
    def state(self) -> bytes | None:
        """On a destination: the device state the source's workload exported."""
        return self.received_state

    def mark_written(self, first_page: int, npages: int = 1) -> None:
        """Explicit tracking: the writer wrote these pages (call after the write)."""
        self._region.mark_written(first_page, npages)

    def mark_written_bytes(self, offset: int, length: int) -> None:
        """Explicit tracking: the writer wrote ``length`` bytes from byte ``offset``."""
        ps = self._region.page_size
        if length <= 0:
            return
        first = offset // ps
        self._region.mark_written(first, (offset + length - 1) // ps - first + 1)


class BufferFactory:
    """Rebuilds buffer workloads on a destination: the memory arrives in livemig's own allocation
    (or, with ``allocate``, in a buffer the user's callable returns for (nbytes, page_size)), and
    ``on_arrival`` (optional) is called with the rebuilt workload once the migration completed."""

    def __init__(self, allocate: Callable[[int, int], Buffer | npt.NDArray[Any]] | None = None) -> None:
        self._allocate = allocate

    def memory(self, nbytes: int, page_size: int) -> Region | None:
        if self._allocate is None:
            return None
        return Region(self._allocate(nbytes, page_size), page_size=page_size)

    def prepare(self, region: Region) -> None:
        pass

    def accepts(self, kind: str, version: int) -> str | None:
        return kind_mismatch(kind, version, KIND, VERSION)

    def build(self, kind: str, version: int, region: Region, state: bytes) -> BufferWorkload:
        why = self.accepts(kind, version)
        if why is not None:
            raise WorkloadError(why)
        w = BufferWorkload(region)
        w.received_state = bytes(state)
        return w


__all__ = ["KIND", "MAX_STATE_BYTES", "VERSION", "BufferFactory", "BufferWorkload", "PauseGate"]
