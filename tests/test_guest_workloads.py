"""Each workload writes what it should: exact contents checked by verify() and by numpy."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.guest import PAGE_ALLOCATED, PAGE_FREE, Guest, GuestConfig

from guest_helpers import PAGE, expected_page, page, wait_until

pytestmark = pytest.mark.timeout(60)


def region(pages: int) -> np.ndarray:
    return np.zeros(pages * PAGE, dtype=np.uint8)


def test_pattern_fill_is_generation_zero_everywhere() -> None:
    r = region(32)
    g = Guest(r, GuestConfig(page_size=PAGE, free_fraction=0.25))
    for i in range(32):
        assert np.array_equal(page(r, i), expected_page(i, 0)), i
    assert np.count_nonzero(r) > 0.99 * r.size
    v = g.verify()
    assert (v.ok, v.pages_checked, v.pages_excepted) == (True, 24, 8)
    states = g.page_states()
    assert list(states) == [PAGE_ALLOCATED] * 24 + [PAGE_FREE] * 8
    assert not g.generations().any()


def test_zero_fill_keeps_region_zero() -> None:
    r = region(16)
    g = Guest(r, GuestConfig(page_size=PAGE, fill="zero"))
    assert not r.any()
    assert g.verify().ok
    r[5 * PAGE + 100] = 1
    v = g.verify()
    assert (
        v.mismatches == 1
        and v.first_mismatches[0].page == 5
        and v.first_mismatches[0].kind == "nonzero"
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_random_writes_latest_generation(threads: int) -> None:
    r = region(64)
    with Guest(r, GuestConfig(workload="random", rate=40000, threads=threads, seed=7)) as g:
        g.start()
        wait_until(lambda: g.stats().pages_written >= 1000, what="1000 writes")
        g.pause()
        st = g.stats()
        gens = g.generations()
        # Every write bumped exactly one page's generation.
        assert int(gens.sum()) == st.pages_written
        assert np.count_nonzero(gens) > 32
        for i in [0, 1, 31, 32, 63] + list(np.flatnonzero(gens)[:5]):
            assert np.array_equal(page(r, int(i)), expected_page(int(i), int(gens[i]))), i
        v = g.verify()
        assert v.ok and v.pages_checked == 64


def test_hotset_concentrates_writes() -> None:
    r = region(256)
    with Guest(
        r, GuestConfig(workload="hotset", rate=40000, hotset_pages=8, hot_fraction=0.9, seed=3)
    ) as g:
        g.start()
        wait_until(lambda: g.stats().pages_written >= 2000, what="2000 writes")
        g.pause()
        gens = g.generations()
        total = int(gens.sum())
        assert total == g.stats().pages_written
        # 90 % aimed at the 8 hot pages, plus their share of the uniform 10 %.
        assert int(gens[:8].sum()) > 0.8 * total
        assert np.count_nonzero(gens[8:]) > 0
        for i in range(8):
            assert np.array_equal(page(r, i), expected_page(i, int(gens[i])))
        assert g.verify().ok


def test_increment_walks_pages_in_order() -> None:
    r = region(64)
    with Guest(r, GuestConfig(workload="increment", rate=50000)) as g:
        g.start()
        wait_until(lambda: g.stats().passes >= 3, what="3 passes")
        g.pause()
        st = g.stats()
        b0 = r[::PAGE].astype(int)
        done = st.pages_written - 64 * st.passes  # pages of the current pass already incremented
        assert 0 <= done < 64
        expect = [(st.passes + 1) % 256] * done + [st.passes % 256] * (64 - done)
        assert list(b0) == expect
        # The rest of every page is generation 0, untouched.
        for i in (0, 17, 63):
            assert np.array_equal(page(r, i)[1:], expected_page(i, 0)[1:])
        c = g.check_increment()
        assert c.ok and c.pages_checked == 64 and c.break_page == (done if done else None)
        assert g.verify().ok
        assert not g.generations().any()


def test_increment_skips_free_pages() -> None:
    r = region(64)
    with Guest(
        r, GuestConfig(workload="increment", rate=50000, free_fraction=0.25, fill="zero")
    ) as g:
        g.start()
        wait_until(lambda: g.stats().passes >= 2, what="2 passes")
        g.pause()
        assert not r[48 * PAGE :].any()  # the free pool is never written
        c = g.check_increment()
        assert c.ok and c.pages_checked == 48
        assert g.verify().ok


def test_idle_writes_nothing() -> None:
    r = region(16)
    before = r.copy()
    with Guest(r, GuestConfig(workload="idle")) as g:
        before = r.copy()
        g.start()
        g.pause()
        g.resume()
        g.pause()
        assert g.stats().pages_written == 0
        assert np.array_equal(r, before)


def test_churn_allocates_writes_and_frees() -> None:
    r = region(64)
    with Guest(r, GuestConfig(workload="idle", churn=20000, free_fraction=0.5, seed=11)) as g:
        g.start()
        wait_until(lambda: g.stats().allocations >= 300, what="300 allocations")
        g.pause()
        st = g.stats()
        states = g.page_states()
        gens = g.generations()
        assert st.allocated_pages + st.free_pages == 64
        assert st.allocations - st.frees == 32 - st.free_pages
        assert int(np.count_nonzero(states == PAGE_FREE)) == st.free_pages
        # Every allocation wrote a whole page with a new generation.
        assert int(gens.sum()) == st.pages_written == st.allocations
        for i in np.flatnonzero((states == PAGE_ALLOCATED) & (gens > 0))[:5]:
            assert np.array_equal(page(r, int(i)), expected_page(int(i), int(gens[i])))
        v = g.verify()
        assert v.ok and v.pages_checked == st.allocated_pages


def test_bad_configs_are_value_errors() -> None:
    r = region(4)
    with pytest.raises(ValueError, match="workload"):
        Guest(r, GuestConfig(workload="bogus"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="churn"):
        Guest(r, GuestConfig(workload="increment", churn=10))
    with pytest.raises(ValueError, match="page size"):
        Guest(np.zeros(PAGE + 8, np.uint8), GuestConfig())
    with pytest.raises(ValueError, match="free_fraction"):
        Guest(r, GuestConfig(free_fraction=1.5))
    with pytest.raises(ValueError, match="writable"):
        Guest(bytes(PAGE), GuestConfig())
    with pytest.raises(TypeError, match="buffer protocol"):
        Guest(42, GuestConfig())  # type: ignore[arg-type]


def test_region_is_kept_alive_by_the_guest() -> None:
    import gc
    import mmap

    def run(g: Guest) -> None:
        with g:
            g.start()
            wait_until(lambda: g.stats().pages_written >= 200, what="200 writes")
            assert g.verify().ok

    m = mmap.mmap(-1, 32 * PAGE)
    guest = Guest(m, GuestConfig(workload="random", rate=40000))
    with pytest.raises(BufferError):
        m.close()  # the guest holds an export of the mapping
    del m
    gc.collect()
    run(guest)
    del guest
    gc.collect()
