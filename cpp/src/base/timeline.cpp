#include "livemig/base/timeline.hpp"

#include <chrono>
#include <cmath>
#include <stdexcept>

namespace livemig {

namespace {

std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr std::size_t kMaxBins = std::size_t{1} << 24;

}  // namespace

Timeline::Timeline(double bin_seconds, std::size_t bins) : bin_ns_(0), nbins_(bins) {
  if (!(bin_seconds > 0) || !std::isfinite(bin_seconds) || bin_seconds * 1e9 < 1)
    throw std::invalid_argument("timeline bins must be at least a nanosecond wide");
  if (bins == 0 || bins > kMaxBins) throw std::invalid_argument("a timeline holds 1 to 2^24 bins");
  bin_ns_ = static_cast<std::int64_t>(bin_seconds * 1e9);
  bins_ = std::make_unique<std::atomic<std::uint64_t>[]>(bins * kSeries);  // value-initialised: zero
}

void Timeline::start() noexcept {
  std::int64_t unset = -1;
  t0_ns_.compare_exchange_strong(unset, now_ns(), std::memory_order_relaxed);
}

std::int64_t Timeline::bin_now() noexcept {
  const std::int64_t t0 = t0_ns_.load(std::memory_order_relaxed);
  if (t0 < 0) return -1;
  const std::int64_t dt = now_ns() - t0;
  std::int64_t bin = dt < 0 ? 0 : dt / bin_ns_;
  if (bin >= static_cast<std::int64_t>(nbins_)) {
    bin = static_cast<std::int64_t>(nbins_) - 1;
    overflowed_.store(true, std::memory_order_relaxed);
  }
  return bin;
}

void Timeline::note_used(std::size_t bin) noexcept {
  std::size_t used = used_.load(std::memory_order_relaxed);
  while (bin + 1 > used && !used_.compare_exchange_weak(used, bin + 1, std::memory_order_relaxed)) {
  }
}

void Timeline::add(Series s, std::uint64_t n) noexcept {
  if (n == 0 || s >= kSeries || s == kLeftPages) return;
  const std::int64_t bin = bin_now();
  if (bin < 0) return;
  const auto b = static_cast<std::size_t>(bin);
  bins_[b * kSeries + s].fetch_add(n, std::memory_order_relaxed);
  totals_[s].fetch_add(n, std::memory_order_relaxed);
  note_used(b);
}

bool Timeline::due(Series s) noexcept {
  if (s >= kSeries) return false;
  const std::int64_t bin = bin_now();
  if (bin < 0) return false;
  std::int64_t last = sampled_bin_[s].load(std::memory_order_relaxed);
  // The first caller to move the claim to this bin samples; the others see it claimed.
  while (last != bin + 1) {
    if (sampled_bin_[s].compare_exchange_weak(last, bin + 1, std::memory_order_relaxed)) return true;
  }
  return false;
}

void Timeline::level(Series s, std::uint64_t v) noexcept {
  if (s >= kSeries) return;
  const std::int64_t bin = bin_now();
  if (bin < 0) return;
  const auto b = static_cast<std::size_t>(bin);
  bins_[b * kSeries + s].store(v + 1, std::memory_order_relaxed);  // 0 means "no sample"
  totals_[s].store(v, std::memory_order_relaxed);                  // a level's total: the latest
  note_used(b);
}

std::vector<std::uint64_t> Timeline::series(Series s) const {
  if (s >= kSeries) throw std::out_of_range("no such timeline series");
  const std::size_t used = used_.load(std::memory_order_relaxed);
  std::vector<std::uint64_t> out(used);
  std::uint64_t carried = 0;
  for (std::size_t b = 0; b < used; ++b) {
    const std::uint64_t v = bins_[b * kSeries + s].load(std::memory_order_relaxed);
    if (s != kLeftPages) {
      out[b] = v;
    } else {
      if (v != 0) carried = v - 1;
      out[b] = carried;
    }
  }
  return out;
}

double Timeline::started_at() const noexcept {
  const std::int64_t t0 = t0_ns_.load(std::memory_order_relaxed);
  return t0 < 0 ? 0.0 : static_cast<double>(t0) / 1e9;
}

}  // namespace livemig
