#include "livemig/base/digest.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

namespace livemig {
namespace {

// XXH64's primes and round: each lane multiplies, rotates and multiplies again, so one flipped bit
// reaches every bit of its lane, and the four lanes run independently (the CPU overlaps them).
constexpr std::uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr std::uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr std::uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr std::uint64_t kP4 = 0x85EBCA77C2B2AE63ULL;

constexpr std::uint64_t rotl(std::uint64_t x, int r) noexcept { return (x << r) | (x >> (64 - r)); }
constexpr std::uint64_t round(std::uint64_t acc, std::uint64_t w) noexcept { return rotl(acc + w * kP2, 31) * kP1; }
constexpr std::uint64_t merge(std::uint64_t acc, std::uint64_t lane) noexcept {
  return (acc ^ round(0, lane)) * kP1 + kP4;
}
inline std::uint64_t load64(const std::uint8_t* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

std::uint64_t page_digest(const std::uint8_t* p, std::size_t len) noexcept {
  std::uint64_t a = kP1 + kP2, b = kP2, c = 0, d = 0 - kP1;
  for (std::size_t i = 0; i + 32 <= len; i += 32) {
    a = round(a, load64(p + i));
    b = round(b, load64(p + i + 8));
    c = round(c, load64(p + i + 16));
    d = round(d, load64(p + i + 24));
  }
  std::uint64_t h = rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18);
  h = merge(h, a);
  h = merge(h, b);
  h = merge(h, c);
  h = merge(h, d);
  h += len;
  // Final avalanche.
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h == kNoDigest ? 1 : h;
}

void page_digests(const std::uint8_t* base, std::size_t page_size, std::uint64_t first, std::size_t n,
                  std::uint64_t* out) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = page_digest(base + (first + i) * page_size, page_size);
}

DigestComparison compare_digests(std::span<const std::uint64_t> expected, std::span<const std::uint64_t> got,
                                 const PageBitmap* excepted, std::size_t max_listed) {
  if (expected.size() != got.size())
    throw std::invalid_argument("digest tables differ in size: " + std::to_string(expected.size()) + " and " +
                                std::to_string(got.size()) + " pages");
  if (excepted != nullptr && excepted->size() != expected.size())
    throw std::invalid_argument("the exception set has " + std::to_string(excepted->size()) + " pages, the tables " +
                                std::to_string(expected.size()));
  DigestComparison r;
  for (std::size_t p = 0; p < expected.size(); ++p) {
    if (excepted != nullptr && excepted->test(p)) {
      ++r.excepted;
      continue;
    }
    ++r.compared;
    if (expected[p] == got[p]) continue;
    ++r.mismatches;
    if (got[p] == kNoDigest) ++r.missing;
    if (r.first_mismatches.size() < max_listed) r.first_mismatches.push_back(p);
  }
  return r;
}

}  // namespace livemig
