"""The model guest as a workload: livemig's own C++ writers, allocator and balloon driver over
memory livemig allocates (the CLI's ``--workload``). Kind ``model-guest``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.errors import WorkloadError
from livemig.guest import Guest, GuestConfig
from livemig.memory import Region
from livemig.workload.base import BalloonGuestStatus, CheckResult, kind_mismatch

if TYPE_CHECKING:
    from typing_extensions import Self

KIND = "model-guest"
VERSION = 2  #: 2: the state's page sets travel as runs (guest state version 4)


@dataclass(frozen=True)
class GuestImage:
    """A paused model guest taken off a destination, to migrate it on or back from exactly where it
    stopped (:meth:`ModelGuest.from_image`)."""

    memory: npt.NDArray[np.uint8]  #: a copy of its region
    state: bytes  #: its exported state
    last_round_id: int | None = None  #: its balloon device's id sequence continues from here


class _Balloon:
    """The model guest's balloon: its own device, its C++ driver's doorbell and state."""

    def __init__(self, device: _core.BalloonDevice, guest: Guest) -> None:
        self._device = device
        self._guest = guest

    @property
    def device(self) -> _core.BalloonDevice:
        return self._device

    def notify(self) -> None:
        self._guest.kick()

    def status(self) -> BalloonGuestStatus:
        s = self._guest.stats()
        return BalloonGuestStatus(last_cmd_id=int(s.last_cmd_id), done_seen=s.done_seen > 0,
                                  pages_held=int(s.pages_held))


class ModelGuest:
    """The model guest on a region of its own (``size`` bytes, or the image's), running ``config``."""

    kind = KIND
    version = VERSION

    def __init__(self, size: int, config: GuestConfig | None = None) -> None:
        cfg = config or GuestConfig()
        self._region = Region.allocate(size, page_size=cfg.page_size)
        self._device: _core.BalloonDevice = _core.LocalBalloonDevice(self._region.pages)
        self.guest = Guest(self._region.array, cfg, device=self._device)
        self._balloon = _Balloon(self._device, self.guest)

    @classmethod
    def from_image(cls, image: GuestImage) -> ModelGuest:
        """The guest of ``image`` on new memory holding a copy of its region; not started."""
        self = cls.__new__(cls)
        self._region = Region.allocate(image.memory.nbytes)
        self._region.array[:] = image.memory.reshape(-1).view(np.uint8)
        self._device = _core.LocalBalloonDevice(self._region.pages)
        if image.last_round_id:
            self._device.continue_after(image.last_round_id)
        self.guest = Guest.from_state(self._region.array, image.state, device=self._device)
        self._balloon = _Balloon(self._device, self.guest)
        return self

    @classmethod
    def _rebuilt(cls, region: Region, guest: Guest, device: _core.BalloonDevice) -> ModelGuest:
        self = cls.__new__(cls)
        self._region, self._device, self.guest = region, device, guest
        self._balloon = _Balloon(device, guest)
        return self

    # ---- the workload protocol ----
    @property
    def region(self) -> Region:
        return self._region

    @property
    def balloon(self) -> _Balloon:
        return self._balloon

    def start(self) -> None:
        self.guest.start()

    def pause(self, timeout: float) -> None:
        # The C++ guest parks its threads in bounded time: a writer is never blocked for long on
        # the source, and on a destination only while a page it faulted on is on its way.
        del timeout
        self.guest.pause()

    def resume(self) -> None:
        self.guest.resume()

    def stop(self) -> None:
        self.guest.stop()

    def export_state(self) -> bytes:
        return self.guest.export_state()

    def check(self) -> CheckResult:
        """Every page against the generation table and, for ``increment``, the design's oracle."""
        v = self.guest.verify()
        mismatches = int(v.mismatches)
        detail = ", ".join(f"page {m.page}: {m.kind}" for m in v.first_mismatches[:4])
        if self.guest.workload == "increment":
            inc = self.guest.check_increment()
            if not inc.ok:
                mismatches += 1
                detail = (detail + "; " if detail else "") + f"increment oracle broken at {list(inc.bad_pages)[:4]}"
        return CheckResult(ok=mismatches == 0, pages_checked=int(v.pages_checked), mismatches=mismatches,
                           detail=detail)

    def stats(self) -> dict[str, int | float]:
        s = self.guest.stats()
        return {"pages_written": int(s.pages_written), "passes": int(s.passes), "allocations": int(s.allocations),
                "frees": int(s.frees), "pages_hinted": int(s.pages_hinted), "pages_held": int(s.pages_held)}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- beyond the protocol ----
    def stale_pages(self) -> int:
        """After check(): how many mismatching pages hold an older generation (a stale page)."""
        v = self.guest.verify()
        return sum(1 for m in v.first_mismatches
                   if m.kind == "generation" and m.found_generation < m.expected_generation)

    def image(self) -> GuestImage:
        """A copy of the paused guest (memory, state, balloon id sequence)."""
        return GuestImage(self._region.array.copy(), self.guest.export_state(),
                          int(self._device.last_round_id) or None)


class ModelGuestFactory:
    """Rebuilds model guests on a destination. The guest is made when the source connects, its
    generation table touched, so that importing its state inside the downtime writes warm memory."""

    def __init__(self) -> None:
        self._prepared: tuple[Region, Guest, _core.LocalBalloonDevice] | None = None

    def memory(self, nbytes: int, page_size: int) -> Region | None:
        return None

    def prepare(self, region: Region) -> None:
        device = _core.LocalBalloonDevice(region.pages)
        guest = Guest(region.array, GuestConfig(fill="zero", page_size=region.page_size), device=device)
        guest.prefault()
        self._prepared = (region, guest, device)

    def accepts(self, kind: str, version: int) -> str | None:
        return kind_mismatch(kind, version, KIND, VERSION)

    def build(self, kind: str, version: int, region: Region, state: bytes) -> ModelGuest:
        why = self.accepts(kind, version)
        if why is not None:
            raise WorkloadError(why)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is region:
            _, guest, device = prepared
            try:
                guest.import_state(state)
            except ValueError:  # a guest of another shape: make it from the state (or say why not)
                guest = Guest.from_state(region.array, state, device=device)
        else:
            device = _core.LocalBalloonDevice(region.pages)
            guest = Guest.from_state(region.array, state, device=device)
        return ModelGuest._rebuilt(region, guest, device)


__all__ = ["KIND", "VERSION", "GuestImage", "ModelGuest", "ModelGuestFactory"]
