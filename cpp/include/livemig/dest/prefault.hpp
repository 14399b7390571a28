// The destination's prefault: makes the region's memory warm (populated, written once by the
// kernel) ahead of the precopy receivers, from several threads, so a receiver's copy lands in
// memory that is already there instead of paying the first touch of every page (fault, zeroing,
// and on a VM the host backing the page) on its own thread.
//
// How much pays off is measured at run time, not fixed: start() first calibrates on the region's
// tail (the pages the receivers reach last), populating equal slices from 1, 2, 4 ... threads,
// twice over (the better sample of each count counts), and keeping the smallest count within 10%
// of the best rate; then that many threads populate the
// region in chunks from the front, in the order pages arrive. The receivers say where they are
// (arrived()); a thread that finds its chunk already behind them jumps ahead of them by a
// distance taken from the two measured rates (how far the receivers move while a thread
// populates one chunk), so the prefault never works behind the receivers; and as the receivers
// caught up, what runs does not keep ahead of them on this machine now: the jumping thread adds
// one more (up to the most allowed). The calibration sees the machine before the migration
// loads it; the jumps see it under load.
//
// Correctness: populating never changes a page's content (a present page is left as it is; a
// missing one becomes a zero page), so precopy is unaffected. Postcopy needs every page not
// received to be missing: DestRegion::settle_prefault() stops the threads and drops such pages
// again before the region is registered (docs/performance.md, "The first-touch wall").
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig {

/// What the prefault may use. 0 means "choose".
struct PrefaultOptions {
  unsigned max_threads = 0;     ///< most threads tried (0: 2 x hardware threads, at least 2, at most 8)
  std::size_t chunk_bytes = 0;  ///< bytes per MADV_POPULATE_WRITE call (0: 2 MiB)
};

/// What the prefault did (a snapshot; any thread).
struct PrefaultStats {
  unsigned threads = 0;              ///< threads chosen by the calibration (0 before it ended)
  unsigned added_threads = 0;        ///< threads added later because the receivers caught up
  std::vector<unsigned> tried;       ///< thread counts the calibration tried, in order (two passes)
  std::vector<double> tried_gbps;    ///< the rate each reached (GB/s)
  std::uint64_t lead_pages = 0;      ///< the distance ahead of the receivers a jump lands (last one)
  std::uint64_t populated_pages = 0; ///< pages the prefault populated (calibration included)
  std::uint64_t skipped_pages = 0;   ///< pages the receivers reached first (never populated here)
  std::uint64_t jumps = 0;           ///< times a thread jumped ahead of the receivers
  std::uint64_t dropped_pages = 0;   ///< populated pages made missing again (not received at settle)
  double seconds = 0;                ///< from start() until the last chunk (or stop())
  bool finished = false;             ///< every chunk was populated or skipped
  bool stopped = false;              ///< stop() ended it
  bool failed = false;               ///< the kernel refused MADV_POPULATE_WRITE (older than 5.14, out of memory)
};

class Prefault {
 public:
  /// Over `bytes` of mapped memory at `base` (page-aligned, pages of `page_size`); nothing runs
  /// until start(). The memory must stay mapped until stop() returned (the destructor stops).
  Prefault(std::uint8_t* base, std::size_t bytes, std::size_t page_size, PrefaultOptions opts = {});
  Prefault(const Prefault&) = delete;
  Prefault& operator=(const Prefault&) = delete;
  /// Stops and joins.
  ~Prefault();

  /// Starts the calibration and the populating threads (returns at once). Once only.
  void start();
  /// Receivers: pages [first, first + n) were just written. Any thread, lock-free, cheap.
  void arrived(std::uint64_t first, std::size_t n) noexcept {
    const std::uint64_t end = first + n;
    std::uint64_t cur = front_.load(std::memory_order_relaxed);
    while (end > cur && !front_.compare_exchange_weak(cur, end, std::memory_order_relaxed)) {
    }
  }
  /// Asks the threads to end (each finishes the chunk it is on) without waiting for them: for a
  /// caller inside the downtime. Any thread.
  void request_stop() noexcept { stop_.store(true, std::memory_order_release); }
  /// Stops the threads (each finishes the chunk it is on) and joins them. Idempotent; any one
  /// controlling thread.
  void stop() noexcept;
  /// One bit per chunk the prefault populated (whole or in part). Read it after stop().
  const PageBitmap& populated_chunks() const noexcept { return chunks_; }
  /// Pages per chunk.
  std::size_t chunk_pages() const noexcept { return chunk_pages_; }
  /// Records pages made missing again (settle).
  void note_dropped(std::uint64_t pages) noexcept { dropped_.fetch_add(pages, std::memory_order_relaxed); }
  /// A snapshot of what it did.
  PrefaultStats stats() const;

 private:
  // The lead thread: calibrates, then runs the chosen number of workers and joins them.
  void run_lead() noexcept;
  // A worker: takes chunks from the front until none is left or stop.
  void populate_loop() noexcept;
  // Populates pages [from, to) of chunk `c`; false when the kernel refused (the prefault then
  // ends: the receivers fault pages in as before).
  bool populate(std::size_t c, std::uint64_t from, std::uint64_t to) noexcept;
  // Starts one more worker unless max_threads_ run (or stop); true when it did. Any worker.
  bool grow() noexcept;
  // Populates `per_thread` chunks from each of `threads` threads below `tail` (moved down);
  // returns GB/s, or 0 when it could not run.
  double calibrate(unsigned threads, std::size_t per_thread, std::size_t& tail) noexcept;
  // Pages ahead of the receivers' front a jump lands: what they cover while one thread
  // populates a chunk (twice, for margin), plus a chunk per thread.
  std::uint64_t lead_pages() const noexcept;

  std::uint8_t* base_;
  std::size_t bytes_;
  std::size_t ps_;
  std::size_t pages_;
  std::size_t chunk_pages_;
  std::size_t nchunks_;
  unsigned max_threads_;
  PageBitmap chunks_;  // populated chunks (atomic bits)

  std::atomic<std::uint64_t> front_{0};     // receivers' highest page end so far
  std::atomic<std::size_t> next_chunk_{0};  // the next chunk a worker takes
  std::size_t limit_chunk_ = 0;             // chunks from here on were done by the calibration (lead thread only)
  std::atomic<bool> stop_{false};
  std::atomic<bool> failed_{false};
  std::atomic<bool> finished_{false};
  std::atomic<unsigned> threads_{0};  // chosen count (0 while calibrating)
  std::atomic<unsigned> active_{0};   // workers started (the lead included), at most max_threads_
  std::atomic<unsigned> added_{0};    // workers grow() added after the calibration's count
  std::mutex workers_mu_;             // guards workers_ (grow() on any worker, joined by the lead)
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> lead_pages_{0};
  std::atomic<std::uint64_t> populated_{0}, jumps_{0}, dropped_{0};
  std::atomic<double> per_thread_pps_{0};  // one thread's populate rate, pages/s (calibration)
  std::atomic<std::uint64_t> end_ns_{0};   // when the lead thread ended, ns after t0_
  std::chrono::steady_clock::time_point t0_{};

  mutable std::mutex mu_;  // guards tried_ and tried_gbps_ (written by the lead thread, read by stats())
  std::vector<unsigned> tried_;
  std::vector<double> tried_gbps_;
  std::mutex ctl_mu_;  // orders start() and stop() (callers on different threads)
  bool started_ = false, stopped_ = false;  // guarded by ctl_mu_
  std::thread lead_;  // started by start(), joined by stop(); it starts and joins the workers itself
};

}  // namespace livemig
