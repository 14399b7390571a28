#include "livemig/base/digest.hpp"

#include <immintrin.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace livemig {
namespace {

// The digest: eight 64-bit accumulators over the page's 64-byte stripes. Each stripe word is mixed
// with a key word (the key slides one word per stripe, so the same data in another stripe counts
// differently), its two 32-bit halves multiplied into its own lane, and the raw word added to the
// neighbouring lane (so a word whose half is zero still counts). The lanes are independent, which
// is what lets a vector unit do a stripe in a handful of instructions; the scalar and AVX2 forms
// compute the same accumulators, so peers on different CPUs agree. Sums alone would not tell a
// change in one stripe from the same change 16 stripes on (the key repeats), so after every block
// of 16 stripes each lane is scrambled (shift-xor, key, multiply), which makes position count.
// A final mix folds the lanes.
constexpr int kLanes = 8;
constexpr int kKeyWords = 16;
// 24 words: the key, then its first 8 again, so a stripe's 8 key words are always contiguous.
constexpr std::uint64_t kKey[kKeyWords + kLanes] = {
    0xbe4ba423396cfeb8ULL, 0x1cad21f72c81017cULL, 0xdb979083e96dd4deULL, 0x1f67b3b7a4a44072ULL,
    0x78e5c0cc4ee679cbULL, 0x2172ffcc7dd05a82ULL, 0x8e2443f7744608b8ULL, 0x4c263a81e69035e0ULL,
    0xcb00c391bb52283cULL, 0xa32e531b8b65d088ULL, 0x4ef90da297486471ULL, 0xd8acdea946ef1938ULL,
    0x3f349ce33f76faa8ULL, 0x1d4f0bc7c7bbdcf9ULL, 0x3159b4cd4be0518aULL, 0x647378d9c97e9fc8ULL,
    0xbe4ba423396cfeb8ULL, 0x1cad21f72c81017cULL, 0xdb979083e96dd4deULL, 0x1f67b3b7a4a44072ULL,
    0x78e5c0cc4ee679cbULL, 0x2172ffcc7dd05a82ULL, 0x8e2443f7744608b8ULL, 0x4c263a81e69035e0ULL,
};
constexpr std::uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr std::uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr std::uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr std::uint64_t kScramble = 0x9E3779B1ULL;  // 32-bit, so a vector unit multiplies in two halves
constexpr std::size_t kBlockStripes = kKeyWords;

using Acc = std::uint64_t[kLanes];

void accumulate_scalar(Acc acc, const std::uint8_t* p, std::size_t len) noexcept {
  for (std::size_t s = 0; s * 64 < len; ++s) {
    const std::uint64_t* key = kKey + (s % kKeyWords);
    std::uint64_t w[kLanes];
    std::memcpy(w, p + s * 64, sizeof w);
    for (int i = 0; i < kLanes; ++i) {
      const std::uint64_t d = w[i] ^ key[i];
      acc[i] += (d & 0xFFFFFFFFULL) * (d >> 32);
      acc[i ^ 1] += w[i];
    }
    if ((s + 1) % kBlockStripes == 0) {
      for (int i = 0; i < kLanes; ++i) acc[i] = (acc[i] ^ (acc[i] >> 47) ^ kKey[i + 1]) * kScramble;
    }
  }
}

#if defined(__x86_64__)
// (a ^ a >> 47 ^ key) * kScramble per 64-bit element: the product's low 64 bits are
// lo(x) * k + (hi(x) * k << 32), as k fits in 32 bits.
__attribute__((target("avx2"))) inline __m256i scramble(__m256i a, __m256i key) noexcept {
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(a, _mm256_srli_epi64(a, 47)), key);
  const __m256i k = _mm256_set1_epi64x(static_cast<long long>(kScramble));
  const __m256i lo = _mm256_mul_epu32(x, k);
  const __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

__attribute__((target("avx2"))) void accumulate_avx2(Acc acc, const std::uint8_t* p, std::size_t len) noexcept {
  __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
  __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 4));
  for (std::size_t s = 0; s * 64 < len; ++s) {
    const std::uint64_t* key = kKey + (s % kKeyWords);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 64 + 32));
    const __m256i d0 = _mm256_xor_si256(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key)));
    const __m256i d1 = _mm256_xor_si256(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + 4)));
    // mul_epu32 multiplies the low 32 bits of each 64-bit element: lo(d) * hi(d).
    a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(d0, _mm256_srli_epi64(d0, 32)));
    a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(d1, _mm256_srli_epi64(d1, 32)));
    // Lane i ^ 1 gets word i: swap the 64-bit elements within each 128-bit half.
    a0 = _mm256_add_epi64(a0, _mm256_shuffle_epi32(w0, _MM_SHUFFLE(1, 0, 3, 2)));
    a1 = _mm256_add_epi64(a1, _mm256_shuffle_epi32(w1, _MM_SHUFFLE(1, 0, 3, 2)));
    if ((s + 1) % kBlockStripes == 0) {
      a0 = scramble(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kKey + 1)));
      a1 = scramble(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kKey + 5)));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
}
#endif

using AccumulateFn = void (*)(Acc, const std::uint8_t*, std::size_t) noexcept;

AccumulateFn choose() noexcept {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return accumulate_avx2;
#endif
  return accumulate_scalar;
}

std::uint64_t fold(const Acc acc, std::size_t len) noexcept {
  std::uint64_t h = len * kP1;
  for (int i = 0; i < kLanes; ++i) {
    std::uint64_t x = acc[i] ^ kKey[kLanes + i];
    x ^= x >> 29;
    x *= kP2;
    h = (h ^ x) * kP1 + kP3;
  }
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

std::uint64_t digest_with(AccumulateFn fn, const std::uint8_t* p, std::size_t len) noexcept {
  Acc acc = {kP3, kP1, kP2, kP1 ^ kP2, kP3 ^ kP1, kP2 + kP3, kP1 + kP2, kP3};
  fn(acc, p, len);
  const std::uint64_t h = fold(acc, len);
  return h == kNoDigest ? 1 : h;
}

}  // namespace

std::uint64_t page_digest(const std::uint8_t* p, std::size_t len) noexcept {
  static const AccumulateFn fn = choose();
  return digest_with(fn, p, len);
}

std::uint64_t page_digest_scalar(const std::uint8_t* p, std::size_t len) noexcept {
  return digest_with(accumulate_scalar, p, len);
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
