"""Shared helpers for the source tests."""

from __future__ import annotations

import numpy as np
import pytest

from livemig import _core
from livemig.errors import UnsupportedError
from livemig.source import Backing, Source, TrackMode


def make_source(pages: int, mode: TrackMode = "kernel", backing: Backing = "anonymous") -> Source:
    """A Source over memory of its own, or a skip naming the kernel feature that is missing."""
    try:
        return Source.allocate(pages, mode=mode, backing=backing)
    except UnsupportedError as e:
        pytest.skip(f"kernel lacks {e.feature}: {e}")


def set_bits(pages: int, which: set[int]) -> _core.PageBitmap:
    """A PageBitmap of `pages` pages with `which` set."""
    bm = _core.PageBitmap(pages)
    for p in which:
        bm.set(p)
    return bm


def bits(bm: _core.PageBitmap) -> set[int]:
    """The set pages of a bitmap."""
    out: set[int] = set()
    for start, length in bm.runs():
        out.update(range(int(start), int(start + length)))
    return out


def runs_to_pages(runs: np.ndarray) -> list[int]:
    """Pages of a next_batch result, in order."""
    out: list[int] = []
    for first, n, _flags in runs:
        out.extend(range(int(first), int(first + n)))
    return out


def device_for(src: Source) -> _core.LocalBalloonDevice:
    """A balloon device whose accepted hints land in ``src``'s page state (as a workload's do)."""
    dev = _core.LocalBalloonDevice(src.pages)
    dev.set_target(src.hint_target)
    return dev
