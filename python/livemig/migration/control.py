"""Steering a running migration: :class:`MigrationControl` (from another thread of this process)
and its Unix control socket (``livemig migrate --control PATH``; ``livemig resume PATH``)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from livemig import wire
from livemig.errors import MigrationError
from livemig.migration.progress import notice

if TYPE_CHECKING:
    from typing_extensions import Self


#: A second interrupt within this many seconds of the one that asked a postcopy to finish aborts it.
ABORT_WINDOW_S = 5.0

Intent = Literal["cancel", "finish", "abort"]


class Interrupted(MigrationError):
    """The user stopped the migration (:meth:`MigrationControl.cancel`, or a signal through it)."""


class Cancelled(Interrupted):
    """Cancelled before the destination's workload could run: the source's runs on."""


class Aborted(Interrupted):
    """Aborted after the destination's workload may have run: what only the source held is lost."""


class MigrationControl:
    """Steers a running :func:`livemig.migrate` from another thread: see whether it is paused
    (postcopy, connection broken) and resume it, optionally towards a new address; or stop it
    (:meth:`cancel`). With ``MigrationConfig(auto_reconnect=False)`` the source waits for
    :meth:`resume`; otherwise a call makes the next reconnect attempt happen at once."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused: str | None = None
        self._pauses = 0
        self._pending: tuple[str | None] | None = None
        self._cancels = 0
        self._intent: Intent | None = None
        self._finish_at = 0.0
        self._protected = False  # the destination's workload may run: a first cancel finishes
        self._only_here: Callable[[], int] = lambda: 0
        self._wake: Callable[[], None] = lambda: None
        self._progress: object = None

    def cancel(self, why: str = "cancel requested") -> str:
        """Stops the migration, as safely as its state allows; returns what it will do (also
        told through the run's Progress.notice). Before the destination's workload may run: the
        migration is cancelled and the source's workload runs on. Once it may run: the only
        complete copy is split between the two, so the migration *finishes* (keeps serving and
        pushing until every page is on the destination); a second call within ABORT_WINDOW_S
        aborts it, and the pages only the source holds are lost (the failure says which)."""
        with self._cv:
            self._cancels += 1
            now = time.monotonic()
            if not self._protected:
                self._intent = "cancel"
                text = (f"{why}: cancelling; the destination's workload never ran, so the source's runs on")
            elif self._intent in ("finish", "abort") and now - self._finish_at <= ABORT_WINDOW_S:
                self._intent = "abort"
                text = (f"{why} again: ABORTING; the {self._only_here():,} pages only the source holds will be"
                        " lost and the destination's workload left incomplete")
            else:
                self._intent, self._finish_at = "finish", now
                n = self._only_here()
                held = f"{n:,} pages exist only here" if n else "the destination may be running it"
                text = (f"{why}: FINISHING the migration, not stopping it: the destination's workload runs and {held};"
                        f" interrupt again within {ABORT_WINDOW_S:g} s to abort and lose them")
            self._cv.notify_all()
            wake, progress, intent = self._wake, self._progress, self._intent
        if intent != "finish":
            wake()
        notice(progress, text)
        return text

    @property
    def cancels(self) -> int:
        """How many times :meth:`cancel` was called."""
        with self._cv:
            return self._cancels

    @property
    def paused(self) -> str | None:
        """Why the migration is paused (the broken connection's error), or None while it runs."""
        with self._cv:
            return self._paused

    def wait_paused(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s until the migration is paused; True when it is."""
        with self._cv:
            return self._cv.wait_for(lambda: self._paused is not None, timeout)

    def resume(self, address: str | None = None) -> None:
        """Resumes a paused migration over a new connection to ``address`` (None: the same one).
        Without a pause under way it is kept for the next one."""
        with self._cv:
            self._pending = (address,)
            self._cv.notify_all()

    # -- for the source run --
    def _bind(self, progress: object, wake: Callable[[], None], only_here: Callable[[], int]) -> None:
        """The run that cancel() steers: its progress (for notices), how to make its pumps return
        soon (from any thread), and how many pages only the source holds."""
        with self._cv:
            self._progress, self._wake, self._only_here = progress, wake, only_here

    def _protect(self) -> None:
        """The destination's workload may run from now on: a first cancel finishes, not cancels.
        Raises Cancelled instead when a cancel came first (atomically: no cancel falls between)."""
        with self._cv:
            if self._intent == "cancel":
                raise Cancelled("cancelled: the destination's workload never ran; the source's runs on")
            self._protected = True

    def _intended(self) -> Intent | None:
        with self._cv:
            return self._intent

    def _check(self) -> None:
        """Raises Cancelled or Aborted when cancel() asked for it (called by the run between steps)."""
        with self._cv:
            intent = self._intent
        if intent == "cancel":
            raise Cancelled("cancelled: the destination's workload never ran; the source's runs on")
        if intent == "abort":
            raise Aborted("aborted by the user after the destination's workload started")

    def _set_paused(self, cause: str | None) -> None:
        with self._cv:
            if cause is not None:
                self._pauses += 1
            self._paused = cause
            self._cv.notify_all()

    def _take_resume(self, timeout: float) -> tuple[str | None] | None:
        """Waits up to ``timeout`` for a resume() and consumes it; returns early (None) when cancel()
        asked to cancel or abort (the caller checks with _check)."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending is not None or self._intent in ("cancel", "abort"),
                              max(0.0, timeout))
            pending, self._pending = self._pending, None
            return pending


# ---- the manual resume command: a Unix control socket (``livemig migrate --control PATH``) ----


class ControlServer:
    """Where ``livemig resume PATH`` reaches a running migration: a Unix stream socket (mode
    0600) taking one line per connection, ``resume`` or ``resume ADDRESS``, and answering one
    line: ``resuming (paused: CAUSE)`` or ``not paused: kept for the next pause``."""

    def __init__(self, path: str, control: MigrationControl) -> None:
        self.path, self._control = path, control
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(4)
        except OSError as e:
            self._sock.close()
            why = "it exists already (another migration's, or a stale file)" if os.path.exists(path) else (
                e.strerror or str(e))
            raise MigrationError(f"cannot make the control socket {path}: {why}") from None
        self._thread = threading.Thread(target=self._serve, name="livemig-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(5.0)
                    line = conn.makefile("rb").readline(4096).decode(errors="replace").split()
                    if not line or line[0] != "resume" or len(line) > 2:
                        conn.sendall(b"error: expected 'resume' or 'resume ADDRESS'\n")
                        continue
                    if len(line) == 2:
                        wire.parse_address(line[1])  # ValueError: told below
                    cause = self._control.paused
                    self._control.resume(line[1] if len(line) == 2 else None)
                    answer = f"resuming (paused: {cause})" if cause else "not paused: kept for the next pause"
                    conn.sendall(answer.encode() + b"\n")
                except ValueError as e:
                    conn.sendall(f"error: {e}\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        """Stops serving and removes the socket file."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_resume(path: str, address: str | None = None, timeout: float = 5.0) -> str:
    """Asks the migration behind control socket ``path`` to resume (towards ``address``); returns
    its answer. MigrationError when it refuses; OSError when nothing listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"resume {address}\n".encode() if address else b"resume\n")
        answer = s.makefile("rb").readline(4096).decode(errors="replace").strip()
    if not answer or answer.startswith("error"):
        raise MigrationError(f"the migration at {path} refused: {answer or 'no answer'}")
    return answer


__all__ = ["ABORT_WINDOW_S", "Aborted", "Cancelled", "ControlServer", "Interrupted", "MigrationControl",
           "request_resume"]
