"""Helpers for the guest tests: an independent numpy model of the page format, and polling waits."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

MASK = (1 << 64) - 1
K_INDEX = 0x9E3779B97F4A7C15
K_GEN = 0xC2B2AE3D27D4EB4F
MIX1 = 0xFF51AFD7ED558CCD
MIX2 = 0xC4CEB9FE1A85EC53
WORD_MUL = 0xBF58476D1CE4E5B9

PAGE = 4096


def page_key(index: int, gen: int) -> int:
    """The per-page key, in plain Python integers."""
    z = (index * K_INDEX + (gen + 1) * K_GEN) & MASK
    z ^= z >> 33
    z = (z * MIX1) & MASK
    z ^= z >> 33
    z = (z * MIX2) & MASK
    z ^= z >> 33
    return z


def expected_page(index: int, gen: int, page_size: int = PAGE) -> npt.NDArray[np.uint8]:
    """The bytes the guest writes for page ``index`` at generation ``gen`` (numpy, not the C++)."""
    words = page_size // 8
    k = np.arange(words, dtype=np.uint64)
    # numpy wraps uint64 array arithmetic modulo 2**64, like the C++.
    z = np.full(words, page_key(index, gen), dtype=np.uint64) ^ (
        k * np.full(words, K_INDEX, dtype=np.uint64)
    )
    z ^= z >> np.uint64(32)
    z *= np.full(words, WORD_MUL, dtype=np.uint64)
    z ^= z >> np.uint64(29)
    z[0] = (index << 8) | (gen & 0xFF)
    z[1] = gen
    return z.astype("<u8").view(np.uint8)


def page(region: npt.NDArray[np.uint8], index: int, page_size: int = PAGE) -> npt.NDArray[np.uint8]:
    """A view of page ``index`` of ``region``."""
    return region[index * page_size : (index + 1) * page_size]


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Polls ``pred`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def increment_model(values: list[int]) -> tuple[bool, int | None]:
    """The increment oracle as a plain Python model: (ok, index of the break or None)."""
    brk: int | None = None
    for i in range(1, len(values)):
        if values[i] == values[i - 1]:
            continue
        if brk is None and values[i] == (values[i - 1] - 1) % 256:
            brk = i
        else:
            return False, None
    return True, brk
