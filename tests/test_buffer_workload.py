"""A user's own memory migrated live: a numpy array over an mmap that a Python thread keeps
updating, moved precopy and postcopy to a destination that hands it back as a buffer (through
``serve()`` or ``livemig listen``); and every way a user can hand it the wrong thing, each a clear
error with the source's memory intact."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import livemig
from livemig import wire
from livemig.errors import WorkloadError
from livemig.loopback import migrate_locally
from livemig.memory import Region
from livemig.migration import MigrationConfig, MigrationFailed, migrate
from livemig.workload import BufferFactory, BufferWorkload, CheckResult, PauseGate, StandardFactory

from guest_helpers import wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kernel_tracking")]

SIZE = 16 << 20


class Simulation:
    """The README's user: a float64 array over an mmap, updated by a Python thread in bursts through
    a PauseGate, step after step; ``steps`` counts them."""

    def __init__(self) -> None:
        self.memory = livemig.memory.allocate(SIZE)
        self.data = np.frombuffer(self.memory, dtype=np.float64)
        self.gate = PauseGate()
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = len(self.data)
        while not self._stop.is_set():
            with self.gate.writing():
                k = self.steps % 64
                self.data[k * (n // 64):(k + 1) * (n // 64):509] += 1.0  # a strided slice of a 64th
                self.steps += 1
            self._stop.wait(0.0005)

    def close(self) -> None:
        self._stop.set()
        self.gate.resume()
        self._thread.join(10)
        del self.data


@pytest.fixture
def sim() -> Iterator[Simulation]:
    s = Simulation()
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_a_numpy_array_a_thread_keeps_updating_arrives_exactly(sim: Simulation, postcopy: bool,
                                                                request: pytest.FixtureRequest) -> None:
    if postcopy:
        request.getfixturevalue("postcopy")
    wait_until(lambda: sim.steps > 20, what="the simulation's first steps")
    workload = BufferWorkload(sim.memory, gate=sim.gate, state=b"step counter lives here")
    result, dest = migrate_locally(workload, MigrationConfig(postcopy=postcopy, verify=True), settle_s=0.2)
    assert result.ok, (result.error, result.verify)
    v = result.verify
    # The generic oracle: every page of the destination equals the source's as the workload paused.
    assert v is not None and v.digests and v.pages_checked == SIZE // mmap.PAGESIZE and v.excepted == 0
    assert (v.mismatches, v.placed_twice, v.missing) == (0, 0, 0)
    assert dest["workload_kind"] == "buffer" and result.workload.kind == "buffer"
    # After success the source stays paused: its copy is stale, the destination's is live.
    steps = sim.steps
    assert sim.gate.paused
    time.sleep(0.02)  # an observation window: a writer let through would have stepped by now
    assert sim.steps == steps


def _listen(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "livemig", "listen", "127.0.0.1:0", "--once", "--announce",
                             "--json", "--quiet", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_the_same_through_livemig_listen(sim: Simulation, postcopy: bool, request: pytest.FixtureRequest) -> None:
    if postcopy:
        request.getfixturevalue("postcopy")
    proc = _listen()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on "), line
        workload = BufferWorkload(sim.memory, gate=sim.gate)
        result = migrate(line.removeprefix("listening on "), workload, MigrationConfig(postcopy=postcopy, verify=True))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result.ok and result.verify is not None and result.verify.digests and result.verify.mismatches == 0
    summary = json.loads(out)
    assert (summary["ok"], summary["workload_kind"], summary["mode"]) == (True, "buffer", result.mode), err


def test_the_destination_gets_a_buffer_and_the_state_in_process(sim: Simulation) -> None:
    """``serve()`` hands the received memory back as a buffer workload the caller's code takes over."""
    wait_until(lambda: sim.steps > 5, what="steps")
    got: list[Any] = []
    with wire.Listener("127.0.0.1:0") as lst:
        t = threading.Thread(target=lambda: got.append(livemig.serve(lst, wait=30, factory=BufferFactory())))
        t.start()
        # serve() runs in this process here; the destination never faults (precopy), so it may.
        result = migrate(str(lst.address), BufferWorkload(sim.memory, gate=sim.gate, state=lambda: b"at step %d" % sim.steps),
                         MigrationConfig(verify=True))
        t.join(30)
    assert result.ok and got and got[0].ok
    arrived = got[0].workload
    assert isinstance(arrived, BufferWorkload) and arrived.state == b"at step %d" % sim.steps
    assert np.array_equal(arrived.array, np.frombuffer(sim.memory, dtype=np.uint8))
    data = np.frombuffer(arrived.array, dtype=np.float64)  # the user's view of it
    assert data.sum() == np.frombuffer(sim.memory, dtype=np.float64).sum() > 0


