"""The shared secret: where it comes from (a file, or the environment). It authenticates the
handshake and keys TLS (docs/protocol.md, "Handshake" and "Encryption")."""

from __future__ import annotations

import os

SECRET_ENV = "LIVEMIG_SECRET"
"""Environment variable that may hold the shared secret (see :func:`load_secret`)."""


def load_secret(path: str | os.PathLike[str] | None = None, env: str = SECRET_ENV) -> bytes | None:
    """The shared secret from a file (whole contents, one trailing newline stripped) or else from
    the environment variable ``env``; None when neither is set. An empty secret is a ValueError."""
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
        if data.endswith(b"\n"):
            data = data[:-1]
    else:
        value = os.environ.get(env)
        if value is None:
            return None
        data = value.encode()
    if not data:
        raise ValueError("the shared secret is empty")
    return data


__all__ = ["SECRET_ENV", "load_secret"]
