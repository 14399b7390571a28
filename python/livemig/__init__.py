"""livemig: live migration of memory regions between processes and hosts.

Precopy with kernel dirty tracking, postcopy on userfaultfd, and free page hints that stay correct
under postcopy.
"""

from __future__ import annotations

import mmap
from importlib.metadata import PackageNotFoundError, version

from livemig import wire
from livemig._core import PageBitmap
from livemig.balloon import BalloonDevice
from livemig.destination import DestCounters, Destination, LatencyStats
from livemig.errors import (
    AuthenticationError,
    ConnectionLost,
    KernelError,
    LivemigError,
    MigrationError,
    ProtocolError,
    UnsupportedError,
)
from livemig.guest import Guest, GuestConfig, GuestStats, IncrementCheck, VerifyResult
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

try:
    __version__ = version("livemig")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+dev"

PAGE_SIZE: int = mmap.PAGESIZE

__all__ = [
    "PAGE_SIZE",
    "AuthenticationError",
    "BalloonDevice",
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
    "PageBitmap",
    "ProtocolError",
    "RunFlag",
    "Source",
    "SourceCounters",
    "SwitchoverSets",
    "UnsupportedError",
    "VerifyResult",
    "__version__",
    "migrate",
    "serve",
    "wire",
]
