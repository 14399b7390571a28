// Benchmark support for the destination: raw userfaultfd baselines (a plain UFFDIO_COPY loop, a
// minimal fault handler) and C++ loops that drive DestRegion without Python in the timed part.
// Not part of the engine's API; bound as livemig._core._bench.dest_*.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "livemig/dest/region.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/base/userfaultfd.hpp"

namespace livemig::bench::dest {

/// Steady-clock nanoseconds.
std::uint64_t now_ns() noexcept;

/// Raw baseline: an anonymous region registered MISSING on a bare userfaultfd (no features) and a
/// warm source buffer; run() fills the region with UFFDIO_COPY, `run_pages` pages per ioctl.
class RawCopy {
 public:
  explicit RawCopy(std::size_t bytes);
  ~RawCopy();
  /// Seconds to place the whole region; then drops it again (not timed).
  double run(std::size_t run_pages);
  const std::uint8_t* src() const noexcept { return src_.data(); }
  std::uint8_t* region() const noexcept { return region_.data(); }
  std::size_t bytes() const noexcept { return region_.size(); }

 private:
  Mapping region_, src_;
  Userfaultfd uffd_;
};

/// Seconds for DestRegion::place() over the whole region, `run_pages` per call, from `src`.
double engine_place(DestRegion& r, const std::uint8_t* src, std::size_t run_pages);

/// A staged receive: per run, memcpy `run_pages` pages from `wire` into an anonymous staging buffer
/// (what a socket read does), then place them with UFFDIO_COPY (move=false) or UFFDIO_MOVE. Moving
/// leaves holes, so the next fill touches fresh pages: that cost is in fill_s.
struct StagedTimes {
  double fill_s = 0;
  double place_s = 0;
  std::size_t pages = 0;
};
StagedTimes staged_place(DestRegion& r, const std::uint8_t* wire, std::size_t run_pages, bool move);

/// Reads one byte of each of `npages` pages from `base` in order; returns each read's latency (ns).
std::vector<std::uint64_t> touch_pages(const std::uint8_t* base, std::size_t npages);

/// Test support: one thread per row of `pages` (rows x cols page numbers), each reading byte 0 of
/// its pages in order; returns the bytes read, row-major.
std::vector<std::uint8_t> touch_threads(const std::uint8_t* base, const std::uint64_t* pages, std::size_t rows,
                                        std::size_t cols);

/// A request sink that places requested pages at once from a source buffer, on the fault thread
/// (the fault round trip without a network).
class LoopbackSink final : public RequestSink {
 public:
  LoopbackSink(DestRegion* region, const std::uint8_t* src) noexcept : region_(region), src_(src) {}
  void request(std::uint64_t first_page, std::uint32_t npages) noexcept override;

 private:
  DestRegion* region_;
  const std::uint8_t* src_;
};

/// Raw baseline for the fault round trip: an anonymous region on a bare userfaultfd and a handler
/// thread that blocks in poll(), reads one event and UFFDIO_COPYs the page from a warm source.
class RawHandler {
 public:
  explicit RawHandler(std::size_t bytes);
  ~RawHandler();
  /// Touches every page once (faults, each resolved by the handler); latencies in ns. Then drops
  /// the region again (not timed).
  std::vector<std::uint64_t> round_trips();
  std::size_t pages() const noexcept;

 private:
  void loop() noexcept;
  Mapping region_, src_;
  Userfaultfd uffd_;
  UniqueFd stop_;
  std::thread th_;
};

}  // namespace livemig::bench::dest