def _explicit_run(mark: bool) -> tuple[Any, Region, list[int]]:
    """An explicit-tracking buffer with a writer marking what it writes while the migration runs;
    as the workload pauses (after the first round sent every page) 100 more pages are written, marked
    only when ``mark`` (pages the writer never touches, so only those marks can resend them).
    Returns the source's result, the region and those pages."""
    region = Region.allocate(SIZE, tracking="explicit")
    words = np.frombuffer(region.buffer, dtype=np.uint64)
    per_page = region.page_size // 8
    gate = PauseGate()
    stop = threading.Event()
    half = region.pages // 2
    late = [half + (k * 37 + 5) % half for k in range(100)]  # the upper half: the writer's are below

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with gate.writing():
                page = (i * 7919) % half
                words[page * per_page] = i
                region.mark_written(page)
                i += 1
            stop.wait(0.0002)

    def pause_writers() -> None:
        assert gate.pause(5.0)
        for k, page in enumerate(late):  # the writers' last stores before they stop
            words[page * per_page + 1] = 0xC0FFEE00 + k
            if mark:
                region.mark_written(page)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_until(lambda: int(words.max()) > 100, what="the writer's first marks")
        workload = BufferWorkload(region, pause=pause_writers, resume=gate.resume)
        result, _ = migrate_locally(workload, MigrationConfig(verify=True))
    finally:
        stop.set()
        gate.resume()
        t.join(10)
    return result, region, late


def test_explicit_tracking_sends_what_the_writer_marks(sim: Simulation) -> None:
    result, region, late = _explicit_run(mark=True)
    assert result.ok and result.verify is not None and result.verify.digests and result.verify.mismatches == 0
    # The 100 pages written at the pause went again after the first round sent every page.
    assert result.pages_sent + result.zero_pages >= region.pages + len(late)


def test_explicit_tracking_misses_what_the_writer_does_not_mark(sim: Simulation) -> None:
    """The same run with the late stores unmarked: the destination keeps the old bytes of exactly
    those pages, and the generic oracle names them (explicit tracking sees only marks)."""
    result, _, late = _explicit_run(mark=False)
    assert result.verify is not None and result.verify.digests
    assert not result.ok
    assert result.verify.mismatches == len(late)
    assert set(result.verify.first_mismatches) <= set(late)


# ---- bad input: one clear error each, the source's memory untouched ----


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: np.zeros(SIZE + 1, np.uint8)[1:], ValueError, "page boundary"),
    (lambda: bytes(SIZE), ValueError, "read-only"),
    (lambda: np.frombuffer(livemig.memory.allocate(2 * SIZE), np.uint8)[::2], ValueError, "not contiguous"),
    (lambda: bytearray(), ValueError, "positive multiple of the page size"),
    (lambda: bytearray(mmap.PAGESIZE + 1), ValueError, "positive multiple of the page size"),
    (lambda: 12345, TypeError, "needs a buffer"),
])
def test_a_buffer_livemig_cannot_use_is_refused_with_the_reason(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BufferWorkload(make())


def test_the_buffer_cannot_be_freed_while_a_migration_holds_it() -> None:
    m = livemig.memory.allocate(SIZE)
    w = BufferWorkload(m)
    with pytest.raises(BufferError):
        m.close()  # the region holds it exported: the memory stays where the engine reads it
    with pytest.raises(BufferError):
        m.resize(2 * SIZE)
    w.region.release()
    m.close()  # once let go, it is the user's to free


def test_a_pause_that_never_returns_fails_in_bounded_time_and_the_writers_run_on(sim: Simulation) -> None:
    stuck = threading.Event()
    resumed = threading.Event()
    w = BufferWorkload(sim.memory, pause=stuck.wait, resume=resumed.set)
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match=r"switchover: the buffer workload's pause\(\) did not return within 1 s"):
        migrate_locally(w, MigrationConfig(pause_timeout_s=1.0))
    assert time.monotonic() - t0 < 30
    assert resumed.is_set()  # the source's resume was called: its writers run on
    stuck.set()
    steps = sim.steps
    wait_until(lambda: sim.steps > steps, what="the simulation stepping on")


