// Timeline: what happens during a migration, in bins of fixed width from a start time (postcopy:
// requests from the destination, pages served for them, pages pushed, and the pages still to
// send as a level sampled once per bin). Adds are lock-free from any thread and cost a clock read
// and a few relaxed atomic adds; the bins are read once the migration is over (the picture of the
// postcopy), the totals live.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace livemig {

class Timeline {
 public:
  enum Series : std::size_t {
    kRequests = 0,       ///< page requests read from the destination (served or queued)
    kRequestPages = 1,   ///< pages taken to answer requests
    kPushPages = 2,      ///< pages taken by the background scan
    kLeftPages = 3,      ///< a level, not a count: dirty pages (still to send) when sampled
    kSeries = 4,
  };

  /// `bins` bins of `bin_seconds` each (std::invalid_argument unless both are positive and the
  /// bins hold at most 2^24 bins). Adds before start() are not counted; past the last bin they
  /// land in the last one (overflowed() then says so).
  Timeline(double bin_seconds, std::size_t bins);
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  /// Starts the clock now (steady clock); a second call is ignored.
  void start() noexcept;
  /// Adds `n` to series `s` in the bin of the current time. Any thread, lock-free.
  void add(Series s, std::uint64_t n) noexcept;
  /// True once per bin and series, for the first caller in the current bin: it then samples the
  /// level and hands it to level(). False before start().
  bool due(Series s) noexcept;
  /// Records `v` as series `s`'s level in the current bin.
  void level(Series s, std::uint64_t v) noexcept;
  /// Series `s` bin by bin, up to the last bin anything was added to (a level series: carried
  /// forward through bins without a sample, 0 before the first).
  std::vector<std::uint64_t> series(Series s) const;
  /// Everything added to series `s` so far (a level series: its latest sample).
  std::uint64_t total(Series s) const noexcept { return totals_[s].load(std::memory_order_relaxed); }
  double bin_seconds() const noexcept { return static_cast<double>(bin_ns_) / 1e9; }
  std::size_t capacity() const noexcept { return nbins_; }
  /// When start() ran: steady-clock seconds (time.perf_counter()'s clock), 0 before.
  double started_at() const noexcept;
  /// Something was added after the last bin's time.
  bool overflowed() const noexcept { return overflowed_.load(std::memory_order_relaxed); }

 private:
  std::int64_t bin_ns_;
  std::size_t nbins_;
  std::int64_t bin_now() noexcept;  // the current bin (clamped, overflow noted); -1 before start()
  void note_used(std::size_t bin) noexcept;

  std::atomic<std::int64_t> t0_ns_{-1};
  std::array<std::atomic<std::int64_t>, kSeries> sampled_bin_{};  // due(): the last bin claimed, + 1
  std::unique_ptr<std::atomic<std::uint64_t>[]> bins_;  // bin-major: bins_[bin * kSeries + series]
  std::array<std::atomic<std::uint64_t>, kSeries> totals_{};
  std::atomic<std::size_t> used_{0};  // bins up to the last one added to
  std::atomic<bool> overflowed_{false};
};

}  // namespace livemig
