"""The workload kinds of the conformance suite (tests/test_workload_conformance.py), each as a kit:
a workload of that kind with writers of its own, a count of the writes they made, and a way to
stop them. A new kind of workload gets a kit here and must pass the suite unchanged."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from livemig import _core
from livemig.attach import AttachListener, program
from livemig.guest import GuestConfig
from livemig.memory import Region
from livemig.workload import AttachedWorkload, BufferWorkload, ModelGuest, PauseGate, Workload
from livemig.workload.attached import LAUNCH_ENV

SIZE = 16 << 20


class Kit(Protocol):
    """A workload of one kind and its writers."""

    workload: Workload

    def writes(self) -> int:
        """Writes made so far (pages or stores: it only has to grow while the writers run)."""

    def close(self) -> None:
        """Stops the writers and the workload."""


class ModelKit:
    """The model guest: C++ writers at 20,000 pages/s with churn and a quarter of it free."""

    def __init__(self) -> None:
        self.workload = ModelGuest(SIZE, GuestConfig(workload="random", rate=20000, free_fraction=0.25,
                                                     churn=500, seed=5))

    def writes(self) -> int:
        return int(self.workload.guest.stats().pages_written)

    def close(self) -> None:
        self.workload.stop()


class BufferKit:
    """A user's buffer: a numpy array over an mmap, written by a Python thread through a PauseGate,
    tracked by the kernel (or, ``explicit``, by the writer's own marks)."""

    def __init__(self, tracking: str = "kernel") -> None:
        self.region = Region.allocate(SIZE, tracking="explicit" if tracking == "explicit" else "kernel")
        self.gate = PauseGate()
        self.words = np.frombuffer(self.region.buffer, dtype=np.uint64)
        self.workload = BufferWorkload(self.region, gate=self.gate, state=b"conformance")
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="buffer-writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        rng = np.random.default_rng(9)
        per_page = self.region.page_size // 8
        while not self._stop.is_set():
            pages = rng.integers(0, self.region.pages, 64)
            with self.gate.writing():
                self._count += 1
                self.words[pages * per_page] = self._count  # one store per page
                if self.region.tracking == "explicit":
                    self.region.mark_written_runs(np.stack([pages, np.ones_like(pages)], axis=1))
            self._stop.wait(0.001)

    def writes(self) -> int:
        return self._count

    def close(self) -> None:
        self._stop.set()
        self.gate.resume()
        self._thread.join(10)


class AttachKit:
    """Another process's memory: the example workload process (livemig-hashtable, two writer threads,
    hints on) attached as a source. A destination launches its own from LIVEMIG_ATTACH_EXEC. Its
    writes are counted from the outside: pages whose bytes changed between two looks."""

    ARGS = "--threads 2 --rate 20000 --free 0.3"

    def __init__(self) -> None:
        self._env = os.environ.get(LAUNCH_ENV)  # restored by close(): later tests start their own processes
        os.environ[LAUNCH_ENV] = f"{{hashtable}} --connect {{socket}} --role {{role}} --size {{size}} {self.ARGS}"
        self._dir = tempfile.TemporaryDirectory(prefix="livemig-kit-")
        path = os.path.join(self._dir.name, "attach.sock")
        with AttachListener(path) as lst:
            proc = subprocess.Popen([str(program()), "--connect", path, "--size", str(SIZE), *self.ARGS.split()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                conn = lst.accept(role="source", wait=10.0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        self.workload: AttachedWorkload = AttachedWorkload(conn, process=proc)
        self._last = _core.page_digests(self.workload.region.buffer, self.workload.region.page_size)
        self._count = 0

    def writes(self) -> int:
        now = _core.page_digests(self.workload.region.buffer, self.workload.region.page_size)
        self._count += int(np.count_nonzero(now != self._last))
        self._last = now
        return self._count

    def close(self) -> None:
        self.workload.stop()
        self._dir.cleanup()
        if self._env is None:
            os.environ.pop(LAUNCH_ENV, None)
        else:
            os.environ[LAUNCH_ENV] = self._env


KITS: dict[str, Callable[[], Kit]] = {
    "attach": AttachKit,
    "model-guest": ModelKit,
    "buffer": BufferKit,
    "buffer-explicit": lambda: BufferKit("explicit"),
}
