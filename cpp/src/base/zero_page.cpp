#include "livemig/base/zero_page.hpp"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace livemig {
namespace {

using ZeroFn = bool (*)(const std::uint8_t*, std::size_t) noexcept;

// Guest memory is read while the guest may write it: by design (a page written during the read is
// dirty again and will be sent again), so these reads are exempt from ThreadSanitizer.
#define LIVEMIG_GUEST_READ __attribute__((no_sanitize("thread")))

LIVEMIG_GUEST_READ bool first_line_zero(const std::uint8_t* p) noexcept {
  std::uint64_t w[8];
  std::memcpy(w, p, sizeof w);
  return (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) == 0;
}

LIVEMIG_GUEST_READ bool zero_scalar(const std::uint8_t* p, std::size_t len) noexcept {
  for (std::size_t off = 0; off < len; off += 64)
    if (!first_line_zero(p + off)) return false;
  return true;
}

LIVEMIG_GUEST_READ __attribute__((target("avx2"))) bool zero_avx2(const std::uint8_t* p, std::size_t len) noexcept {
  if (!first_line_zero(p)) return false;
  // 256 bytes an iteration: OR eight vectors, one test.
  std::size_t off = 64;
  for (; off + 256 <= len; off += 256) {
    const auto* v = reinterpret_cast<const __m256i*>(p + off);
    __m256i a = _mm256_or_si256(_mm256_loadu_si256(v + 0), _mm256_loadu_si256(v + 1));
    __m256i b = _mm256_or_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3));
    __m256i c = _mm256_or_si256(_mm256_loadu_si256(v + 4), _mm256_loadu_si256(v + 5));
    __m256i d = _mm256_or_si256(_mm256_loadu_si256(v + 6), _mm256_loadu_si256(v + 7));
    a = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    if (!_mm256_testz_si256(a, a)) return false;
  }
  return zero_scalar(p + off, len - off);
}

LIVEMIG_GUEST_READ __attribute__((target("avx512f"))) bool zero_avx512(const std::uint8_t* p, std::size_t len) noexcept {
  // The first line alone: a non-zero page is usually rejected after one load.
  const __m512i first = _mm512_loadu_si512(p);
  if (_mm512_test_epi64_mask(first, first) != 0) return false;
  std::size_t off = 64;
  // Then up to the next 512-byte boundary of the page in 64-byte steps, and 512 bytes an
  // iteration after that: eight loads OR-ed as a tree, one test (a branch per 512 bytes keeps the
  // body at the read bandwidth while still stopping early on a non-zero page).
  for (; off < len && (off & 511) != 0; off += 64) {
    const __m512i v = _mm512_loadu_si512(p + off);
    if (_mm512_test_epi64_mask(v, v) != 0) return false;
  }
  for (; off + 512 <= len; off += 512) {
    const auto* v = reinterpret_cast<const __m512i*>(p + off);
    const __m512i a = _mm512_or_si512(_mm512_loadu_si512(v + 0), _mm512_loadu_si512(v + 1));
    const __m512i b = _mm512_or_si512(_mm512_loadu_si512(v + 2), _mm512_loadu_si512(v + 3));
    const __m512i c = _mm512_or_si512(_mm512_loadu_si512(v + 4), _mm512_loadu_si512(v + 5));
    const __m512i d = _mm512_or_si512(_mm512_loadu_si512(v + 6), _mm512_loadu_si512(v + 7));
    const __m512i x = _mm512_or_si512(_mm512_or_si512(a, b), _mm512_or_si512(c, d));
    if (_mm512_test_epi64_mask(x, x) != 0) return false;
  }
  return zero_scalar(p + off, len - off);
}

struct Impl {
  ZeroFn fn;
  const char* name;
};

Impl choose() noexcept {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {zero_avx512, "avx512"};
  if (__builtin_cpu_supports("avx2")) return {zero_avx2, "avx2"};
#endif
  return {zero_scalar, "scalar"};
}

const Impl& impl() noexcept {
  static const Impl chosen = choose();
  return chosen;
}

}  // namespace

bool is_zero(const void* p, std::size_t len) noexcept { return impl().fn(static_cast<const std::uint8_t*>(p), len); }

const char* is_zero_impl() noexcept { return impl().name; }

}  // namespace livemig
