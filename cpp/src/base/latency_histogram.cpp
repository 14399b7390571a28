#include "livemig/base/latency_histogram.hpp"

#include <algorithm>

namespace livemig {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;

// The layout, checked where it is defined: contiguous buckets, each 1/64 of its lower bound wide at most.
static_assert(LatencyHistogram::index(127) == 127 && LatencyHistogram::index(128) == 128);
static_assert(LatencyHistogram::lower_ns(128) == 128 && LatencyHistogram::width_ns(128) == 2);
static_assert(LatencyHistogram::index(255) == 191 && LatencyHistogram::index(256) == 192);
static_assert(LatencyHistogram::lower_ns(LatencyHistogram::kBuckets - 1) + LatencyHistogram::width_ns(LatencyHistogram::kBuckets - 1) ==
              std::uint64_t{1} << LatencyHistogram::kMaxBits);
static_assert(LatencyHistogram::index(std::uint64_t{1} << 50) == LatencyHistogram::kBuckets - 1);
}  // namespace

void LatencyHistogram::record(std::uint64_t ns, std::uint64_t n) noexcept {
  if (n == 0) return;
  b_[index(ns)].fetch_add(n, kRelaxed);
  count_.fetch_add(n, kRelaxed);
  sum_ns_.fetch_add(ns * n, kRelaxed);
  if (ns > 1'000'000) over_1ms_.fetch_add(n, kRelaxed);
  if (ns > 10'000'000) over_10ms_.fetch_add(n, kRelaxed);
  std::uint64_t m = max_ns_.load(kRelaxed);
  while (ns > m && !max_ns_.compare_exchange_weak(m, ns, kRelaxed)) {
  }
}

LatencySnapshot LatencyHistogram::snapshot() const {
  LatencySnapshot s;
  s.buckets.resize(kBuckets);
  for (std::size_t i = 0; i < kBuckets; ++i) {
    s.buckets[i] = b_[i].load(kRelaxed);
    s.count += s.buckets[i];
  }
  s.sum_ns = sum_ns_.load(kRelaxed);
  s.max_ns = max_ns_.load(kRelaxed);
  s.over_1ms = over_1ms_.load(kRelaxed);
  s.over_10ms = over_10ms_.load(kRelaxed);
  return s;
}

void LatencyHistogram::reset() noexcept {
  for (auto& b : b_) b.store(0, kRelaxed);
  count_.store(0, kRelaxed);
  sum_ns_.store(0, kRelaxed);
  max_ns_.store(0, kRelaxed);
  over_1ms_.store(0, kRelaxed);
  over_10ms_.store(0, kRelaxed);
}

double LatencySnapshot::quantile_us(double q) const noexcept {
  if (count == 0 || buckets.empty()) return 0;
  auto target = static_cast<std::uint64_t>(q * static_cast<double>(count) + 0.999999);
  target = std::clamp<std::uint64_t>(target, 1, count);
  std::uint64_t cum = 0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    cum += buckets[i];
    if (cum >= target) {
      const double mid = static_cast<double>(LatencyHistogram::lower_ns(i)) +
                         (static_cast<double>(LatencyHistogram::width_ns(i)) - 1) / 2;
      return std::min(mid, static_cast<double>(max_ns)) / 1e3;
    }
  }
  return max_us();
}

}  // namespace livemig
