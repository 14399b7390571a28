"""The micro scenarios of ``livemig bench``: a dirty sync and the page bitmap, each against its
bare loop (the raw PAGEMAP_SCAN walk; numpy on the same words)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from livemig import _core
from livemig.benchmark.figures import PAGE, Figure, Stat, engine_figure
from livemig.benchmark.scenarios import BITMAP_PAGES, Scenario, size_label
from livemig.source import Source

if TYPE_CHECKING:
    from livemig.benchmark.runner import Bench


def run_sync(b: Bench, sc: Scenario) -> list[Figure]:
    """A dirty sync of a tracked region with 1% of its pages written, against the bare
    PAGEMAP_SCAN loop over the same writes, alternating."""
    size = int(sc.arg("size"))
    src = Source.allocate(size // PAGE)
    B = _core._bench
    eng, raw = [], []
    B.source_touch_pages(src.address, src.pages, 1, 1)  # warm: every page populated
    src.sync()
    for i in range(b.micro):
        B.source_touch_pages(src.address, src.pages, 100, 2 + i)
        t0 = time.perf_counter()
        src.sync()
        eng.append((time.perf_counter() - t0) * 1e3)
        B.source_touch_pages(src.address, src.pages, 100, 3 + i)
        t0 = time.perf_counter()
        B.source_pagemap_scan_loop(src.address, src.nbytes, 1024)
        raw.append((time.perf_counter() - t0) * 1e3)
    del src
    return [
        engine_figure(
            f"{sc.name} sync, 1% written",
            "scaling",
            "ms",
            "lower",
            Stat.of(eng),
            Stat.of(raw),
            "bare PAGEMAP_SCAN loop",
            None,
            None,
            region_bytes=size,
        )
    ]

def run_bitmap(b: Bench, sc: Scenario) -> list[Figure]:
    """PageBitmap count and harvest of the whole bitmap, dense (every bit) and sparse (one bit
    in 1024), against numpy on the same words: bitwise_count().sum(), and copyto + fill(0)."""
    pages = int(sc.arg("pages"))
    region = size_label(pages * PAGE)
    figs = []
    goal_applies = pages == BITMAP_PAGES[-1]
    for density, words in (
        ("dense", np.full(pages // 64, np.uint64(2**64 - 1), dtype=np.uint64)),
        ("sparse", sparse_words(pages)),
    ):
        bm = _core.PageBitmap(pages)
        bm.load_bytes(words.data)
        expect = int(np.bitwise_count(words).sum())
        out = np.ones_like(words)
        scratch = words.copy()
        runs = max(b.micro, 5)
        c_eng, c_np, h_eng, h_np = [], [], [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            got = bm.count()
            c_eng.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            np.bitwise_count(words).sum()
            c_np.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            bm.harvest(out=out)
            h_eng.append((time.perf_counter() - t0) * 1e3)
            if got != expect or bm.count() != 0:
                raise RuntimeError("bitmap count or harvest gave a wrong result")
            bm.load_bytes(words.data)
            np.copyto(scratch, words)
            t0 = time.perf_counter()
            np.copyto(out, scratch)
            scratch.fill(0)
            h_np.append((time.perf_counter() - t0) * 1e3)
        goal = "at least numpy's speed (1 TiB bitmap)" if goal_applies else None
        g = 1.0 if goal_applies else None
        figs.append(
            engine_figure(
                f"bitmap-{region} count, {density}",
                "bitmap",
                "ms",
                "lower",
                Stat.of(c_eng),
                Stat.of(c_np),
                "numpy bitwise_count().sum()",
                goal,
                g,
                pages=pages,
                bits_set=expect,
            )
        )
        figs.append(
            engine_figure(
                f"bitmap-{region} harvest, {density}",
                "bitmap",
                "ms",
                "lower",
                Stat.of(h_eng),
                Stat.of(h_np),
                "numpy copyto + fill(0)",
                goal,
                g,
                pages=pages,
                bits_set=expect,
                nonzero_words=int(np.count_nonzero(words)),
            )
        )
    return figs

def sparse_words(pages: int) -> npt.NDArray[np.uint64]:
    """Bit 1024*i + (i mod 64) for every i: one bit in 1024, spread over the word positions."""
    words = np.zeros(pages // 64, dtype=np.uint64)
    i = np.arange(pages // 1024, dtype=np.uint64)
    bits = i * np.uint64(1024) + (i % np.uint64(64))
    words[(bits // np.uint64(64)).astype(np.intp)] |= np.left_shift(
        np.uint64(1), bits % np.uint64(64)
    )
    return words


__all__ = ["run_bitmap", "run_sync"]
