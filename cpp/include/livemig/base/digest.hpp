// Page digests for the generic oracle (docs/design.md rule 10): a 64-bit digest per page, computed
// in C++ on both sides of a migration and compared, so any workload can be verified byte for byte
// without Python touching a page.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig {

/// The digest table value of a page that holds nothing placed (never placed, or discarded).
inline constexpr std::uint64_t kNoDigest = 0;

/// A 64-bit digest of `len` bytes at `p` (len a multiple of 64); never kNoDigest. Eight independent
/// multiply-accumulate lanes over 64-byte stripes (AVX2 where the CPU has it, the same result
/// without), so it runs near memory speed: about 0.1 us for a 4 KiB page here.
std::uint64_t page_digest(const std::uint8_t* p, std::size_t len) noexcept;
/// The same digest without vector instructions (tests check the two agree).
std::uint64_t page_digest_scalar(const std::uint8_t* p, std::size_t len) noexcept;

/// Digests of pages [first, first + n) of the region at `base` (pages of `page_size` bytes) into
/// out[0 .. n).
void page_digests(const std::uint8_t* base, std::size_t page_size, std::uint64_t first, std::size_t n,
                  std::uint64_t* out) noexcept;

/// The outcome of comparing two digest tables of the same region.
struct DigestComparison {
  std::uint64_t compared = 0;    ///< pages compared
  std::uint64_t excepted = 0;    ///< pages skipped (marked in the exception set)
  std::uint64_t mismatches = 0;  ///< pages whose digests differ (missing pages included)
  std::uint64_t missing = 0;     ///< of those, pages the second table holds nothing for
  std::vector<std::uint64_t> first_mismatches;  ///< the first few mismatching pages, ascending
};

/// Compares `expected` (the source's pages) with `got` (the destination's), page by page, skipping
/// pages set in `excepted` (may be null; same size). std::invalid_argument when the sizes differ.
DigestComparison compare_digests(std::span<const std::uint64_t> expected, std::span<const std::uint64_t> got,
                                 const PageBitmap* excepted, std::size_t max_listed = 16);

}  // namespace livemig
