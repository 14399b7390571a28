"""Guest model costs beside raw baselines measured in the same run (memory warmed first).

- fill: writing generation 0 into every page (the guest's constructor) vs a numpy copy of the
  same bytes (memcpy);
- verify: checking every page against the generation table vs numpy reading the region once
  (an XOR reduction over 64-bit words: the memory read bandwidth numpy reaches);
- pacing: a random-workload guest at a requested rate: achieved rate and CPU per written page.

Run: PYTHONPATH=python python -m pytest bench/bench_guest_pages.py --benchmark-columns=median,ops -q
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from livemig.guest import Guest, GuestConfig

PAGE = 4096
PAGES = 16384  # 64 MiB
NBYTES = PAGES * PAGE


@pytest.fixture(scope="module")
def warm() -> tuple[np.ndarray, np.ndarray]:
    """Two 64 MiB regions, both touched (first touch is ~0.4 GB/s here and would dominate)."""
    a = np.ones(NBYTES, dtype=np.uint8)
    b = np.ones(NBYTES, dtype=np.uint8)
    return a, b


def test_fill_vs_memcpy(benchmark: Any, warm: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = warm
    t0 = time.perf_counter()
    for _ in range(3):
        np.copyto(a, b)
    memcpy_s = (time.perf_counter() - t0) / 3
    g = benchmark(Guest, a, GuestConfig(page_size=PAGE))
    assert g.verify().ok
    fill_s = benchmark.stats.stats.median if benchmark.stats else memcpy_s
    benchmark.extra_info.update(
        bytes=NBYTES,
        fill_gbps=NBYTES / fill_s / 1e9,
        memcpy_gbps=NBYTES / memcpy_s / 1e9,
        ratio_fill_to_memcpy=memcpy_s / fill_s,
    )


def test_verify_vs_numpy_read(benchmark: Any, warm: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = warm
    g = Guest(a, GuestConfig(page_size=PAGE))
    words = a.view(np.uint64)
    t0 = time.perf_counter()
    for _ in range(3):
        np.bitwise_xor.reduce(words)
    cmp_s = (time.perf_counter() - t0) / 3
    v = benchmark(g.verify)
    assert v.ok and v.pages_checked == PAGES
    verify_s = benchmark.stats.stats.median if benchmark.stats else cmp_s
    benchmark.extra_info.update(
        bytes=NBYTES,
        verify_gbps=NBYTES / verify_s / 1e9,
        numpy_read_gbps=NBYTES / cmp_s / 1e9,
        ratio_verify_to_numpy_read=cmp_s / verify_s,
    )


def test_paced_random_writer(benchmark: Any, warm: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = warm
    rate = 50000.0
    g = Guest(a, GuestConfig(page_size=PAGE, workload="random", rate=rate))

    def run() -> tuple[float, float, int]:
        before = g.stats().pages_written
        c0, t0 = time.process_time(), time.perf_counter()
        g.resume()
        time.sleep(0.5)  # the measured interval, not a synchronisation
        g.pause()
        c1, t1 = time.process_time(), time.perf_counter()
        return t1 - t0, c1 - c0, g.stats().pages_written - before

    wall, cpu, pages = benchmark.pedantic(run, rounds=3, iterations=1)
    g.stop()
    assert pages > 0 and g.verify().ok
    benchmark.extra_info.update(
        requested_pages_per_s=rate,
        achieved_pages_per_s=pages / wall,
        ratio_achieved_to_requested=pages / wall / rate,
        cpu_share_of_one_core=cpu / wall,
        cpu_us_per_page=cpu / pages * 1e6,
    )
