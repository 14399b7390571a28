// Benchmark loops for the page bitmap: contended test-and-set against a plain read-modify-write,
// a find-next walk, and the bare locked-exchange loop that bounds a dense harvest. Not used by
// the engine; bound as livemig._core._bench.bitmap_*.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig::bench::bitmap {

/// `threads` threads each do `ops` test_and_set calls over the same page sequence (so they contend
/// on every word); with `plain` the same loop does a non-atomic read-modify-write of a private copy
/// (what atomicity costs). Returns seconds. Throws std::invalid_argument for an empty bitmap or
/// threads < 1.
double test_and_set(PageBitmap& b, int threads, std::size_t ops, bool plain);
/// The race test's body, run by real threads (no interpreter lock in the way): in each of `rounds`
/// rounds, `threads` threads released together by a barrier claim every page of `b` with
/// test_and_set, in orders that collide (even threads forwards, odd ones backwards, each from its
/// own offset); then `b` is cleared for the next round. Returns, per page, how many claims won it
/// over all rounds: `rounds` each when test_and_set is atomic. With `split_rmw` each claim is a
/// separate load and store of the word instead (both atomic, so no undefined behaviour, but not
/// one read-modify-write), with a yield between them now and then (a preemption there, so the race
/// shows even where the threads share few cores): the broken implementation the race test must
/// catch, where two threads win one page, or one's store undoes another's claim. Throws std::invalid_argument for an
/// empty bitmap, threads < 2 or rounds < 1.
std::vector<std::uint32_t> race_claims(PageBitmap& b, int threads, int rounds, bool split_rmw);
/// Walks every set (or clear) page with find_next; returns how many it found.
std::size_t find_walk(const PageBitmap& b, bool set);
/// One locked exchange per word over `words` non-zero words (the floor of a dense harvest's 8-byte
/// path); returns seconds.
double exchange_loop(std::size_t words);

}  // namespace livemig::bench::bitmap
