"""Helpers for the attach tests: the example workload process (livemig-hashtable) and livemig's CLI
as real processes, each with a deadline, status lines read from a pipe."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from livemig.attach import program

from cli_helpers import LIVEMIG

HASHTABLE_ARGS = ("--threads", "2", "--rate", "20000", "--free", "0.3")


class Proc:
    """A child process with its stdout read line by line (with deadlines) and its stderr kept."""

    def __init__(self, argv: Sequence[str], *, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.argv = [*prefix, *argv]
        self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._buf = b""

    def line(self, prefix: str, deadline_s: float = 30.0) -> str:
        """The next stdout line starting with ``prefix`` (AssertionError after the deadline or EOF).
        Reads the pipe's descriptor itself: a buffered reader could hold lines select() never sees."""
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        end = time.monotonic() + deadline_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buf:
                    ln, _, self._buf = self._buf.partition(b"\n")
                    text = ln.decode(errors="replace")
                    self.lines.append(text)
                    if text.startswith(prefix):
                        return text
                left = end - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buf += chunk
        raise AssertionError(f"no {prefix!r} line from {self.argv[0]} within {deadline_s} s; saw {self.lines},"
                             f" stderr: {self.stderr_now()}")

    def stderr_now(self) -> str:
        if self.p.poll() is None or self.p.stderr is None or self.p.stderr.closed:
            return "(running)"
        return self.p.stderr.read()

    def wait(self, deadline_s: float = 30.0) -> int:
        """Its exit code; killed (and the test failed) after the deadline."""
        try:
            return self.p.wait(deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv} did not exit within {deadline_s} s") from None

    def rest(self, deadline_s: float = 30.0) -> tuple[int, str, str]:
        """Waits for it to exit; (code, rest of stdout, stderr)."""
        try:
            out, err = self.p.communicate(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv} did not exit within {deadline_s} s") from None
        rest = self._buf.decode(errors="replace") + out
        return self.p.returncode, "\n".join([*self.lines, rest]), err

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, sig)

    def kill(self) -> None:
        """Kills it if it runs, and closes its pipes."""
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            if f is not None and not f.closed:
                f.close()


def hashtable(sock: str | Path, *args: str, role: str = "source", size: str = "16M",
              netns: str | None = None) -> Proc:
    """The example workload process attaching at ``sock``."""
    return Proc([str(program()), "--connect", str(sock), "--role", role, "--size", size, *HASHTABLE_ARGS, *args],
                netns=netns)


def livemig(*args: str, netns: str | None = None) -> Proc:
    return Proc([*LIVEMIG, *args], netns=netns)


def wait_for_socket(path: str | Path, proc: Proc, deadline_s: float = 30.0) -> None:
    """Until livemig made its attach socket (it exists before livemig waits on it)."""
    end = time.monotonic() + deadline_s
    while not Path(path).is_socket():
        if proc.p.poll() is not None:
            raise AssertionError(f"livemig exited ({proc.p.returncode}) before listening at {path}:"
                                 f" {proc.stderr_now()}")
        if time.monotonic() > end:
            raise AssertionError(f"no socket at {path} within {deadline_s} s")
        time.sleep(0.02)  # polling a path another process creates: no event to wait on


@contextmanager
def reaped(*procs: Proc) -> Iterator[None]:
    """Kills whatever is still running at the end."""
    try:
        yield
    finally:
        for p in procs:
            p.kill()


def open_fds(pid: int) -> list[str]:
    """What a process has open (readlink of /proc/PID/fd/*)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


#: Starts a workload process attaching at a socket: (socket, role, netns) -> the process.
Starter = Callable[[Path, str, "str | None"], Proc]


def hashtable_starter(sock: Path, role: str, netns: str | None) -> Proc:
    return hashtable(sock, role=role, netns=netns)


def migrate_pair(tmp: Path, *extra: str, netns: tuple[str, str] | None = None, dest_ip: str = "127.0.0.1",
                 secret: Path | None = None, start: Starter = hashtable_starter,
                 to: Callable[[str], str] | None = None) -> tuple[dict[str, Any], dict[str, Any], Proc, Proc]:
    """``livemig listen --attach`` with a destination process, ``livemig migrate --attach`` with a
    source process (``start`` makes them; ``to`` may reroute the destination's address, e.g. through
    a relay); returns (source JSON, destination JSON, source process, destination process), the
    destination process still running."""
    ssock, dsock = tmp / "src.sock", tmp / "dst.sock"
    sec = ["--secret-file", str(secret)] if secret else []
    src_ns, dst_ns = netns if netns else (None, None)
    listen = livemig("listen", f"{dest_ip}:0", "--once", "--announce", "--json", "--quiet", "--no-progress",
                     "--timeout", "20", "--attach", str(dsock), *sec, netns=dst_ns)
    with reaped_on_error([listen]) as procs:
        address = listen.line("listening on ").removeprefix("listening on ")
        wait_for_socket(dsock, listen)
        dst = start(dsock, "destination", dst_ns)
        procs.append(dst)
        assert "role=destination" in dst.line("ready ")
        mig = livemig("migrate", "--attach", str(ssock), "--to", to(address) if to else address, "--verify", "--json",
                      "--quiet", "--no-progress", "--timeout", "20", *sec, *extra, netns=src_ns)
        procs.append(mig)
        wait_for_socket(ssock, mig)
        src = start(ssock, "source", src_ns)
        procs.append(src)
        assert "role=source" in src.line("ready ")
        code, out, err = mig.rest(60)
        assert code == 0 and "Traceback" not in err, (out[-3000:], err, listen.stderr_now())
        source = json.loads(out.strip().splitlines()[-1])
        lcode, lout, lerr = listen.rest(30)
        assert lcode == 0, lerr
        dest = json.loads(lout.strip().splitlines()[-1])
    return source, dest, src, dst


@contextmanager
def reaped_on_error(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Kills the processes in ``procs`` if the block fails; on success they are the caller's."""
    try:
        yield procs
    except BaseException:
        for p in procs:
            p.kill()
        raise
