// The log-linear latency histogram: every value lands in the one bucket whose bounds hold it and
// that bucket is at most 1/64 of its value wide; quantiles come out within 0.8 % of the samples;
// threads recording at once lose no sample (the TSAN build runs this too).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "check.hpp"
#include "livemig/base/latency_histogram.hpp"

using livemig::LatencyHistogram;

namespace {

// Buckets tile [0, 2^40) ns without gaps or overlaps, and each holds exactly the values index() maps to it.
void layout() {
  std::uint64_t next = 0;
  for (std::size_t i = 0; i < LatencyHistogram::kBuckets; ++i) {
    const std::uint64_t lo = LatencyHistogram::lower_ns(i), w = LatencyHistogram::width_ns(i);
    CHECK(lo == next);
    CHECK(LatencyHistogram::index(lo) == i && LatencyHistogram::index(lo + w - 1) == i);
    if (lo >= 128) CHECK(w * 64 <= lo);  // relative width at most 1/64
    next = lo + w;
  }
  CHECK(next == std::uint64_t{1} << LatencyHistogram::kMaxBits);
  CHECK(LatencyHistogram::index(~std::uint64_t{0}) == LatencyHistogram::kBuckets - 1);
  std::mt19937_64 rng(5);
  for (int k = 0; k < 100000; ++k) {
    const std::uint64_t v = rng() >> (rng() % 64);
    const std::size_t i = LatencyHistogram::index(v);
    if (v < (std::uint64_t{1} << LatencyHistogram::kMaxBits))
      CHECK(LatencyHistogram::lower_ns(i) <= v && v < LatencyHistogram::lower_ns(i) + LatencyHistogram::width_ns(i));
  }
}

// Quantiles of log-uniform samples from 1 us to 1 s agree with the exact ones within 0.8 %; the
// counts over 1 ms and 10 ms, the sum and the max are exact.
void quantiles() {
  LatencyHistogram h;
  std::mt19937_64 rng(9);
  std::vector<std::uint64_t> v(200000);
  std::uint64_t sum = 0, over1 = 0, over10 = 0;
  for (auto& x : v) {
    x = static_cast<std::uint64_t>(std::exp(std::uniform_real_distribution<double>(std::log(1e3), std::log(1e9))(rng)));
    h.record(x);
    sum += x;
    over1 += x > 1'000'000;
    over10 += x > 10'000'000;
  }
  std::sort(v.begin(), v.end());
  const auto s = h.snapshot();
  CHECK(s.count == v.size() && s.sum_ns == sum && s.max_ns == v.back());
  CHECK(s.over_1ms == over1 && s.over_10ms == over10);
  for (double q : {0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0}) {
    const auto k = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size()))) - 1;
    const double exact = static_cast<double>(v[k]) / 1e3, got = s.quantile_us(q);
    CHECK(std::abs(got - exact) <= 0.008 * exact);
  }
  CHECK(s.quantile_us(1.0) <= s.max_us());
  h.reset();
  CHECK(h.snapshot().count == 0 && h.snapshot().quantile_us(0.5) == 0);
  h.record(5000, 3);  // three waiters of 5 us
  CHECK(h.snapshot().count == 3 && h.snapshot().sum_ns == 15000 && h.snapshot().quantile_us(0.5) == 5.0);
}

// Four threads record at once; every sample is counted once.
void concurrent_record() {
  LatencyHistogram h;
  constexpr int kThreads = 4, kEach = 100000;
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&h, t] {
      for (int i = 0; i < kEach; ++i) h.record(static_cast<std::uint64_t>(1000 + 7 * i + t));
    });
  for (auto& t : ts) t.join();
  const auto s = h.snapshot();
  CHECK(s.count == std::uint64_t{kThreads} * kEach);
  CHECK(s.max_ns == 1000 + 7 * (kEach - 1) + (kThreads - 1));
}

}  // namespace

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv, {{"layout", layout}, {"quantiles", quantiles}, {"concurrent_record", concurrent_record}});
}
