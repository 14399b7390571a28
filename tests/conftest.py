"""Shared fixtures of the test suite. The helpers beside this file (``*_helpers.py``, the relays)
are plain modules the tests import; this file puts their folder on the path and holds what many
test modules need: skips that name the missing kernel feature, and the workload kits of the
conformance suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from workload_kits import KITS, Kit

from livemig.destination import postcopy_unsupported_reason
from livemig.errors import UnsupportedError
from livemig.source import Source


def _tracking_unsupported() -> str | None:
    try:
        Source.allocate(1).close()
    except UnsupportedError as e:
        return f"kernel dirty tracking unavailable ({e.feature}): {e}"
    return None


@pytest.fixture(scope="session")
def kernel_tracking() -> None:
    """Skips, naming what is missing, where the kernel cannot track writes (WP_ASYNC, PAGEMAP_SCAN)."""
    why = _tracking_unsupported()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="session")
def postcopy() -> None:
    """Skips, naming what is missing, where this process cannot run a postcopy destination."""
    why = postcopy_unsupported_reason()
    if why is not None:
        pytest.skip(f"postcopy unavailable: {why}")


@pytest.fixture(params=sorted(KITS), ids=sorted(KITS))
def kit(request: pytest.FixtureRequest, kernel_tracking: None) -> Iterator[Kit]:
    """Every workload kind the conformance suite covers, each with writers of its own."""
    k = KITS[request.param]()
    try:
        yield k
    finally:
        k.close()
