"""PageBitmap conformance: every operation sequence against a plain Python model."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from livemig import PageBitmap, _core


class ModelBitmap:
    """The reference: a Python int as the bit set. Slow, obviously right."""

    def __init__(self, size: int, fill: bool = False) -> None:
        self.size = size
        self.bits = (1 << size) - 1 if fill else 0

    def _mask(self, start: int, end: int) -> int:
        return ((1 << (end - start)) - 1) << start

    def test(self, i: int) -> bool:
        return bool(self.bits >> i & 1)

    def set_range(self, start: int, end: int) -> None:
        self.bits |= self._mask(start, end)

    def clear_range(self, start: int, end: int) -> None:
        self.bits &= ~self._mask(start, end)

    def count(self, start: int, end: int) -> int:
        return (self.bits & self._mask(start, end)).bit_count()

    def find_next(self, start: int, end: int, value: bool) -> int | None:
        return next((i for i in range(start, end) if self.test(i) == value), None)

    def runs(self, start: int, end: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        i = start
        while i < end:
            if self.test(i):
                j = i
                while j < end and self.test(j):
                    j += 1
                out.append((i, j - i))
                i = j
            else:
                i += 1
        return out

    def words(self) -> list[int]:
        n = (self.size + 63) // 64
        return [(self.bits >> (64 * k)) & ((1 << 64) - 1) for k in range(n)]


SIZES = st.one_of(st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 200]), st.integers(0, 700))


class BitmapMachine(RuleBasedStateMachine):
    """Random operation sequences; after each, the bitmap must equal the model word for word."""

    bm: PageBitmap
    model: ModelBitmap

    @initialize(size=SIZES, fill=st.booleans())
    def create(self, size: int, fill: bool) -> None:
        self.bm = PageBitmap(size, fill=fill)
        self.model = ModelBitmap(size, fill)

    def _page(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.model.size - 1))

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        a = data.draw(st.integers(0, self.model.size))
        b = data.draw(st.integers(0, self.model.size))
        return min(a, b), max(a, b)

    @precondition(lambda self: self.model.size > 0)
    @rule(data=st.data(), op=st.sampled_from(["set", "clear", "test_and_set", "test_and_clear", "test"]))
    def single(self, data: st.DataObject, op: str) -> None:
        i = self._page(data)
        old = self.model.test(i)
        result = getattr(self.bm, op)(i)
        if op in ("set", "test_and_set"):
            self.model.set_range(i, i + 1)
        elif op in ("clear", "test_and_clear"):
            self.model.clear_range(i, i + 1)
        if op in ("test", "test_and_set", "test_and_clear"):
            assert result == old

    @rule(data=st.data(), value=st.booleans())
    def range_op(self, data: st.DataObject, value: bool) -> None:
        start, end = self._range(data)
        if value:
            self.bm.set_range(start, end)
            self.model.set_range(start, end)
        else:
            self.bm.clear_range(start, end)
            self.model.clear_range(start, end)

    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        start, end = self._range(data)
        assert self.bm.count(start, end) == self.model.count(start, end)
        assert self.bm.find_next_set(start, end) == self.model.find_next(start, end, True)
        assert self.bm.find_next_clear(start, end) == self.model.find_next(start, end, False)
        assert [tuple(r) for r in self.bm.runs(start, end).tolist()] == self.model.runs(start, end)
        assert self.bm.nonzero(start, end).tolist() == [
            i for i in range(start, end) if self.model.test(i)
        ]

    @rule(data=st.data(), put_back=st.booleans())
    def harvest(self, data: st.DataObject, put_back: bool) -> None:
        start, end = self._range(data)
        expect = self.model.bits & self.model._mask(start, end)
        taken = self.bm.harvest(start, end)
        assert taken.dtype == np.uint64
        got = sum(int(w) << (64 * (start // 64 + k)) for k, w in enumerate(taken.tolist()))
        assert got == expect
        self.model.clear_range(start, end)
        if put_back:
            self.bm.merge(start, end, taken)
            self.model.bits |= expect

    @rule(other_fill=st.booleans(), data=st.data(), op=st.sampled_from(["or_", "and_not", "and_"]))
    def whole(self, other_fill: bool, data: st.DataObject, op: str) -> None:
        other = PageBitmap(self.model.size, fill=other_fill)
        other_model = ModelBitmap(self.model.size, other_fill)
        start, end = self._range(data)
        other.clear_range(start, end)
        other_model.clear_range(start, end)
        getattr(self.bm, op)(other)
        if op == "or_":
            self.model.bits |= other_model.bits
        elif op == "and_not":
            self.model.bits &= ~other_model.bits
        else:
            self.model.bits &= other_model.bits

    @rule()
    def complement(self) -> None:
        self.bm.complement()
        self.model.bits ^= (1 << self.model.size) - 1

    @rule()
    def bytes_round_trip(self) -> None:
        data = self.bm.to_bytes()
        assert len(data) == (self.model.size + 7) // 8
        assert int.from_bytes(data, "little") == self.model.bits
        again = PageBitmap.from_bytes(self.model.size, data)
        assert again.to_bytes() == data

    @invariant()
    def same_words(self) -> None:
        if hasattr(self, "bm"):
            assert self.bm.words.tolist() == self.model.words()
            assert self.bm.count() == self.model.bits.bit_count()


TestBitmapConformance = BitmapMachine.TestCase
TestBitmapConformance.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(size=SIZES, data=st.data())
@settings(deadline=None)
def test_harvest_words_sit_on_the_word_grid(size: int, data: st.DataObject) -> None:
    bm = PageBitmap(size, fill=True)
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    taken = bm.harvest(start, end)
    assert len(taken) == (0 if start == end else (end - 1) // 64 - start // 64 + 1)
    assert sum(int(w).bit_count() for w in taken) == end - start
    assert bm.count() == size - (end - start)


def test_words_view_is_zero_copy_and_read_only() -> None:
    bm = PageBitmap(130)
    view = bm.words
    assert view.shape == (3,) and view.dtype == np.uint64
    assert not view.flags.writeable
    bm.set(129)
    bm.set(0)
    assert view.tolist() == [1, 0, 2]  # the view sees later changes: no copy
    with pytest.raises(ValueError):
        view[0] = 5
    del bm
    assert view.tolist() == [1, 0, 2]  # the view keeps the bitmap alive


def test_harvest_into_caller_buffer() -> None:
    bm = PageBitmap(1000, fill=True)
    out = np.zeros(20, dtype=np.uint64)
    got = bm.harvest(64, 192, out=out)
    assert got is out or np.shares_memory(got, out)
    assert out[:2].tolist() == [2**64 - 1, 2**64 - 1] and out[2:].sum() == 0
    with pytest.raises(ValueError, match="at least 2 words"):
        bm.harvest(0, 128, out=np.zeros(1, dtype=np.uint64))


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda b: b.test(100), IndexError),
        (lambda b: b.set(-1), IndexError),
        (lambda b: b.test_and_set(10**12), IndexError),
        (lambda b: b.set_range(0, 101), IndexError),
        (lambda b: b.count(-1, 5), IndexError),
        (lambda b: b.clear_range(50, 10), ValueError),
        (lambda b: b.or_(PageBitmap(99)), ValueError),
        (lambda b: b.load_bytes(b"\x00" * 12), ValueError),
        (lambda b: b.load_bytes(b"\x00" * 12 + b"\xf0"), ValueError),  # bits past the end
        (lambda b: PageBitmap(-1), ValueError),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc):
        call(PageBitmap(100))


def test_find_returns_none_when_nothing_matches() -> None:
    bm = PageBitmap(70)
    assert bm.find_next_set() is None
    bm.fill()
    assert bm.find_next_clear() is None
    assert bm.find_next_set(70) is None
    assert PageBitmap(0).count() == 0


RACE_PAGES, RACE_THREADS, RACE_ROUNDS = 1024, 4, 200


@pytest.mark.timeout(60)
def test_threads_race_test_and_set_exactly_once() -> None:
    """C++ threads (no interpreter lock between their calls: Python threads would take turns)
    released together by a barrier race test_and_set over every page, in orders that collide,
    round after round: each page is won by exactly one claim per round."""
    bm = PageBitmap(RACE_PAGES)
    wins = _core._bench.bitmap_race_claims(bm, RACE_THREADS, RACE_ROUNDS)
    assert wins.shape == (RACE_PAGES,)
    assert (wins == RACE_ROUNDS).all(), np.flatnonzero(wins != RACE_ROUNDS)[:10]
    assert bm.count() == RACE_PAGES


@pytest.mark.timeout(60)
def test_the_race_test_catches_an_update_that_is_not_atomic() -> None:
    """The same race with each claim split into a load and a store (the bug the test is named for):
    pages are won twice in a round, so the check above would fail. Proof that it can."""
    wins = _core._bench.bitmap_race_claims(PageBitmap(RACE_PAGES), RACE_THREADS, RACE_ROUNDS, split_rmw=True)
    assert (wins != RACE_ROUNDS).any() and wins.sum() > RACE_PAGES * RACE_ROUNDS


KERNELS = ["scalar", "avx2", "avx512"]


def _require(kernel: str) -> None:
    """Skips, saying why, when this CPU or build cannot run ``kernel`` (count_with would quietly
    run the scalar kernel instead, and the test would check that one twice)."""
    if not _core._bench.bitmap_kernel_available(kernel):
        pytest.skip(f"this CPU or build has no {kernel} count kernel (TSan builds run scalar only)")


def _bitmap_from_bits(size: int, bits: list[int]) -> PageBitmap:
    bm = PageBitmap(size)
    for i in bits:
        bm.set(i)
    return bm


@pytest.mark.parametrize("kernel", KERNELS)
@given(size=st.integers(0, 3000), data=st.data())
@settings(deadline=None, max_examples=200)
def test_count_kernels_match_the_model_on_odd_ranges(
    kernel: str, size: int, data: st.DataObject
) -> None:
    """Every count kernel this CPU runs agrees with the model on ranges whose
    ends are not word or vector aligned, tiny and empty ranges, and the tail word."""
    _require(kernel)
    dense = data.draw(st.booleans())
    most = size if dense else 40
    bits = data.draw(st.lists(st.integers(0, size - 1), max_size=most)) if size else []
    bm = _bitmap_from_bits(size, bits)
    model = ModelBitmap(size)
    for i in bits:
        model.bits |= 1 << i
    start = data.draw(st.integers(0, size))
    end = data.draw(st.one_of(st.integers(start, min(size, start + 130)), st.integers(start, size)))
    expect = model.count(start, end)
    assert _core._bench.bitmap_count_with(bm, start, end, kernel) == expect
    assert _core._bench.bitmap_count_with(bm, start, end, "auto") == expect == bm.count(start, end)


@pytest.mark.parametrize("kernel", KERNELS)
def test_count_kernels_on_every_alignment_of_a_dense_bitmap(kernel: str) -> None:
    """Every end near the start and near the tail, from starts around the 8-word vector and the
    32-word unrolled block, on random words."""
    _require(kernel)
    size = 3 * 4096 + 64 * 9 + 17
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**64, size=(size + 63) // 64, dtype=np.uint64)
    words[-1] &= np.uint64((1 << (size % 64)) - 1)
    bm = PageBitmap.from_bytes(size, words.tobytes()[: (size + 7) // 8])
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:size]
    prefix = np.concatenate([[0], np.cumsum(bits)])
    for start in (0, 1, 63, 64, 65, 511, 512, 513):
        for end in list(range(start, start + 200)) + list(range(size - 600, size + 1)):
            if start <= end <= size:
                got = _core._bench.bitmap_count_with(bm, start, end, kernel)
                assert got == prefix[end] - prefix[start], (start, end)


def test_the_auto_kernel_is_one_this_cpu_runs() -> None:
    assert _core._bench.bitmap_kernel_available("scalar")
    assert not _core._bench.bitmap_kernel_available("auto")
    with pytest.raises(ValueError, match="unknown count kernel"):
        _core._bench.bitmap_count_with(PageBitmap(8), 0, 8, "sse9")
