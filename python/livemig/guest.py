"""The model guest: C++ threads that use a memory region like a VM's guest uses its RAM.

Python configures and observes; the writer threads, the page allocator and the balloon driver run
in C++ and never take the GIL, so they may fault on userfaultfd-registered memory. See
cpp/include/livemig/guest/guest.hpp for the page format and the threading rules. As something a
migration moves, the model guest is a workload: :class:`livemig.workload.ModelGuest`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # typing_extensions is not a runtime dependency
    from typing_extensions import Buffer, Self

from livemig import _core
from livemig._core import BalloonPort, LocalBalloonDevice
from livemig.memory import system_page_size

Workload = Literal["idle", "increment", "random", "hotset"]
WORKLOADS: tuple[Workload, ...] = ("increment", "random", "hotset", "idle")
FillMode = Literal["pattern", "zero"]
#: A guest region or a state: anything exporting a contiguous buffer (writable for regions).
RegionLike: TypeAlias = "Buffer | npt.NDArray[Any]"

#: Values of Guest.page_states().
PAGE_ALLOCATED = 0
PAGE_FREE = 1
PAGE_HELD = 2

GuestStats = _core.GuestStats
VerifyResult = _core.VerifyResult
Mismatch = _core.Mismatch
IncrementCheck = _core.IncrementCheck


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does. Rates are pages per second over all writer threads."""

    workload: Workload = "idle"
    page_size: int = 0  #: 0: the system's base page size
    rate: float = 0.0  #: workload pages/s; 0 = as fast as one thread can
    free_fraction: float = 0.0  #: share of the region in the free pool at start
    churn: float = 0.0  #: pages allocated+written and freed per second
    hotset_pages: int = 64  #: hot range per writer thread (hotset)
    hot_fraction: float = 0.9  #: share of hotset writes that hit the hot range
    seed: int = 1
    fill: FillMode = "pattern"  #: "pattern": generation 0 in every page; "zero": keep the region zero
    threads: int = 1  #: writer threads (increment always uses one)
    poll_interval_us: int = 1000  #: how often the balloon driver looks at the command id
    hint_reserve: float = 0.0  #: share of the free pool the balloon driver leaves unhinted

    def __post_init__(self) -> None:
        if self.page_size == 0:
            object.__setattr__(self, "page_size", system_page_size())
        check_guest_config(self)

    def kwargs(self) -> dict[str, Any]:
        """The fields as the core's Guest takes them."""
        return asdict(self)


def check_guest_config(c: GuestConfig) -> None:
    """ValueError naming the field when a guest config is unusable (the CLI and the API share it)."""
    if c.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {c.workload!r}; one of {', '.join(WORKLOADS)}")
    if c.fill not in ("pattern", "zero"):
        raise ValueError(f"fill must be 'pattern' or 'zero', got {c.fill!r}")
    for name in ("rate", "churn"):
        v = getattr(c, name)
        if not (v >= 0.0 and v < float("inf")):
            raise ValueError(f"{name} must be a finite number of pages per second >= 0, got {v}")
    for name in ("free_fraction", "hint_reserve"):
        v = getattr(c, name)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if not 0.0 <= c.hot_fraction <= 1.0:
        raise ValueError(f"hot_fraction must be in [0, 1], got {c.hot_fraction}")
    if not 1 <= c.threads <= 64:
        raise ValueError(f"threads must be in [1, 64], got {c.threads}")
    if c.seed < 0 or c.seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {c.seed}")
    if c.hotset_pages < 1:
        raise ValueError(f"hotset_pages must be at least 1, got {c.hotset_pages}")
    if not 1 <= c.poll_interval_us <= 10_000_000:
        raise ValueError(f"poll_interval_us must be in [1, 10000000], got {c.poll_interval_us}")
    if c.workload == "increment" and c.churn > 0:
        raise ValueError("churn needs a workload other than increment (its oracle needs a fixed set of pages)")


def check_increment(
    region: RegionLike, page_size: int, excepted: npt.NDArray[np.uint8 | np.bool_] | None = None
) -> IncrementCheck:
    """The increment oracle over ``region``: byte 0 of every page (not marked in ``excepted``) is
    equal except one place where the next page is exactly one lower, mod 256."""
    return _core.increment_oracle(region, page_size, excepted)


class Guest:
    """A guest on ``region`` (a writable buffer: numpy array, mmap), which it keeps exported.

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
        self._g = _core.Guest(region, device=device, **c.kwargs())

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
        return self._g.stats()

    def verify(self) -> VerifyResult:
        """Checks every allocated page against the generation table.

        A running guest is paused for the check and resumed after it."""
        return self._g.verify()

    def check_increment(self) -> IncrementCheck:
        """The increment oracle on this guest's region, free and held pages excepted."""
        return self._g.check_increment()

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
    "PAGE_ALLOCATED",
    "PAGE_FREE",
    "PAGE_HELD",
    "WORKLOADS",
    "BalloonPort",
    "Guest",
    "GuestConfig",
    "GuestStats",
    "IncrementCheck",
    "LocalBalloonDevice",
    "Mismatch",
    "VerifyResult",
    "check_guest_config",
    "check_increment",
]