def test_a_pause_callable_that_raises_is_one_clear_error(sim: Simulation) -> None:
    def broken() -> None:
        raise RuntimeError("the writers' lock is poisoned")

    w = BufferWorkload(sim.memory, pause=broken, resume=lambda: None)
    with pytest.raises(MigrationFailed, match="pause\\(\\) raised RuntimeError: the writers' lock is poisoned"):
        migrate_locally(w, MigrationConfig())


class MysteryWorkload(BufferWorkload):
    """A buffer workload that says it is of a kind no destination knows."""

    kind = "mystery"


class NewerBufferWorkload(BufferWorkload):
    """A buffer workload whose state format is newer than this build reads."""

    version = 99


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
@pytest.mark.parametrize(("cls", "why"), [(MysteryWorkload, "not 'mystery'"), (NewerBufferWorkload, "version 99")])
def test_a_kind_the_destination_cannot_host_is_refused_and_the_source_runs_on(
        sim: Simulation, cls: type[BufferWorkload], why: str, postcopy: bool, request: pytest.FixtureRequest) -> None:
    if postcopy:
        request.getfixturevalue("postcopy")
    w = cls(sim.memory, gate=sim.gate)
    with pytest.raises(MigrationFailed, match=f"cannot host the source's workload.*{why}") as ei:
        migrate_locally(w, MigrationConfig(postcopy=postcopy, verify=True))
    report = ei.value.source_workload
    assert report is not None and report.running and not sim.gate.paused
    steps = sim.steps
    wait_until(lambda: sim.steps > steps, what="the simulation stepping on")


class RaisingFactory(StandardFactory):
    """A destination factory whose build raises (a user's bug)."""

    def build(self, kind: str, version: int, region: Region, state: bytes) -> Any:
        raise KeyError("no slot for this tenant")


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_a_factory_that_raises_fails_the_migration_and_the_source_runs_on(
        sim: Simulation, postcopy: bool, request: pytest.FixtureRequest) -> None:
    if postcopy:
        request.getfixturevalue("postcopy")
    w = BufferWorkload(sim.memory, gate=sim.gate)
    with pytest.raises(MigrationFailed, match="could not rebuild the 'buffer' workload: KeyError") as ei:
        migrate_locally(w, MigrationConfig(postcopy=postcopy), factory=RaisingFactory)
    report = ei.value.source_workload
    assert report is not None and report.running and not sim.gate.paused


def test_a_check_callable_is_the_second_oracle(sim: Simulation) -> None:
    def check() -> CheckResult:
        return CheckResult(ok=True, pages_checked=SIZE // mmap.PAGESIZE)

    w = BufferWorkload(sim.memory, gate=sim.gate, check=check)
    assert w.check() == CheckResult(ok=True, pages_checked=SIZE // mmap.PAGESIZE)
    assert BufferWorkload(sim.memory, check=lambda: False).check() == CheckResult(ok=False, detail="the user's check failed")


def test_workload_arguments_are_checked() -> None:
    m = livemig.memory.allocate(SIZE)
    with pytest.raises(ValueError, match="both pause and resume"):
        BufferWorkload(m, pause=lambda: None)
    with pytest.raises(ValueError, match="not both"):
        BufferWorkload(m, pause=lambda: None, resume=lambda: None, gate=PauseGate())
    with pytest.raises(TypeError, match="state must be bytes"):
        BufferWorkload(m, state="text")  # type: ignore[arg-type]
    with pytest.raises(WorkloadError, match="returned str, not bytes"):
        BufferWorkload(m, state=lambda: "text").export_state()  # type: ignore[arg-type,return-value]
