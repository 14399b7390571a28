"""The embedded destination: ``livemig migrate`` without ``--to`` runs ``livemig listen`` itself.

The destination is a separate process (its own userfaultfd, its own address space), started on
loopback with port 0; it prints ``listening on HOST:PORT`` as its first stdout line, which is how
the source learns where to connect. The child never outlives the context that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from livemig.errors import MigrationError

ANNOUNCE_PREFIX = "listening on "
"""What ``livemig listen --announce`` prints first on stdout, followed by the address."""

_PR_SET_PDEATHSIG = 1


def _resolve_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, in the parent: the child runs _die_with_parent between fork and exec, where
# loading a library (dlopen takes the loader's lock, which another thread may have held at the
# fork) is not safe.
_prctl = _resolve_prctl()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Asks the kernel to SIGKILL the child when the parent dies (even by SIGKILL)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def listen_command(extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of the embedded destination (this Python, loopback, one migration)."""
    return [sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--once", "--announce",
            *extra_args]


@dataclass
class LocalDestination:
    """A running destination process and the address it announced."""

    address: str
    process: subprocess.Popen[bytes]
    _stderr: IO[bytes]

    def wait(self, timeout: float) -> int:
        """Waits up to ``timeout`` s for the destination to exit by itself (killing it past that)
        and returns its exit code (negative: killed by that signal)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(self.process)
            return self.process.returncode

    def stderr_text(self) -> str:
        """What the destination wrote on stderr so far. Read with pread: the file's offset is the
        child's too (one open file), and a seek here would make its next line overwrite the first."""
        fd, chunks, at = self._stderr.fileno(), [], 0
        while chunk := os.pread(fd, 1 << 20, at):
            chunks.append(chunk)
            at += len(chunk)
        return b"".join(chunks).decode(errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a short grace, then SIGKILL; always reaps."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_announce(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """The first stdout line of ``proc`` within ``deadline`` (a time.monotonic() value)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def local_destination(
    extra_args: Sequence[str] = (),
    *,
    deadline: float = 20.0,
    command: Sequence[str] | None = None,
) -> Iterator[LocalDestination]:
    """Starts the embedded destination (``command``, default :func:`listen_command` with
    ``extra_args``) and yields it once it has announced its address. Raises MigrationError when it
    does not announce within ``deadline`` seconds or exits first. On leaving the context, by
    return or exception, the child is terminated if still running and always reaped."""
    argv = list(command) if command is not None else listen_command(extra_args)
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we end the child
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (one prctl call, resolved before the fork)
            )
        except OSError as e:
            raise MigrationError(f"cannot start the local destination: {e}") from e
        try:
            dest = LocalDestination("", proc, err)
            try:
                line = _read_announce(proc, time.monotonic() + deadline)
            except TimeoutError:
                raise MigrationError(
                    f"the local destination did not announce its address within {deadline:g} s"
                ) from None
            except EOFError:
                code = proc.wait()
                why = _last_line(dest.stderr_text()) or f"exit code {code}"
                raise MigrationError(
                    f"the local destination exited before listening: {why}"
                ) from None
            if not line.startswith(ANNOUNCE_PREFIX):
                raise MigrationError(f"the local destination announced {line!r}, expected "
                                     f"{ANNOUNCE_PREFIX!r} and an address")
            dest.address = line[len(ANNOUNCE_PREFIX):]
            yield dest
        finally:
            _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
