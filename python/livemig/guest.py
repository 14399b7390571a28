"""The guest model: C++ threads that use a memory region like a VM's guest uses its RAM.

Python configures and observes; the writer threads, the page allocator and the balloon driver run
in C++ and never take the GIL, so they may fault on userfaultfd-registered memory. See
cpp/include/livemig/guest.hpp for the page format and the threading rules.
"""

from __future__ import annotations

import mmap
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # typing_extensions is not a runtime dependency
    from typing_extensions import Buffer, Self

from livemig import _core
from livemig._core import BalloonPort, LocalBalloonDevice

Workload = Literal["idle", "increment", "random", "hotset"]
FillMode = Literal["pattern", "zero"]
#: A guest region or a state: anything exporting a contiguous buffer (writable for regions).
RegionLike: TypeAlias = "Buffer | npt.NDArray[Any]"

#: Values of Guest.page_states().
PAGE_ALLOCATED = 0
PAGE_FREE = 1
PAGE_HELD = 2

#: Balloon command ids (DESIGN.md "Free page hinting").
CMD_STOP = 0
CMD_DONE = 1
CMD_FIRST = 0x80000001


def next_round_id(cmd_id: int) -> int:
    """The round id after ``cmd_id``: 0x80000001 after STOP/DONE, 0xFFFFFFFF wraps to 0x80000000."""
    return int(LocalBalloonDevice.next_round_id(cmd_id))


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does. Rates are pages per second over all writer threads."""

    workload: Workload = "idle"
    page_size: int = mmap.PAGESIZE
    rate: float = 0.0  #: workload pages/s; 0 = as fast as one thread can
    free_fraction: float = 0.0  #: share of the region in the free pool at start
    churn: float = 0.0  #: pages allocated+written and freed per second
    hotset_pages: int = 64  #: hot range per writer thread (hotset)
    hot_fraction: float = 0.9  #: share of hotset writes that hit the hot range
    seed: int = 1
    fill: FillMode = (
        "pattern"  #: "pattern": generation 0 in every page; "zero": keep the region zero
    )
    threads: int = 1  #: writer threads (increment always uses one)
    poll_interval_us: int = 1000  #: how often the balloon driver looks at the command id
    hint_reserve: float = 0.0  #: share of the free pool the balloon driver leaves unhinted


@dataclass(frozen=True)
class GuestStats:
    """Counters of a guest (carried across export/import)."""

    pages_written: int
    passes: int
    allocations: int
    frees: int
    alloc_failures: int
    rounds: int
    hints_sent: int
    pages_hinted: int
    hints_dropped: int
    pages_held: int
    done_seen: int
    last_cmd_id: int
    free_pages: int
    allocated_pages: int


@dataclass(frozen=True)
class Mismatch:
    """A page that does not hold what the guest last wrote there."""

    page: int
    kind: str  #: misplaced, generation, torn, zero, nonzero, counter
    found_generation: int
    expected_generation: int


@dataclass(frozen=True)
class VerifyResult:
    """Result of Guest.verify(); free and held pages are excepted."""

    pages_checked: int
    pages_excepted: int
    mismatches: int
    first_mismatches: tuple[Mismatch, ...]

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


@dataclass(frozen=True)
class IncrementCheck:
    """Result of the increment oracle."""

    ok: bool
    pages_checked: int
    value: int  #: byte 0 of the first checked page
    break_page: int | None  #: the page one lower than its predecessor, if any
    bad_pages: tuple[int, ...]


def _increment_check(d: dict[str, Any]) -> IncrementCheck:
    brk = d["break_page"]
    return IncrementCheck(
        ok=bool(d["ok"]),
        pages_checked=int(d["pages_checked"]),
        value=int(d["value"]),
        break_page=None if brk is None else int(brk),
        bad_pages=tuple(int(p) for p in d["bad_pages"]),
    )


def check_increment(
    region: RegionLike, page_size: int, excepted: npt.NDArray[np.uint8 | np.bool_] | None = None
) -> IncrementCheck:
    """The increment oracle over ``region``: byte 0 of every page (not marked in ``excepted``) is
    equal except one place where the next page is exactly one lower, mod 256."""
    return _increment_check(_core.increment_oracle(region, page_size, excepted))


class Guest:
    """A guest on ``region`` (a writable buffer: numpy array, mmap), which it keeps alive.

    Construction writes generation 0 into every page (unless ``fill="zero"``). Threads start with
    ``start()``; ``pause()`` returns once every guest thread is parked.
    """

    def __init__(
        self,
        region: RegionLike,
        config: GuestConfig | None = None,
        device: BalloonPort | None = None,
        *,
        _core_guest: _core.Guest | None = None,
    ) -> None:
        if _core_guest is not None:
            self._g = _core_guest
            return
        c = config or GuestConfig()
        self._g = _core.Guest(region, device=device, **asdict(c))

    @property
    def config(self) -> GuestConfig:
        """The guest's configuration (for an imported guest: the exported one)."""
        d: dict[str, Any] = self._g.config()
        return GuestConfig(**d)

    @classmethod
    def from_state(
        cls, region: RegionLike, state: RegionLike, device: BalloonPort | None = None
    ) -> Guest:
        """A guest resumed from ``export_state()`` bytes on a region holding its memory.

        Not started: call ``start()``."""
        return cls(region, None, device, _core_guest=_core.Guest.from_state(region, state, device))

    def prefault(self) -> None:
        """Touches the generation table now (a stopped or paused guest), so that a later
        ``import_state()`` writes only warm memory: the destination of a migration makes its guest
        ahead of the switchover and imports the state inside it."""
        self._g.prefault()

    def start(self) -> None:
        """Starts the guest threads (no-op when running or paused)."""
        self._g.start()

    def pause(self) -> None:
        """Parks every guest thread; returns when all are parked. Idempotent."""
        self._g.pause()

    def resume(self) -> None:
        """Lets the threads run again (starts them if never started). Idempotent."""
        self._g.resume()

    def stop(self) -> None:
        """Stops and joins the threads. Idempotent."""
        self._g.stop()

    def kick(self) -> None:
        """Wakes the balloon driver now (after a device command change)."""
        self._g.kick()

    @property
    def running(self) -> bool:
        return self._g.running

    @property
    def pages(self) -> int:
        return self._g.pages

    @property
    def page_size(self) -> int:
        return self._g.page_size

    @property
    def workload(self) -> str:
        return self._g.workload

    def stats(self) -> GuestStats:
        """The counters now."""
        return GuestStats(**self._g.stats())

    def verify(self) -> VerifyResult:
        """Checks every allocated page against the generation table.

        A running guest is paused for the check and resumed after it."""
        d: dict[str, Any] = self._g.verify()
        first = tuple(Mismatch(*m) for m in d["first_mismatches"])
        return VerifyResult(d["pages_checked"], d["pages_excepted"], d["mismatches"], first)

    def check_increment(self) -> IncrementCheck:
        """The increment oracle on this guest's region, free and held pages excepted."""
        return _increment_check(self._g.check_increment())

    def export_state(self) -> bytes:
        """The guest's state (paused or stopped guests only; ValueError otherwise)."""
        return self._g.export_state()

    def import_state(self, state: RegionLike) -> None:
        """Replaces the state (stopped guests only; same page size and count)."""
        self._g.import_state(state)

    def page_states(self) -> npt.NDArray[np.uint8]:
        """PAGE_ALLOCATED / PAGE_FREE / PAGE_HELD per page (a racy snapshot while running)."""
        return self._g.page_states()

    def generations(self) -> npt.NDArray[np.uint64]:
        """The generation table (paused or stopped guests only)."""
        return self._g.generations()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "CMD_DONE",
    "CMD_FIRST",
    "CMD_STOP",
    "PAGE_ALLOCATED",
    "PAGE_FREE",
    "PAGE_HELD",
    "BalloonPort",
    "Guest",
    "GuestConfig",
    "GuestStats",
    "IncrementCheck",
    "LocalBalloonDevice",
    "Mismatch",
    "VerifyResult",
    "check_increment",
    "next_round_id",
]
