"""SIGINT and SIGTERM during ``livemig migrate``: each becomes :meth:`MigrationControl.cancel`, called
from a thread of its own at once (even while the main thread is inside a long C++ call), so the
migration cancels before the destination's workload may run and *finishes* after it (a second
signal within a few seconds aborts). The signal numbers are kept for the exit status (128 + n)."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from livemig.migration import MigrationControl

if TYPE_CHECKING:
    from typing_extensions import Self

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing (the C-level one already wrote the number to the pipe)."""


class SignalsToControl:
    """While entered (in the main thread): SIGINT/SIGTERM call ``control.cancel()``."""

    def __init__(self, control: MigrationControl) -> None:
        self.control = control
        self.received: list[int] = []  #: signal numbers, in order
        self._old: dict[int, object] = {}
        self._old_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: leave them alone
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            self._old[sig] = signal.signal(sig, _ignore)
        os.set_blocking(r, True)
        self._thread = threading.Thread(target=self._watch, name="livemig-signals", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        assert self._pipe is not None
        while True:
            try:
                data = os.read(self._pipe[0], 64)
            except OSError:
                return
            if not data:
                return  # the write end closed: done
            for signum in data:
                if signum not in _SIGNALS:
                    continue
                self.received.append(signum)
                self.control.cancel(f"{signal.Signals(signum).name} received")

    @property
    def exit_status(self) -> int:
        """128 + the last signal's number (the shell's convention), 0 without one."""
        return 128 + self.received[-1] if self.received else 0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._pipe is None:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._old_fd)
        r, w = self._pipe
        os.close(w)
        if self._thread is not None:
            self._thread.join(5)
        os.close(r)
        self._pipe = None


__all__ = ["SignalsToControl"]
