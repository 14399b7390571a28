"""What both QEMU comparisons share (``bench/compare_qemu.py``): the tools they need, QEMU's
monitor (QMP) and a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
GUEST_START = 1 << 20  #: the first page the guests write (below: BIOS data, their own code)


def missing_tools() -> str | None:
    """Why the comparison cannot run here (a tool it needs is not installed), or None."""
    for tool in (QEMU, "as", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (QEMU: Debian's qemu-system-x86; as/ld: binutils)"
    return None


class Qmp:
    """A QMP connection (JSON lines on a Unix socket): commands and their answers."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)  # polled: QEMU makes the socket when it is ready
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # the greeting
        self("qmp_capabilities")

    def __call__(self, command: str, **args: Any) -> Any:
        """Runs ``command``; its "return" value (RuntimeError on an error answer)."""
        self.file.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"QEMU closed its monitor during {command}")
            r = json.loads(line)
            if "error" in r:
                raise RuntimeError(f"QMP {command}: {r['error'].get('desc', r['error'])}")
            if "return" in r:
                return r["return"]

    def hmp(self, line: str) -> str:
        return str(self("human-monitor-command", **{"command-line": line}))

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    """A loopback TCP port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def await_migration(qmp: Qmp, end: float, each: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Polls ``query-migrate`` on the source's monitor until the migration ends, ``each`` seeing
    every answer first; returns the last answer. RuntimeError past ``end`` (time.monotonic()) or
    when it ended other than completed."""
    while True:
        info: dict[str, Any] = qmp("query-migrate")
        if each is not None:
            each(info)
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > end:
            raise RuntimeError("the QEMU migration did not complete in time")
        time.sleep(0.01)
    if info["status"] != "completed":
        raise RuntimeError(f"the QEMU migration ended {info['status']}: {info.get('error-desc', '')}")
    return info


__all__ = ["GUEST_START", "QEMU", "Qmp", "await_migration", "free_port", "missing_tools"]
