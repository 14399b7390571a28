// A latency histogram with log-linear buckets (the layout of HdrHistogram): exact to the
// nanosecond below 128 ns, then every power of two split into 64 equal buckets, so a bucket is at
// most 1/64 (1.6 %) of its lower bound wide from 128 ns to 2^40 ns (18 minutes; longer samples
// land in the last bucket). Fixed memory (2240 counters, 18 KiB), no allocation when recording,
// lock-free: record() is a handful of relaxed atomic adds, safe from any number of threads.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace livemig {

/// A copy of a histogram's counters, consistent enough for reports (see LatencyHistogram::snapshot).
struct LatencySnapshot {
  std::vector<std::uint64_t> buckets;  ///< LatencyHistogram::kBuckets counts
  std::uint64_t count = 0;             ///< samples
  std::uint64_t sum_ns = 0;            ///< their sum
  std::uint64_t max_ns = 0;            ///< the longest
  std::uint64_t over_1ms = 0;          ///< samples longer than 1 ms (exact, not from buckets)
  std::uint64_t over_10ms = 0;         ///< samples longer than 10 ms (exact)
  /// The value at quantile q (0 < q <= 1) in us: the middle of the bucket holding it (within 0.8 %
  /// of any sample in that bucket), never above max; 0 when empty.
  double quantile_us(double q) const noexcept;
  double max_us() const noexcept { return static_cast<double>(max_ns) / 1e3; }
  double sum_us() const noexcept { return static_cast<double>(sum_ns) / 1e3; }
};

class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 6;                    // 64 buckets per power of two
  static constexpr std::uint64_t kSub = std::uint64_t{1} << kSubBits;
  static constexpr unsigned kMaxBits = 40;                   // samples up to 2^40 ns
  static constexpr std::size_t kBuckets = (kMaxBits - kSubBits + 1) * kSub;

  /// The bucket holding `ns` (samples of 2^40 ns or more: the last).
  static constexpr std::size_t index(std::uint64_t ns) noexcept {
    if (ns < 2 * kSub) return static_cast<std::size_t>(ns);
    if (ns >= (std::uint64_t{1} << kMaxBits)) ns = (std::uint64_t{1} << kMaxBits) - 1;
    const auto e = static_cast<unsigned>(std::bit_width(ns)) - 1;  // floor(log2(ns)) >= kSubBits + 1
    return static_cast<std::size_t>((e - kSubBits) * kSub + (ns >> (e - kSubBits)));
  }
  /// Bucket i holds samples in [lower_ns(i), lower_ns(i) + width_ns(i)).
  static constexpr std::uint64_t lower_ns(std::size_t i) noexcept {
    if (i < 2 * kSub) return i;
    const std::uint64_t shift = i / kSub - 1;
    return (kSub + i % kSub) << shift;
  }
  static constexpr std::uint64_t width_ns(std::size_t i) noexcept {
    return i < 2 * kSub ? 1 : std::uint64_t{1} << (i / kSub - 1);
  }

  /// Records `n` samples of `ns` nanoseconds each.
  void record(std::uint64_t ns, std::uint64_t n = 1) noexcept;
  /// Number of samples so far.
  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  /// A copy of the counters. Taken while others record, each counter is exact but they may be
  /// from instants a few samples apart (count is then recomputed from the buckets).
  LatencySnapshot snapshot() const;
  /// Clears every counter (not atomic against concurrent record()).
  void reset() noexcept;

 private:
  std::array<std::atomic<std::uint64_t>, kBuckets> b_{};
  std::atomic<std::uint64_t> count_{0}, sum_ns_{0}, max_ns_{0}, over_1ms_{0}, over_10ms_{0};
};

}  // namespace livemig
