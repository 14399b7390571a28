"""Steering a running migration: :class:`MigrationControl` (from another thread of this process)
and its Unix control socket (``livemig migrate --control PATH``; ``livemig resume PATH``)."""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

from livemig import wire
from livemig.errors import MigrationError

if TYPE_CHECKING:
    from typing_extensions import Self


class MigrationControl:
    """Steers a running :func:`livemig.migrate` from another thread: see whether it is paused
    (postcopy, connection broken) and resume it, optionally towards a new address. With
    ``MigrationConfig(auto_reconnect=False)`` the source waits for :meth:`resume`; otherwise a
    call makes the next reconnect attempt happen at once."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused: str | None = None
        self._pauses = 0
        self._pending: tuple[str | None] | None = None

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
    def _set_paused(self, cause: str | None) -> None:
        with self._cv:
            if cause is not None:
                self._pauses += 1
            self._paused = cause
            self._cv.notify_all()

    def _take_resume(self, timeout: float) -> tuple[str | None] | None:
        """Waits up to ``timeout`` for a resume() and consumes it."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending is not None, max(0.0, timeout))
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


__all__ = ["ControlServer", "MigrationControl", "request_resume"]
