"""The workload seam: what a migration needs of the thing it moves, and what a destination needs to
rebuild it (docs/design.md, "Workloads"). The orchestrator sees only these protocols, never a
workload's insides; every kind (the model guest, a user's buffer, another process's memory) passes
the same conformance suite (tests/test_workload_conformance.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from livemig import _core
from livemig.memory import Region


@dataclass(frozen=True)
class CheckResult:
    """A workload's verdict on its own memory (its self-check, the second oracle)."""

    ok: bool
    pages_checked: int = 0
    mismatches: int = 0
    detail: str = ""  #: what was wrong, in words (empty when ok)


@dataclass(frozen=True)
class BalloonGuestStatus:
    """What a workload's balloon driver last saw."""

    last_cmd_id: int  #: the command id it acted on last
    done_seen: bool  #: it saw DONE at least once
    pages_held: int  #: pages it still holds back (hinted, waiting for DONE)


@runtime_checkable
class BalloonPort(Protocol):
    """The guest side of free page hinting a workload offers: its device and its driver."""

    @property
    def device(self) -> _core.BalloonDevice:
        """The device the workload's driver talks to; the migration drives its host side."""
        ...

    def notify(self) -> None:
        """The device shows a new command: the driver looks now (the doorbell)."""
        ...

    def status(self) -> BalloonGuestStatus:
        """What the driver last saw (its command id, DONE, the pages it still holds)."""
        ...


@runtime_checkable
class Workload(Protocol):
    """What a migration needs of the thing it moves. The orchestrator calls nothing else."""

    @property
    def kind(self) -> str:
        """The kind: the format of its device state, and what a destination must be able to host."""
        ...

    @property
    def version(self) -> int:
        """The version of the kind's device state format."""
        ...

    @property
    def region(self) -> Region:
        """The memory it lives in (page size, length, how writes are tracked)."""
        ...

    @property
    def balloon(self) -> BalloonPort | None:
        """Its free page hinting device, or None when it hints nothing."""
        ...

    def start(self) -> None:
        """Runs; a no-op when it runs already."""
        ...

    def pause(self, timeout: float) -> None:
        """Returns once nothing writes the region; WorkloadError after ``timeout`` seconds (it runs on)."""
        ...

    def resume(self) -> None:
        """Runs again after pause(); idempotent."""
        ...

    def stop(self) -> None:
        """Ends for good (its threads joined); idempotent. Its memory stays as it is."""
        ...

    def export_state(self) -> bytes:
        """Its device state (paused): opaque bytes the destination's factory rebuilds it from."""
        ...

    def check(self) -> CheckResult | None:
        """Its own check of its memory (paused), or None when it has none."""
        ...

    def stats(self) -> dict[str, int | float]:
        """Its own counters, for the report."""
        ...


def kind_mismatch(kind: str, version: int, hosts: str, reads: int) -> str | None:
    """Why a factory that hosts ``hosts`` workloads and reads state version ``reads`` cannot
    rebuild a ``kind`` workload of state ``version`` (None: it can)."""
    if kind != hosts:
        return f"this factory hosts {hosts!r} workloads, not {kind!r}"
    if version != reads:
        return f"{hosts!r} state version {version} is not the version this build reads ({reads})"
    return None


def process_info(w: object) -> dict[str, object]:
    """What a workload that lives in another process says of that process (pid, name, role,
    memory) for the reports: its ``info()``; empty for workloads in this process."""
    info = getattr(w, "info", None)
    return dict(info()) if callable(info) else {}


def workload_gone(w: object, wait: float) -> str | None:
    """Why a workload that lives in another process is gone (the process died or let go), waiting
    up to ``wait`` seconds for it to say so (its ``gone()``); None for workloads in this process
    and for a process still there."""
    gone = getattr(w, "gone", None)
    return gone(wait) if callable(gone) else None


def memory_complete(w: object) -> None:
    """Tells a destination workload that every page it may read is in (postcopy's last page placed):
    an attached process then gives up its userfaultfd. Optional (``memory_complete()``); most
    workloads need nothing."""
    done = getattr(w, "memory_complete", None)
    if callable(done):
        done()


@runtime_checkable
class WorkloadFactory(Protocol):
    """What a destination needs to rebuild workloads from their device state (``serve(factory=)``)."""

    def memory(self, nbytes: int, page_size: int) -> Region | None:
        """Where the incoming memory goes (called when a source connects); None: livemig allocates it."""
        ...

    def prepare(self, region: Region) -> None:
        """A source connected: do ahead what build() will need (warm-up outside the downtime)."""
        ...

    def accepts(self, kind: str, version: int) -> str | None:
        """None when this factory can host a workload of ``kind`` at ``version``; else why not."""
        ...

    def build(self, kind: str, version: int, region: Region, state: bytes) -> Workload:
        """The workload rebuilt on ``region`` from its device state (not started). In postcopy the
        region's missing pages fault in as it touches them."""
        ...


__all__ = ["BalloonGuestStatus", "BalloonPort", "CheckResult", "Workload", "WorkloadFactory", "memory_complete",
           "process_info"]
