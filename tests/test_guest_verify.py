"""verify() and the increment oracle catch stale, lost, torn, misplaced and twice-placed pages."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.guest import Guest, GuestConfig, check_increment

from guest_helpers import PAGE, expected_page, increment_model, page, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def written() -> Iterator[tuple[np.ndarray, Guest, np.ndarray]]:
    """A paused random-workload guest whose pages 0..7 all carry generation >= 2."""
    r = np.zeros(64 * PAGE, dtype=np.uint8)
    g = Guest(
        r,
        GuestConfig(
            workload="hotset", hotset_pages=8, hot_fraction=1.0, rate=50000, free_fraction=0.25
        ),
    )
    g.start()

    def hot_written() -> bool:
        g.pause()
        ok = bool((g.generations()[:8] >= 2).all())
        g.resume()
        return ok

    wait_until(hot_written, what="every hot page written twice")
    g.pause()
    assert g.verify().ok
    yield r, g, g.generations()
    g.stop()


def kinds(g: Guest) -> dict[int, str]:
    return {m.page: m.kind for m in g.verify().first_mismatches}


def test_stale_generation(written: tuple[np.ndarray, Guest, np.ndarray]) -> None:
    r, g, gens = written
    page(r, 3)[:] = expected_page(3, int(gens[3]) - 1)
    v = g.verify()
    assert v.mismatches == 1
    m = v.first_mismatches[0]
    assert (m.page, m.kind, m.found_generation, m.expected_generation) == (
        3,
        "generation",
        gens[3] - 1,
        gens[3],
    )


def test_torn_page(written: tuple[np.ndarray, Guest, np.ndarray]) -> None:
    r, g, gens = written
    page(r, 4)[PAGE // 2 :] = expected_page(4, int(gens[4]) - 1)[PAGE // 2 :]
    assert kinds(g) == {4: "torn"}
    page(r, 4)[:] = expected_page(4, int(gens[4]))
    page(r, 4)[4095] ^= 1  # a single flipped bit at the very end
    assert kinds(g) == {4: "torn"}


def test_misplaced_and_lost_pages(written: tuple[np.ndarray, Guest, np.ndarray]) -> None:
    r, g, _gens = written
    page(r, 5)[:] = page(r, 6)  # page 6's content placed at 5
    page(r, 7)[:] = 0  # never placed
    assert kinds(g) == {5: "misplaced", 7: "zero"}


def test_free_pages_are_excepted(written: tuple[np.ndarray, Guest, np.ndarray]) -> None:
    r, g, _ = written
    r[48 * PAGE :] = 0xAA  # the free pool: its content is not the guest's data
    v = g.verify()
    assert v.ok and v.pages_excepted == 16 and v.pages_checked == 48


def oracle(values: list[int]) -> tuple[bool, int | None]:
    r = np.zeros(len(values) * 64, dtype=np.uint8)
    r[::64] = values
    c = check_increment(r, 64)
    assert c.pages_checked == len(values)
    return c.ok, c.break_page


def test_increment_oracle_accepts_correct_snapshots() -> None:
    assert oracle([7] * 10) == (True, None)
    assert oracle([8] * 4 + [7] * 6) == (True, 4)
    assert oracle([0] * 3 + [255] * 5) == (True, 3)  # mod 256
    assert oracle([6] * 9 + [5]) == (True, 9)


def test_increment_oracle_rejects_broken_snapshots() -> None:
    assert not oracle([8, 8, 7, 8, 8, 8])[0]  # a stale page before the cursor
    assert not oracle([8, 8, 8, 7, 7, 0, 7])[0]  # a lost (zero) page
    assert not oracle([8, 8, 8, 7, 7, 6, 7])[0]  # a page placed twice: older copy over the newer
    assert not oracle([8, 8, 6, 6])[0]  # two lower
    assert not oracle([7, 7, 8, 8])[0]  # one higher


def test_increment_oracle_excepts_pages() -> None:
    r = np.zeros(6 * 64, dtype=np.uint8)
    r[::64] = [8, 8, 0, 8, 7, 7]
    assert not check_increment(r, 64).ok
    ex = np.zeros(6, dtype=np.uint8)
    ex[2] = 1
    c = check_increment(r, 64, ex)
    assert (c.ok, c.pages_checked, c.break_page) == (True, 5, 4)
    c2 = check_increment(r, 64, ex != 0)  # a boolean mask works too
    assert (c2.ok, c2.pages_checked, c2.break_page, c2.bad_pages) == (c.ok, c.pages_checked, c.break_page, c.bad_pages)
    with pytest.raises(ValueError, match="excepted"):
        check_increment(r, 64, np.zeros(5, dtype=np.uint8))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 255), min_size=1, max_size=40)
    | st.builds(
        lambda v, n, k: [v] * k + [(v - 1) % 256] * (n - k) if k <= n else [v] * n,
        st.integers(0, 255),
        st.integers(1, 40),
        st.integers(0, 40),
    )
)
def test_increment_oracle_matches_model(values: list[int]) -> None:
    ok, brk = oracle(values)
    assert (ok, brk if ok else None) == increment_model(values)


def test_increment_guest_corruption_is_caught() -> None:
    r = np.zeros(64 * PAGE, dtype=np.uint8)
    with Guest(r, GuestConfig(workload="increment", rate=50000)) as g:
        g.start()
        wait_until(lambda: g.stats().passes >= 1, what="a pass")
        g.pause()
        assert g.check_increment().ok and g.verify().ok
        r[10 * PAGE] -= 1  # page 10 goes stale
        r[40 * PAGE] -= 1  # and page 40
        assert not g.check_increment().ok
        assert kinds(g) == {10: "counter", 40: "counter"}
