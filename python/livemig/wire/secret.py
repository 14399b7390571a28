"""The shared secret: where it comes from (a file, or the environment). It authenticates the
handshake and keys TLS (docs/protocol.md, "Handshake" and "Encryption")."""

from __future__ import annotations

import errno
import os
import select
import stat
import time

SECRET_ENV = "LIVEMIG_SECRET"
"""Environment variable that may hold the shared secret (see :func:`load_secret`)."""


def load_secret(path: str | os.PathLike[str] | None = None, env: str = SECRET_ENV) -> bytes | None:
    """The shared secret from a file (whole contents, one trailing newline stripped) or else from
    the environment variable ``env``; None when neither is set. A secret that is empty or only
    whitespace is a ValueError. A FIFO or other non-regular file (``<(command)``) is read until its
    writer closes it, waiting at most :data:`SECRET_READ_TIMEOUT_S` (OSError after that: a FIFO
    nobody writes to must not hang the caller)."""
    if path is not None:
        data = _read_secret_file(os.fspath(path))
        if data.endswith(b"\n"):
            data = data[:-1]
    else:
        value = os.environ.get(env)
        if value is None:
            return None
        data = value.encode()
    if not data:
        raise ValueError("the shared secret is empty")
    if not data.strip():
        raise ValueError("the shared secret is only whitespace")
    return data


#: How long :func:`load_secret` waits for a FIFO's (or a pipe's) writer to deliver the secret.
SECRET_READ_TIMEOUT_S = 5.0
_MAX_SECRET_BYTES = 1 << 16


def _read_secret_file(path: str) -> bytes:
    """The contents of ``path``, opened without blocking: a regular file is read at once; a FIFO or
    a character device is read until end of file within SECRET_READ_TIMEOUT_S."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "it is a directory", path)
        if stat.S_ISREG(st.st_mode):
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(_MAX_SECRET_BYTES + 1)
        else:
            data = _read_until_eof(fd, path)
        if len(data) > _MAX_SECRET_BYTES:
            raise ValueError(f"the secret file {path} is larger than {_MAX_SECRET_BYTES >> 10} KiB")
        return data
    finally:
        os.close(fd)


def _read_until_eof(fd: int, path: str) -> bytes:
    deadline = time.monotonic() + SECRET_READ_TIMEOUT_S
    buf = bytearray()
    hung_up = False  # a writer came and went (a FIFO that never had one reads as empty, no hang-up)
    with select.epoll(1) as ep:
        ep.register(fd, select.EPOLLIN)
        while len(buf) <= _MAX_SECRET_BYTES:
            try:
                chunk: bytes | None = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                buf += chunk
                continue
            if chunk == b"" and (buf or hung_up):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"nothing wrote a secret to {path} within"
                                   f" {SECRET_READ_TIMEOUT_S:g} s (a FIFO without a writer?)", path)
            hung_up = any(ev & select.EPOLLHUP for _, ev in ep.poll(left))
    return bytes(buf)


__all__ = ["SECRET_ENV", "SECRET_READ_TIMEOUT_S", "load_secret"]
