// Zero-page detection: an all-zero page travels as a header only.
#pragma once

#include <cstddef>

namespace livemig {

/// True when the `len` bytes at `p` are all zero. `len` must be a multiple of 64 (a page is).
/// Uses AVX-512 or AVX2 when the CPU has them (chosen once at start-up), 64-bit words otherwise;
/// a non-zero page is usually rejected within its first cache line.
bool is_zero(const void* p, std::size_t len) noexcept;

/// Name of the implementation is_zero uses on this CPU ("avx512", "avx2" or "scalar").
const char* is_zero_impl() noexcept;

}  // namespace livemig
