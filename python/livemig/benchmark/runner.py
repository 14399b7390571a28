"""The runner of ``livemig bench``: :class:`Bench` runs scenarios and returns a :class:`Report`.

Every engine figure stands beside a raw baseline measured in the same run, on this machine, and is
reported as a ratio (``value / baseline``), with the spread (min and max) of its runs. Memory is
warmed before timing: every source buffer is written first, and a baseline receives into memory in
the same state as the engine's destination (see :class:`Baselines`).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from livemig.benchmark import kinds_attach, kinds_micro, kinds_migration, kinds_prefault, kinds_tls
from livemig.benchmark.baselines import Baselines
from livemig.benchmark.figures import GROUPS, SKIPPED, Figure, failed_figure
from livemig.benchmark.report import Report, StepFn, machine_info
from livemig.benchmark.scenarios import Scenario, needs_postcopy
from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally
from livemig.migration.config import DestinationConfig, MigrationConfig
from livemig.migration.results import MigrationResult
from livemig.workload.base import Workload, WorkloadFactory

#: Seconds either side of a benchmark migration waits for a silent peer.
PEER_TIMEOUT_S = 120.0


class Bench:
    """Runs scenarios: ``repeat`` runs of each migration, ``micro`` runs of each cheap loop."""

    def __init__(
        self,
        repeat: int = 3,
        micro: int = 5,
        settle_s: float = 0.5,
        deadline_s: float = 600.0,
        dirty_rate: float = 20000.0,
        step: StepFn | None = None,
    ) -> None:
        if repeat < 1 or micro < 1:
            raise ValueError("repeat and micro must be at least 1")
        self.repeat, self.micro = repeat, micro
        self.settle_s, self.deadline_s, self.dirty_rate = settle_s, deadline_s, dirty_rate
        self.step = step or (lambda _text: None)
        self.base = Baselines()

    # -- entry point --
    def run(self, chosen: Sequence[Scenario], settings: dict[str, Any] | None = None) -> Report:
        t0 = time.perf_counter()
        machine = machine_info()
        figures: list[Figure] = []
        no_postcopy: str | None = None
        if any(needs_postcopy(sc) for sc in chosen):
            from livemig.destination import postcopy_unsupported_reason

            no_postcopy = postcopy_unsupported_reason()
        for sc in chosen:
            self.step(sc.name)
            if no_postcopy is not None and needs_postcopy(sc):
                figures.append(failed_figure(sc.name, sc.group, f"{SKIPPED}{no_postcopy}"))
                continue
            try:
                figures.extend(KINDS[sc.kind](self, sc))
            except Exception as e:  # noqa: BLE001 (one scenario failing does not lose the others)
                figures.append(failed_figure(sc.name, sc.group, f"{type(e).__name__}: {e}"))
        figures = self.base.figures() + figures
        order = {g: i for i, g in enumerate(GROUPS)}
        figures.sort(key=lambda f: order.get(f.group, len(order)))
        machine["loadavg_at_end"] = list(os.getloadavg())
        return Report(figures, dict(settings or {}), machine, time.perf_counter() - t0)

    def migrate(self, size: int, guest: GuestConfig | Workload, config: MigrationConfig,
                dest: DestinationConfig | None = None,
                factory: Callable[[], WorkloadFactory] | None = None,
                before: Callable[[str], None] | None = None) -> MigrationResult:
        """One loopback migration of ``guest`` (a fresh model guest of ``size`` bytes, or a workload)
        to a destination with ``dest`` (default: the defaults) and ``factory`` (default: the standard one);
        ``before``: :func:`livemig.loopback.migrate_locally`'s."""
        # The destination's silence timeout counts time between events, and a long first round
        # (4 GiB on a loaded machine) has none: allow two minutes, not the default 20 s.
        dest = replace(dest or DestinationConfig(), timeout=PEER_TIMEOUT_S)
        config = replace(config, timeout=PEER_TIMEOUT_S)
        result, _ = migrate_locally(
            guest, config, size=size, dest=dest, settle_s=self.settle_s, deadline_s=self.deadline_s,
            factory=factory, before=before,
        )
        # The model guest's memory is held by reference cycles: free it now, not at some later
        # collection, or a few 4 GiB runs in a row exhaust the machine.
        gc.collect()
        if not result.ok:
            raise RuntimeError(f"migration failed: {result.error}")
        if result.verify is not None and result.verify.mismatches:
            raise RuntimeError(f"migration verified with {result.verify.mismatches} mismatches")
        return result

    # -- scenario kinds --

KINDS: dict[str, Callable[[Bench, Scenario], list[Figure]]] = {
    "baselines": kinds_migration.run_baselines,
    "migration": kinds_migration.run_migration,
    "zero": kinds_migration.run_zero,
    "hints": kinds_migration.run_hints,
    "faults": kinds_migration.run_faults,
    "channels": kinds_migration.run_channels,
    "prefault": kinds_prefault.run_prefault,
    "sync": kinds_micro.run_sync,
    "bitmap": kinds_micro.run_bitmap,
    "tls_precopy": kinds_tls.run_tls_precopy,
    "tls_channel_cost": kinds_tls.run_tls_channel_cost,
    "tls_faults": kinds_tls.run_tls_faults,
    "tls_handshake": kinds_tls.run_tls_handshake,
    "attach-precopy": kinds_attach.run_attach_precopy,
    "attach-sync": kinds_attach.run_attach_sync,
    "attach-postcopy": kinds_attach.run_attach_postcopy,
}

__all__ = ["KINDS", "PEER_TIMEOUT_S", "Bench"]
