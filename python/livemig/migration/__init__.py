"""Migrations end to end: :func:`migrate` moves a workload out, :func:`serve` takes one in.

- ``config``: :class:`MigrationConfig`, :class:`DestinationConfig` (validated on construction);
- ``results``: what a migration reports (:class:`MigrationResult`, :class:`DestinationSummary`);
- ``outgoing``: :func:`migrate`; ``source_run`` / ``dest_run``: the two sides' steps;
  ``recovery``: postcopy's pause and resume;
- ``device_state``: what travels with a workload; ``oracle``: the generic verification;
- ``control``: steering a running migration (:class:`MigrationControl`, the control socket);
- ``progress`` / ``events`` / ``monitor``: what a running migration shows (:class:`Progress`,
  :class:`LiveProgress` and its :class:`Snapshot`) and tells programs (:class:`MigrationEvent`,
  :class:`EventStream`, :class:`EventWriter`; schema :data:`EVENTS_SCHEMA`, docs/cli.md).
"""

from __future__ import annotations

from livemig.migration.config import DestinationConfig, MigrationConfig
from livemig.migration.control import (
    ABORT_WINDOW_S,
    Aborted,
    Cancelled,
    ControlServer,
    Interrupted,
    MigrationControl,
    request_resume,
)
from livemig.migration.dest_run import serve
from livemig.migration.events import SCHEMA as EVENTS_SCHEMA
from livemig.migration.events import EventCallback, EventStream, EventWriter, MigrationEvent
from livemig.migration.outgoing import migrate
from livemig.migration.progress import LiveProgress, NoProgress, Progress, Snapshot
from livemig.migration.results import (
    BalloonReport,
    DestinationSummary,
    HintStats,
    InterruptReport,
    LatencySummary,
    MigrationFailed,
    MigrationResult,
    Mode,
    Outcome,
    PostcopyStats,
    PostcopyTimeline,
    RoundStats,
    SourceWorkloadReport,
    VerifyReport,
    WorkloadCheck,
    WorkloadInfo,
)

__all__ = [
    "ABORT_WINDOW_S",
    "EVENTS_SCHEMA",
    "Aborted",
    "BalloonReport",
    "Cancelled",
    "ControlServer",
    "DestinationConfig",
    "DestinationSummary",
    "EventCallback",
    "EventStream",
    "EventWriter",
    "HintStats",
    "InterruptReport",
    "Interrupted",
    "LatencySummary",
    "LiveProgress",
    "MigrationConfig",
    "MigrationControl",
    "MigrationEvent",
    "MigrationFailed",
    "MigrationResult",
    "Mode",
    "NoProgress",
    "Outcome",
    "PostcopyStats",
    "PostcopyTimeline",
    "Progress",
    "RoundStats",
    "Snapshot",
    "SourceWorkloadReport",
    "VerifyReport",
    "WorkloadCheck",
    "WorkloadInfo",
    "migrate",
    "request_resume",
    "serve",
]
