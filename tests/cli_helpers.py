"""Shared helpers for the CLI tests: run ``livemig`` as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping

LIVEMIG = [sys.executable, "-m", "livemig"]


def run(*args: str, timeout: float = 60, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``livemig ARGS`` to completion (stdin closed), output captured as text."""
    return subprocess.run(
        [*LIVEMIG, *args], check=False, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, env=None if env is None else {**os.environ, **env},
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single ``livemig: error:`` line of a failed run; asserts it is the only stderr line
    and that no traceback was printed."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("livemig: error: "), r.stderr
    return lines[0]


def free_port() -> int:
    """A loopback TCP port nobody listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

