"""livemig's exceptions. Errors raised in the C++ core arrive as these classes."""

from __future__ import annotations


class LivemigError(Exception):
    """Base class of every livemig error."""


class KernelError(LivemigError, OSError):
    """A system call failed: ``errno``, the ``step`` that failed, and where known the address and
    the bytes done before the failure."""

    def __init__(
        self, errno: int, message: str, *, step: str = "", address: int = 0, bytes_done: int = 0
    ) -> None:
        super().__init__(errno, message)
        self.step = step
        self.address = address
        self.bytes_done = bytes_done

    def __str__(self) -> str:
        where = f" at 0x{self.address:x}" if self.address else ""
        done = f" after {self.bytes_done} bytes" if self.bytes_done else ""
        return f"{self.strerror}{where}{done} [errno {self.errno}]"


class UnsupportedError(LivemigError):
    """The kernel, its configuration or this process's permissions lack a feature livemig needs;
    ``feature`` names it."""

    def __init__(self, message: str, *, feature: str = "") -> None:
        super().__init__(message)
        self.feature = feature


class ProtocolError(LivemigError):
    """The peer sent something malformed, unexpected or of an unknown version."""


class AuthenticationError(ProtocolError):
    """The peer failed the shared-secret challenge."""


class ConnectionLost(LivemigError, ConnectionError):
    """The peer closed the connection or it broke."""


class MigrationError(LivemigError):
    """A migration could not complete; the message says which step and why."""


class WorkloadError(LivemigError):
    """A workload did not do what the migration asked of it (pause in time, export or rebuild its
    state, host a kind): the message names the workload and what went wrong."""


__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "KernelError",
    "LivemigError",
    "MigrationError",
    "ProtocolError",
    "UnsupportedError",
    "WorkloadError",
]
