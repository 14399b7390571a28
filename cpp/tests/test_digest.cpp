// The page digest: the vector and scalar forms agree on every input (peers on different CPUs
// compare digests), every flipped bit and every swapped stripe changes it, it never equals
// kNoDigest, and its values are pinned (a change is a protocol change: peers compare digests).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.hpp"
#include "livemig/base/digest.hpp"

using livemig::page_digest;
using livemig::page_digest_scalar;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kZeroPage = 0x91aee652836ec320ULL;
constexpr std::uint64_t kCountingPage = 0x5a5b671e5a2aff7aULL;

std::vector<std::uint8_t> random_page(std::uint32_t seed, std::size_t len = kPage) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> p(len);
  for (auto& b : p) b = static_cast<std::uint8_t>(rng());
  return p;
}

// Random pages, pages of one repeated byte and pages of 2^k sizes: both forms give the same value.
void vector_matches_scalar() {
  for (std::uint32_t seed = 0; seed < 200; ++seed) {
    const auto p = random_page(seed);
    CHECK(page_digest(p.data(), p.size()) == page_digest_scalar(p.data(), p.size()));
  }
  for (int v = 0; v < 256; ++v) {
    const std::vector<std::uint8_t> p(kPage, static_cast<std::uint8_t>(v));
    CHECK(page_digest(p.data(), p.size()) == page_digest_scalar(p.data(), p.size()));
  }
  for (std::size_t len = 64; len <= 2 * 1024 * 1024; len *= 2) {
    const auto p = random_page(static_cast<std::uint32_t>(len), len);
    CHECK(page_digest(p.data(), len) == page_digest_scalar(p.data(), len));
  }
}

// Each of the page's 32768 bits, flipped alone, gives a digest unlike the original and unlike
// every other single flip of the same page (no two single-bit errors cancel).
void every_bit_counts() {
  for (const std::uint32_t seed : {1u, 2u}) {
    auto p = seed == 1 ? std::vector<std::uint8_t>(kPage, 0) : random_page(seed);
    const std::uint64_t orig = page_digest(p.data(), kPage);
    std::vector<std::uint64_t> seen;
    seen.reserve(kPage * 8);
    for (std::size_t bit = 0; bit < kPage * 8; ++bit) {
      p[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
      const std::uint64_t d = page_digest(p.data(), kPage);
      CHECK(d != orig);
      CHECK(d != livemig::kNoDigest);
      seen.push_back(d);
      p[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
    }
    std::sort(seen.begin(), seen.end());
    CHECK(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
  }
}

// Moving data changes the digest: two 64-byte stripes swapped, two words of one stripe swapped,
// and a page rotated by a word all differ from the original.
void order_counts() {
  const auto p = random_page(7);
  const std::uint64_t orig = page_digest(p.data(), kPage);
  auto swapped = p;
  std::swap_ranges(swapped.begin(), swapped.begin() + 64, swapped.begin() + 64 * 17);
  CHECK(page_digest(swapped.data(), kPage) != orig);
  auto words = p;
  std::swap_ranges(words.begin(), words.begin() + 8, words.begin() + 8);
  CHECK(page_digest(words.data(), kPage) != orig);
  auto rotated = p;
  std::rotate(rotated.begin(), rotated.begin() + 8, rotated.end());
  CHECK(page_digest(rotated.data(), kPage) != orig);
}

// Pinned values: the zero page and a counting page. A change here changes what peers compare.
void pinned_values() {
  const std::vector<std::uint8_t> zero(kPage, 0);
  std::vector<std::uint8_t> counting(kPage);
  for (std::size_t i = 0; i < kPage; ++i) counting[i] = static_cast<std::uint8_t>(i * 7 + 3);
  const std::uint64_t z = page_digest(zero.data(), kPage);
  const std::uint64_t c = page_digest(counting.data(), kPage);
  std::printf("zero page %#018llx, counting page %#018llx\n", static_cast<unsigned long long>(z),
              static_cast<unsigned long long>(c));
  CHECK(z == kZeroPage);
  CHECK(c == kCountingPage);
}

}  // namespace

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"vector_matches_scalar", vector_matches_scalar},
                             {"every_bit_counts", every_bit_counts},
                             {"order_counts", order_counts},
                             {"pinned_values", pinned_values}});
}
