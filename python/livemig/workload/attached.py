"""Another process's memory as a workload (kind ``attach``, docs/attach.md): a VMM or a service that
keeps its state in a memfd, attached over a Unix socket, keeps running and keeps its memory where it
is. livemig reads (source) or writes (destination, before it runs) the pages through its own mapping
of the memfd, tracks and places through the process's userfaultfd and pagemap, and drives pause,
resume, device state, hints and the check as messages. Everything after the attach is the engine.

Source: :func:`attach_source` (or ``AttachedWorkload(listener.accept(role="source"))``).
Destination: :class:`AttachFactory`, which gets its process from a listener or launches one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.attach import AttachListener, end_process, launch
from livemig.errors import ConnectionLost, LivemigError, ProtocolError, WorkloadError
from livemig.memory import Region
from livemig.protocol import BALLOON_CMD_DONE
from livemig.workload.base import BalloonGuestStatus, CheckResult, kind_mismatch

KIND = "attach"
VERSION = 1
CAP_HINTS, CAP_CHECK = 1, 2  # livemig_attach_protocol.h
#: The environment variable naming the command a destination launches for an incoming ``attach``
#: workload when no process attached by itself (``{socket}``, ``{size}``, ``{role}``, ``{hashtable}``).
LAUNCH_ENV = "LIVEMIG_ATTACH_EXEC"
T = TypeVar("T")


class AttachedRegion(Region):
    """The process's region as livemig maps it: read-only on a source, read-write on a destination
    (before it runs). :attr:`kernel_address` and :attr:`pagemap_path` are the process's."""

    prefaultable = False

    def __init__(self, conn: _core.AttachConnection) -> None:
        self.connection = conn
        self.mapping = conn.map_region()
        view = memoryview(self.mapping)
        self._owner = self.mapping
        self._views = (view,)
        self._view = view
        self._array = np.frombuffer(view, dtype=np.uint8)
        self.page_size = int(conn.page_size)
        self.nbytes = int(conn.nbytes)
        self.pages = self.nbytes // self.page_size
        self.tracking = "kernel"
        self.address = int(self.mapping.address)
        self._tracker = None
        self.dest_engine: _core.DestRegion | None = None  #: the engine placing into it (a destination)
        self.pid = int(conn.pid)

    @property
    def pagemap_path(self) -> str:
        return f"/proc/{self.pid}/pagemap"

    @property
    def kernel_address(self) -> int:
        return int(self.connection.address)

    def page_digests(self) -> npt.NDArray[np.uint64]:
        # Without reading the memfd's holes: a read through the mapping would allocate them.
        return _core.attached_page_digests(self.connection, self.mapping)

    def _source_engine(self) -> _core.Source:
        return _core.attached_source(self.connection, self.mapping)

    def _dest_engine(self) -> _core.DestRegion:
        self.dest_engine = _core.attached_dest_region(self.connection, self.mapping)
        return self.dest_engine

    def __repr__(self) -> str:
        return (f"AttachedRegion({self.nbytes} bytes of pid {self.pid} at 0x{self.kernel_address:x},"
                f" mapped at 0x{self.address:x})")


class _Balloon:
    """The process's balloon driver, through livemig: the device is livemig's; notify() sends the
    command id as BALLOON; the process's HINTS are applied to the device as they arrive."""

    def __init__(self, w: AttachedWorkload) -> None:
        self._w = w
        self._device = _core.LocalBalloonDevice(w.region.pages)
        self.sent_id = 0
        # No round ever sent: the process holds nothing back, as after DONE.
        self.done_sent = True

    @property
    def device(self) -> _core.BalloonDevice:
        return self._device

    def notify(self) -> None:
        cmd = int(self._device.cmd_id)
        if cmd == self.sent_id:
            return
        with contextlib.suppress(LivemigError):  # a process gone: the migration sees it elsewhere
            self._w._call(lambda c: c.balloon(cmd))
            self.sent_id = cmd
            if cmd == BALLOON_CMD_DONE:
                self.done_sent = True
            elif cmd >= 0x80000000:  # a round: DONE is due again
                self.done_sent = False

    def status(self) -> BalloonGuestStatus:
        # What livemig knows from the messages: the id delivered last, DONE delivered since the last
        # round (a stream socket delivers in order), and pages hinted since the last DONE.
        held = 0 if self.sent_id == BALLOON_CMD_DONE else int(self._device.hinted_since_done().count())
        return BalloonGuestStatus(last_cmd_id=self.sent_id, done_seen=self.done_sent, pages_held=held)


