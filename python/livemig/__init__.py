"""livemig: live migration of memory regions between processes and hosts.

Precopy with kernel dirty tracking, postcopy on userfaultfd, and free page hints that stay correct
under postcopy.
"""

from __future__ import annotations

import mmap
from importlib.metadata import PackageNotFoundError, version

from livemig._core import PageBitmap
from livemig.errors import (
    AuthenticationError,
    ConnectionLost,
    KernelError,
    LivemigError,
    MigrationError,
    ProtocolError,
    UnsupportedError,
)

try:
    __version__ = version("livemig")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+dev"

PAGE_SIZE: int = mmap.PAGESIZE

__all__ = [
    "PAGE_SIZE",
    "AuthenticationError",
    "ConnectionLost",
    "KernelError",
    "LivemigError",
    "MigrationError",
    "PageBitmap",
    "ProtocolError",
    "UnsupportedError",
    "__version__",
]
