"""PageBitmap on 2^28 pages (a 1 TiB region of 4 KiB pages, 32 MiB of bits), each operation beside
a numpy or plain-loop baseline over the same words, measured in the same run. Memory is warmed
before timing (every buffer is written once first)."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest
from bench_support import bench_median, median_seconds, record_goal, record_ratio

from livemig import PageBitmap, _core

PAGES = 1 << 28
GIB_REGION_PAGES = 262_144  # 1 GiB of 4 KiB pages


def random_words(density: float, seed: int) -> np.ndarray:
    """Words of a bitmap with about `density` of its bits set (bits drawn independently)."""
    rng = np.random.default_rng(seed)
    if density >= 0.5:
        return np.full(PAGES // 64, np.uint64(2**64 - 1), dtype=np.uint64)
    words = np.zeros(PAGES // 64, dtype=np.uint64)
    picks = rng.choice(PAGES, size=int(PAGES * density), replace=False)
    np.bitwise_or.at(words, picks // 64, np.left_shift(np.uint64(1), (picks % 64).astype(np.uint64)))
    return words


@pytest.fixture(scope="module", params=[0.001, 0.1], ids=["0.1%", "10%"])
def loaded(request: pytest.FixtureRequest) -> tuple[PageBitmap, np.ndarray, float]:
    words = random_words(request.param, seed=1)
    bm = PageBitmap(PAGES)
    bm.load_bytes(words)
    return bm, words, request.param


def test_count(benchmark: Any, loaded: tuple[PageBitmap, np.ndarray, float]) -> None:
    bm, words, _ = loaded
    expect = int(np.bitwise_count(words).sum())
    base = median_seconds(lambda: np.bitwise_count(words).sum())
    assert benchmark(bm.count) == expect
    record_ratio(benchmark, base, "np.bitwise_count(words).sum()", bytes=words.nbytes)


def test_find_next_walk(benchmark: Any, loaded: tuple[PageBitmap, np.ndarray, float]) -> None:
    """Every set page reached by find_next_set hops (a C++ loop), against np.flatnonzero over the
    same words, which only finds the non-zero words: a generous baseline."""
    bm, words, _ = loaded
    base = median_seconds(lambda: np.flatnonzero(words))
    assert benchmark(_core._bench.bitmap_find_walk, bm) == int(np.bitwise_count(words).sum())
    record_ratio(benchmark, base, "np.flatnonzero(words)", bytes=words.nbytes)


def test_nonzero_pages(benchmark: Any, loaded: tuple[PageBitmap, np.ndarray, float]) -> None:
    """Find-next over the whole bitmap with an equal result: the set pages as an index array, against
    numpy producing the same array from the same words. Both allocate their output fresh, so at 10%
    both pay first-touch of ~215 MB."""
    bm, words, _ = loaded

    def numpy_pages() -> np.ndarray:
        return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))

    base = median_seconds(numpy_pages, runs=3)
    got = benchmark(bm.nonzero)
    assert np.array_equal(got, numpy_pages())
    record_ratio(benchmark, base, "flatnonzero(unpackbits(words))", bytes=words.nbytes)


@pytest.mark.parametrize("op", ["set_range", "clear_range"])
def test_whole_range(benchmark: Any, op: str) -> None:
    bm = PageBitmap(PAGES)
    arr = np.zeros(PAGES // 64, dtype=np.uint64)
    arr.fill(1)  # warm
    value = 2**64 - 1 if op == "set_range" else 0
    base = median_seconds(lambda: arr.fill(value))
    benchmark(getattr(bm, op), 0, PAGES)
    assert bm.count() == (PAGES if op == "set_range" else 0)
    record_ratio(benchmark, base, "ndarray.fill over the same words", bytes=arr.nbytes)


def test_clear_1gib_region(benchmark: Any) -> None:
    """Clearing the pages of a 1 GiB region (262,144 bits) through the Python API. Goal: < 10 us."""
    bm = PageBitmap(PAGES, fill=True)
    arr = np.full(PAGES // 64, 1, dtype=np.uint64)
    base = median_seconds(lambda: arr.__setitem__(slice(0, GIB_REGION_PAGES // 64), 0), runs=101)
    benchmark(bm.clear_range, 0, GIB_REGION_PAGES)
    assert bm.count(0, GIB_REGION_PAGES) == 0
    record_ratio(benchmark, base, "numpy slice assignment of 0", bytes=GIB_REGION_PAGES // 8)
    median = bench_median(benchmark)
    if median is not None:
        record_goal(benchmark, "clear a 1 GiB region's bits in < 10 us (us)", median * 1e6, 10.0, at_most=True)


def test_harvest(benchmark: Any, loaded: tuple[PageBitmap, np.ndarray, float]) -> None:
    """Take-and-clear of the whole bitmap into a warm buffer, against a plain copy of the same bytes.
    Goal: within 2x of the copy."""
    bm, words, _ = loaded
    out = np.ones_like(words)
    base = median_seconds(lambda: np.copyto(out, words))
    expect = int(np.bitwise_count(words).sum())

    def refill() -> None:
        bm.load_bytes(words)

    benchmark.pedantic(bm.harvest, kwargs={"out": out}, setup=refill, rounds=9, iterations=1)
    assert int(np.bitwise_count(out).sum()) == expect and bm.count() == 0
    bm.load_bytes(words)  # leave the shared fixture as it was
    # One locked exchange per non-zero word (measured, same run): the floor of the 8-byte path; on
    # x86 outside TSan a dense harvest takes word pairs with one cmpxchg16b and can beat it.
    nonzero_words = int(np.count_nonzero(words))
    raw_exchange = statistics.median(_core._bench.bitmap_exchange_loop(nonzero_words) for _ in range(5))
    record_ratio(
        benchmark, base, "np.copyto of the same words", bytes=words.nbytes,
        raw_exchange_loop_s=raw_exchange, nonzero_words=nonzero_words,
        note=f"{nonzero_words} locked exchanges take {raw_exchange * 1e3:.1f} ms here",
    )
    median = bench_median(benchmark)
    if median is not None:
        record_goal(benchmark, "harvest within 2x of np.copyto (time ratio)", median / base, 2.0, at_most=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_test_and_set(benchmark: Any, threads: int) -> None:
    """test_and_set throughput, `threads` threads contending on the same words, against the same loop
    with plain (non-atomic) read-modify-writes on private words."""
    bm = PageBitmap(1 << 20)
    ops = 2_000_000
    base = median_seconds(lambda: _core._bench.bitmap_test_and_set(bm, threads, ops, plain=True), runs=5)
    secs = benchmark.pedantic(
        _core._bench.bitmap_test_and_set, args=(bm, threads, ops), setup=bm.reset, rounds=5, iterations=1
    )
    assert secs > 0
    benchmark.extra_info["ops_per_s_total"] = threads * ops / secs
    record_ratio(benchmark, base, "plain non-atomic RMW loop", ops=threads * ops)