class AttachedWorkload:
    """An attached process's memory. ``process``: the process when livemig launched it; ``end``:
    :meth:`stop` ends it too (else, like a process that attached by itself, it is detached and runs
    on: a migrated destination resumed, a source as the attach protocol leaves it)."""

    kind = KIND
    version = VERSION

    def __init__(self, conn: _core.AttachConnection, *, region: AttachedRegion | None = None,
                 process: subprocess.Popen[bytes] | None = None, end: bool = True,
                 request_timeout: float = 10.0) -> None:
        if region is not None and region.connection is not conn:
            raise ValueError("the region is another attachment's")
        self.connection = conn
        self.process = process
        self.end = end and process is not None
        self.request_timeout = request_timeout
        # A destination's region is the one its engine places into (the factory's): a second mapping
        # would be a second view of the same memfd, and only the first knows the engine's state.
        self._region = region if region is not None else AttachedRegion(conn)
        self.role: str = conn.role
        self.name: str = conn.name
        self.pid: int = int(conn.pid)
        self._lock = threading.Lock()
        self.lost: str | None = None  #: why the attachment ended (the process died, detached, ...)
        self.resumed_by_lease = False
        self._balloon = _Balloon(self) if conn.capabilities & CAP_HINTS else None
        self.started = False  # a destination: its first RESUME was sent
        self.completed = False  # a destination: COMPLETE answered
        self._stop = threading.Event()
        self._ended = threading.Event()  # set with lost
        self._pump = threading.Thread(target=self._pump_events, name=f"livemig-attach-{self.pid}", daemon=True)
        self._pump.start()

    # ---- the conversation: one request at a time, events applied as they come ----
    def _call(self, fn: Callable[[_core.AttachConnection], T]) -> T:
        if self.lost is not None:
            raise ConnectionLost(f"the attached process {self.describe()} is gone: {self.lost}")
        with self._lock:
            try:
                out = fn(self.connection)
            except (ConnectionLost, ProtocolError) as e:
                self.lost = str(e)
                self._ended.set()
                raise type(e)(f"the attached process {self.describe()}: {e}") from e
            self._drain_events()
        return out

    def _drain_events(self) -> None:
        """Applies the HINTS and RESUMED that arrived (the lock held)."""
        while (ev := self.connection.next_event(0.0)) is not None:
            if ev.type == "hints" and self._balloon is not None:
                _core.apply_attach_hints(self._balloon.device, ev)
            elif ev.type == "resumed":
                self.resumed_by_lease = True

    def _pump_events(self) -> None:
        """Waits for the process's own messages while nothing else talks to it; notices its end."""
        while not self._stop.is_set() and self.lost is None:
            fd = self.connection.socket
            if fd < 0:
                return
            try:
                ready, _, _ = select.select([fd], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready or self._stop.is_set():
                continue
            with self._lock:
                try:
                    self._drain_events()
                except (ConnectionLost, ProtocolError) as e:
                    self.lost = str(e)
                    self._ended.set()

    def gone(self, wait: float) -> str | None:
        """Why the process is gone (it died, detached or broke the protocol), waiting up to ``wait``
        seconds for its connection to tell; None while it is there."""
        self._ended.wait(wait)
        return None if self.lost is None else f"the attached process {self.describe()} is gone: {self.lost}"

    def _check_reply(self, what: str, r: _core.AttachReply) -> None:
        if not r.ok:
            raise WorkloadError(f"the attached process {self.describe()} refused {what}: "
                                f"{r.text or os.strerror(r.status)}")

    def describe(self) -> str:
        """``name (pid N)``."""
        return f"{self.name or '?'} (pid {self.pid})"

    # ---- the workload protocol ----
    @property
    def region(self) -> AttachedRegion:
        return self._region

    @property
    def balloon(self) -> _Balloon | None:
        return self._balloon

    def start(self) -> None:
        if self.role == "source" or self.started:
            return
        engine = self._region.dest_engine
        if engine is None or engine.state == "precopy":
            # Every page is in the memfd: the process's memory is ordinary now. (Postcopy: COMPLETE
            # once the last page is placed, memory_complete(); until then its faults come to livemig.)
            self.memory_complete()
        self._check_reply("RESUME", self._call(lambda c: c.resume(self.request_timeout)))
        self.started = True

    def memory_complete(self) -> None:
        """A destination: every page the process may read is in (COMPLETE: it unregisters its
        userfaultfd). Called by the migration once the last page is placed; idempotent."""
        if self.role != "destination" or self.completed:
            return
        self._check_reply("COMPLETE", self._call(lambda c: c.complete(self.request_timeout)))
        self.completed = True

    def pause(self, timeout: float) -> None:
        try:
            r = self._call(lambda c: c.pause(0, timeout))
        except ConnectionLost as e:
            raise WorkloadError(f"the attached process {self.describe()} did not pause: {e}") from e
        self._check_reply("to pause", r)

    def resume(self) -> None:
        if self.lost is not None:
            return  # nothing left to resume: the process restored itself (or is gone)
        if self.role == "destination" and not self.started:
            return  # a destination runs only once its memory is here (start)
        with contextlib.suppress(ConnectionLost, ProtocolError):
            self._check_reply("RESUME", self._call(lambda c: c.resume(self.request_timeout)))

    def stop(self) -> None:
        if self._stop.is_set():
            return
        if self.lost is None:
            with contextlib.suppress(LivemigError):
                if self.role == "destination" and self.started and not self.end:
                    self.resume()  # a migrated destination runs on, its own now
                self._call(lambda c: c.detach(self.request_timeout))  # it restores its memory (docs/attach.md)
        self._stop.set()
        self.connection.close()
        self._pump.join(5.0)
        self.connection.release()  # its descriptors (the engines keep duplicates while they live)
        if self.end:
            end_process(self.process)  # it checks itself and exits

    def export_state(self) -> bytes:
        state = bytes(self._call(lambda c: c.save_state(self.request_timeout)))
        if self.role == "source":
            # From here on the workload may run elsewhere: a process that loses livemig now stays
            # paused (rule 11). RESUME undoes it if the migration is cancelled after all.
            self._check_reply("HANDOFF", self._call(lambda c: c.handoff(self.request_timeout)))
        return state

    def load_state(self, state: bytes) -> None:
        """A destination, before it runs: its device state."""
        self._check_reply("LOAD_STATE", self._call(lambda c: c.load_state(state, self.request_timeout)))

    def check(self) -> CheckResult | None:
        if not self.connection.capabilities & CAP_CHECK:
            return None
        c = self._call(lambda c: c.check(self.request_timeout))
        return CheckResult(ok=c.failures == 0, pages_checked=int(c.items), mismatches=int(c.failures),
                           detail="" if c.failures == 0 else c.text)

    def stats(self) -> dict[str, int | float]:
        return {"pid": self.pid, "bytes": self._region.nbytes}

    def info(self) -> dict[str, object]:
        """What the reports name: the process and its memory."""
        return {"pid": self.pid, "name": self.name, "role": self.role,
                "memfd": self.connection.memfd_path, "bytes": self._region.nbytes}


def attach_source(path: str | os.PathLike[str], *, wait: float | None = 30.0, timeout: float = 5.0) -> AttachedWorkload:
    """Listens at ``path`` until one workload process attaches as a source (``wait`` s), validates it
    and returns it as a workload; the socket file is removed again."""
    with AttachListener(path) as lst:
        return AttachedWorkload(lst.accept(role="source", wait=wait, timeout=timeout))


class AttachFactory:
    """Hosts ``attach`` workloads on a destination: the incoming memory goes straight into a
    destination process's memfd. The process attaches at ``socket`` by itself, or is launched from
    ``launch_command`` (default, without a socket: the environment's :data:`LAUNCH_ENV`) for each
    migration.
    ``wait``: how long to wait for it; ``end_launched``: a launched process ends with the workload's
    stop() (else it runs on, detached, like one that attached by itself)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, launch_command: str | None = None,
                 wait: float = 30.0, timeout: float = 5.0, end_launched: bool = True) -> None:
        self.socket = None if socket is None else os.fspath(socket)
        # The environment names a command only for a factory without a socket (the standard one):
        # a process expected at a socket is not replaced by one the environment starts.
        self.launch_command = (launch_command if launch_command is not None or socket is not None
                               else os.environ.get(LAUNCH_ENV))
        self.wait, self.timeout, self.end_launched = wait, timeout, end_launched
        self._listener: AttachListener | None = AttachListener(self.socket) if self.socket is not None else None
        self._pending: tuple[AttachedRegion, subprocess.Popen[bytes] | None, _core.AttachConnection] | None = None
        # A process that attaches by itself is accepted as soon as it connects (its own handshake
        # has a deadline), and kept until a migration comes.
        self._early: queue.Queue[_core.AttachConnection | LivemigError] = queue.Queue()
        self._closed = threading.Event()
        self._acceptor: threading.Thread | None = None
        if self._listener is not None and self.launch_command is None:
            self._start_acceptor()

    def _start_acceptor(self) -> None:
        self._acceptor = threading.Thread(target=self._accept_early, name="livemig-attach-accept", daemon=True)
        self._acceptor.start()

    def _accept_early(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            if not self._listener.ready(0.1):
                continue
            try:
                self._early.put(self._listener.accept(role="destination", wait=0.0, timeout=self.timeout))
            except LivemigError as e:  # refused: the process was told why; the migration is too
                self._early.put(e)
            return

    def close(self) -> None:
        """Stops listening (a process that attached and was never used is let go)."""
        self._closed.set()
        if self._acceptor is not None:
            self._acceptor.join(5.0)
        while not self._early.empty():
            got = self._early.get_nowait()
            if not isinstance(got, LivemigError):
                got.close()
        if self._pending is not None:
            _, proc, conn = self._pending
            conn.close()
            end_process(proc)
            self._pending = None
        if self._listener is not None:
            self._listener.close()

    def _attach(self, nbytes: int) -> tuple[_core.AttachConnection, subprocess.Popen[bytes] | None]:
        if self._listener is not None and self.launch_command is None:
            try:
                got = self._early.get(timeout=self.wait)
            except queue.Empty:
                raise ConnectionLost(f"no destination process attached at {self.socket} within"
                                     f" {self.wait:g} s") from None
            self._start_acceptor()  # the next migration's process
            if isinstance(got, LivemigError):
                raise got
            if got.nbytes != nbytes:
                got.close()
                raise WorkloadError(f"the destination process at {self.socket} has {got.nbytes} bytes;"
                                    f" the source sends {nbytes}")
            return got, None
        if self.launch_command is None:
            raise WorkloadError(f"no destination process for an {KIND!r} workload: give this destination an attach"
                                f" socket (livemig listen --attach) or a command to launch (--attach-exec,"
                                f" or ${LAUNCH_ENV})")
        own = self._listener is None
        lst = self._listener or AttachListener(f"/tmp/livemig-attach-{os.getpid()}-{time.monotonic_ns()}.sock")
        try:
            proc = launch(self.launch_command, socket_path=lst.path, size=nbytes, role="destination")
            try:
                return lst.accept(role="destination", expect_len=nbytes, wait=self.wait, timeout=self.timeout), proc
            except BaseException:
                end_process(proc)
                raise
        finally:
            if own:
                lst.close()

    # ---- the factory protocol ----
    def memory(self, nbytes: int, page_size: int) -> Region | None:
        conn, proc = self._attach(nbytes)
        region = AttachedRegion(conn)
        self._pending = (region, proc, conn)
        return region

    def prepare(self, region: Region) -> None:
        pass

    def accepts(self, kind: str, version: int) -> str | None:
        return kind_mismatch(kind, version, KIND, VERSION)

    def build(self, kind: str, version: int, region: Region, state: bytes) -> AttachedWorkload:
        why = self.accepts(kind, version)
        if why is not None:
            raise WorkloadError(why)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is region:
            mine, proc, conn = pending
        else:
            # Memory that is not a process's (livemig's own region, a test): a process of its own,
            # filled from it before it runs. In postcopy, reading livemig's region faults every page
            # still on its way in through livemig's own fault path first (the process then starts
            # with all of them: correct, without postcopy's early start).
            if pending is not None:
                pending[2].close()
                end_process(pending[1])
            conn, proc = self._attach(region.nbytes)
            mine = None
        w = AttachedWorkload(conn, region=mine, process=proc, end=self.end_launched)
        try:
            if w.region is not region:
                w.region.array[:] = region.array  # before it runs: straight into its memfd
            w.load_state(state)
        except BaseException:
            w.stop()
            raise
        return w


@contextlib.contextmanager
def attached(path: str | os.PathLike[str], **kw: float) -> Iterator[AttachedWorkload]:
    """``with attached(path) as w:`` a source attachment, stopped (detached) at the end."""
    w = attach_source(path, **kw)
    try:
        yield w
    finally:
        w.stop()


__all__ = ["KIND", "LAUNCH_ENV", "VERSION", "AttachFactory", "AttachedRegion", "AttachedWorkload", "attach_source",
           "attached"]
