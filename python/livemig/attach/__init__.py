"""Attaching another process's memory (docs/attach.md): livemig's listening side, the example
workload process that ships with the package, and a client for Python programs.

- :class:`AttachListener`: the Unix socket a workload process connects to; :meth:`AttachListener.accept`
  validates its descriptors and hands back the attachment.
- :func:`program`: where the installed C programs are (``livemig-hashtable``, the example process).
- :class:`livemig.attach.client.AttachClient`: the process's side, for a Python program whose state is
  a memfd-backed numpy array.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from livemig import _core
from livemig.errors import ConnectionLost, WorkloadError

if TYPE_CHECKING:
    from typing_extensions import Self

#: Where the package installs the attach library, headers and programs (a wheel's layout).
PACKAGE_PREFIX = Path(__file__).parent


def install_prefix() -> Path | None:
    """The installed attach tree (``include/``, ``lib/``, ``lib/pkgconfig/``, ``bin/``), or None in a
    source checkout whose build tree is used instead (see :func:`program`)."""
    return PACKAGE_PREFIX if (PACKAGE_PREFIX / "include" / "livemig_attach.h").exists() else None


def program(name: str = "livemig-hashtable") -> Path:
    """The path of an installed attach program: the package's ``bin/``, else the build tree the
    extension was loaded from (a development checkout). FileNotFoundError when neither has it."""
    candidates = [PACKAGE_PREFIX / "bin" / name]
    core = Path(_core.__file__).resolve().parent
    candidates.append(core / "cpp" / "attach" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} is not installed with this livemig (looked in {', '.join(map(str, candidates))})")


class AttachListener:
    """A Unix stream socket at ``path`` that workload processes connect to (made now, replacing a
    stale socket file; removed by :meth:`close`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        p = Path(self.path)
        if p.is_socket():
            p.unlink()
        elif p.exists():
            raise WorkloadError(f"{self.path} exists and is not a socket; livemig will not replace it")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
            self._sock.listen(4)
        except OSError as e:
            self._sock.close()
            raise WorkloadError(f"cannot listen for workload processes at {self.path}: {e.strerror}") from e

    def ready(self, wait: float) -> bool:
        """True when a process is waiting to be accepted (waits up to ``wait`` s)."""
        try:
            r, _, _ = select.select([self._sock], [], [], wait)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(r)

    def accept(self, *, role: str | None = None, expect_len: int = 0, wait: float | None = 30.0,
               timeout: float = 5.0) -> _core.AttachConnection:
        """Waits up to ``wait`` seconds (None: for ever) for a process to connect, then validates its
        HELLO and descriptors within ``timeout`` (``role``/``expect_len``: what it must be).
        ConnectionLost when none came; ProtocolError (naming the descriptor or message) when the
        process's attachment is refused."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self._sock], [], [], left)
            if r:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectionLost(f"no workload process attached at {self.path} within {wait:g} s")
        conn, _ = self._sock.accept()
        return _core.AttachConnection.accept(conn.detach(), role=role, expect_len=expect_len, timeout=timeout)

    def close(self) -> None:
        """Stops listening and removes the socket file; idempotent."""
        if self._sock.fileno() >= 0:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def launch(command: str, *, socket_path: str, size: int, role: str) -> subprocess.Popen[bytes]:
    """Starts a workload process from a command template (``{socket}``, ``{size}``, ``{role}`` and
    ``{hashtable}``, the example program, are substituted); its output goes to this process's stderr."""
    fields = {"socket": socket_path, "size": str(size), "role": role}
    if "{hashtable}" in command:
        fields["hashtable"] = str(program())
    argv = [a.format(**fields) for a in shlex.split(command)]
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=2, close_fds=True)  # status lines: stderr
    except OSError as e:
        raise WorkloadError(f"cannot start the workload process {argv[0]!r}: {e.strerror}") from e


def end_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> int | None:
    """Asks a launched process to end (SIGTERM), kills it after ``grace`` seconds; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


__all__ = ["PACKAGE_PREFIX", "AttachListener", "end_process", "install_prefix", "launch", "program"]
