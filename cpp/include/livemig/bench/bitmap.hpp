// Benchmark loops for the page bitmap: contended test-and-set against a plain read-modify-write,
// a find-next walk, and the bare locked-exchange loop that bounds a dense harvest. Not used by
// the engine; bound as livemig._core._bench.bitmap_*.
#pragma once

#include <cstddef>

#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig::bench::bitmap {

/// `threads` threads each do `ops` test_and_set calls over the same page sequence (so they contend
/// on every word); with `plain` the same loop does a non-atomic read-modify-write of a private copy
/// (what atomicity costs). Returns seconds. Throws std::invalid_argument for an empty bitmap or
/// threads < 1.
double test_and_set(PageBitmap& b, int threads, std::size_t ops, bool plain);
/// Walks every set (or clear) page with find_next; returns how many it found.
std::size_t find_walk(const PageBitmap& b, bool set);
/// One locked exchange per word over `words` non-zero words (the floor of a dense harvest's 8-byte
/// path); returns seconds.
double exchange_loop(std::size_t words);

}  // namespace livemig::bench::bitmap
