// Raw baselines for the source benchmarks (bench/bench_source.py), measured in the same run as the
// engine: the bare PAGEMAP_SCAN loop, a memory read loop, a page-touching writer. Not used by the engine.
#pragma once

#include <cstddef>
#include <cstdint>

namespace livemig::bench::source {

/// The bare harvest: PAGEMAP_SCAN with WP matching over [addr, addr + len), vec_len regions per
/// call, looping until the walk ends; returns the written pages found. Throws KernelError.
std::size_t pagemap_scan_loop(const void* addr, std::size_t len, std::size_t vec_len);
/// The bare form of a hint's tracking reset: one PAGEMAP_SCAN with WP matching and no output vector
/// per `chunk_pages` pages of [addr, addr + len); returns the number of calls. Throws KernelError.
std::size_t pagemap_reset_chunks(const void* addr, std::size_t len, std::size_t chunk_pages);
/// Reads every byte of [p, p + len) (len a multiple of 256) as fast as the CPU can; returns an
/// XOR of the data so the loop is not optimised away.
std::uint64_t read_bandwidth(const void* p, std::size_t len) noexcept;
/// Stores `value` to the first byte of every `stride`-th page of [p, p + npages pages).
void touch_pages(void* p, std::size_t npages, std::size_t stride, std::uint8_t value) noexcept;
/// Counts the all-zero pages of [p, p + npages pages) with livemig::is_zero.
std::size_t count_zero_pages(const void* p, std::size_t npages) noexcept;

}  // namespace livemig::bench::source
