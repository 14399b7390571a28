"""livemig: live migration of memory between processes and hosts.

Precopy with kernel dirty tracking, postcopy on userfaultfd, and free page hints that stay correct
under postcopy. What moves is a workload (:mod:`livemig.workload`): livemig's model guest, or a
buffer the caller owns; :func:`migrate` sends one, :func:`serve` takes one in.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from livemig import wire
from livemig._core import PageBitmap
from livemig.destination import DestCounters, Destination, LatencyStats
from livemig.errors import (
    AuthenticationError,
    ConnectionLost,
    KernelError,
    LivemigError,
    MigrationError,
    ProtocolError,
    UnsupportedError,
    WorkloadError,
)
from livemig.guest import Guest, GuestConfig, GuestStats, IncrementCheck, VerifyResult
from livemig.memory import Region, system_page_size
from livemig.migration import (
    DestinationConfig,
    DestinationSummary,
    MigrationConfig,
    MigrationControl,
    MigrationFailed,
    MigrationResult,
    migrate,
    serve,
)
from livemig.source import RunFlag, Source, SourceCounters, SwitchoverSets
from livemig.workload import (
    BufferFactory,
    BufferWorkload,
    CheckResult,
    ModelGuest,
    PauseGate,
    StandardFactory,
    Workload,
    WorkloadFactory,
)

try:
    __version__ = version("livemig")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+dev"

__all__ = [
    "AuthenticationError",
    "BufferFactory",
    "BufferWorkload",
    "CheckResult",
    "ConnectionLost",
    "DestCounters",
    "Destination",
    "DestinationConfig",
    "DestinationSummary",
    "Guest",
    "GuestConfig",
    "GuestStats",
    "IncrementCheck",
    "KernelError",
    "LatencyStats",
    "LivemigError",
    "MigrationConfig",
    "MigrationControl",
    "MigrationError",
    "MigrationFailed",
    "MigrationResult",
    "ModelGuest",
    "PageBitmap",
    "PauseGate",
    "ProtocolError",
    "Region",
    "RunFlag",
    "Source",
    "SourceCounters",
    "StandardFactory",
    "SwitchoverSets",
    "UnsupportedError",
    "VerifyResult",
    "Workload",
    "WorkloadError",
    "WorkloadFactory",
    "__version__",
    "migrate",
    "serve",
    "system_page_size",
    "wire",
]
