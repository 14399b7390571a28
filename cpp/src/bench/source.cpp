#include "livemig/base/page_size.hpp"
#include "livemig/bench/source.hpp"

#include <fcntl.h>
#include <immintrin.h>
#include <sys/ioctl.h>

#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/base/uapi.hpp"
#include "livemig/base/zero_page.hpp"

namespace livemig::bench::source {

std::size_t pagemap_scan_loop(const void* addr, std::size_t len, std::size_t vec_len) {
  static const UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) throw_errno("open", "/proc/self/pagemap");
  std::vector<page_region> vec(vec_len);
  const std::uint64_t start = reinterpret_cast<std::uintptr_t>(addr), end = start + len;
  std::uint64_t pos = start;
  std::uint64_t bytes = 0;
  while (pos < end) {
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.flags = PM_SCAN_WP_MATCHING;
    arg.start = pos;
    arg.end = end;
    arg.vec = reinterpret_cast<std::uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    // PAGEMAP_SCAN: the bare harvest-and-re-protect the engine's sync is compared against.
    const int n = ::ioctl(pagemap.get(), PAGEMAP_SCAN, &arg);
    if (n < 0) throw_errno("pagemap_scan", "baseline", pos);
    for (int i = 0; i < n; ++i) bytes += vec[static_cast<std::size_t>(i)].end - vec[static_cast<std::size_t>(i)].start;
    if (static_cast<std::size_t>(n) < vec.size() || arg.walk_end <= pos) break;
    pos = arg.walk_end;
  }
  return bytes / system_page_size();
}

std::size_t pagemap_reset_chunks(const void* addr, std::size_t len, std::size_t chunk_pages) {
  static const UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) throw_errno("open", "/proc/self/pagemap");
  const std::uint64_t start = reinterpret_cast<std::uintptr_t>(addr), end = start + len;
  const std::uint64_t step = chunk_pages * system_page_size();
  std::size_t calls = 0;
  for (std::uint64_t pos = start; pos < end; pos += step) {
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.flags = PM_SCAN_WP_MATCHING;
    arg.start = pos;
    arg.end = pos + step < end ? pos + step : end;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    // PAGEMAP_SCAN without an output vector: re-protect only, as a hint does.
    if (::ioctl(pagemap.get(), PAGEMAP_SCAN, &arg) < 0) throw_errno("pagemap_scan", "baseline reset", pos);
    ++calls;
  }
  return calls;
}

namespace {
__attribute__((target("avx512f"))) std::uint64_t read_avx512(const std::uint8_t* p, std::size_t len) noexcept {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  for (std::size_t off = 0; off + 256 <= len; off += 256) {
    const auto* v = reinterpret_cast<const __m512i*>(p + off);
    a = _mm512_xor_si512(a, _mm512_loadu_si512(v + 0));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(v + 1));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(v + 2));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(v + 3));
  }
  a = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
  alignas(64) std::uint64_t lanes[8];
  _mm512_store_si512(lanes, a);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3] ^ lanes[4] ^ lanes[5] ^ lanes[6] ^ lanes[7];
}
}  // namespace

std::uint64_t read_bandwidth(const void* p, std::size_t len) noexcept {
  const auto* b = static_cast<const std::uint8_t*>(p);
  if (__builtin_cpu_supports("avx512f")) return read_avx512(b, len);
  std::uint64_t acc = 0;
  for (std::size_t off = 0; off + 8 <= len; off += 8) {
    std::uint64_t w;
    __builtin_memcpy(&w, b + off, 8);
    acc ^= w;
  }
  return acc;
}

void touch_pages(void* p, std::size_t npages, std::size_t stride, std::uint8_t value) noexcept {
  auto* b = static_cast<volatile std::uint8_t*>(p);
  const std::size_t ps = system_page_size();
  for (std::size_t i = 0; i < npages; i += stride) b[i * ps] = value;
}

std::size_t count_zero_pages(const void* p, std::size_t npages) noexcept {
  const auto* b = static_cast<const std::uint8_t*>(p);
  const std::size_t ps = system_page_size();
  std::size_t n = 0;
  for (std::size_t i = 0; i < npages; ++i) n += is_zero(b + i * ps, ps) ? 1 : 0;
  return n;
}

}  // namespace livemig::bench::source
