// PageScanner: chooses the next pages the source sends (docs/design.md rules 2, 6 and 7).
//
// Urgent requests (from the destination's return path) come first; then a background scan of the
// dirty bitmap D that continues just after the last requested page. Taking a page test-and-clears
// its D bit and sets its sent bit S before the data goes out; a failed send puts exactly what was
// taken back (send_failed). A request is served unless the page was already delivered in its
// current version (S set and D clear); a dropped request is counted. A page that is clean and
// unsent (a hinted page) is served on request.
//
// Threads: request() from any thread (a return-path thread; never the GIL): it only queues, under
// a short mutex. next_batch() and send_failed() may be called from several sender threads at once:
// every D bit is taken by exactly one caller (atomic per word), the queue is popped under the mutex.
//
// Zero pages: the scanner does not read memory. The sender checks each page with
// livemig::is_zero(page, page_size) as it copies it (the page is in cache then) and sends a
// header only for zero pages.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

#include "livemig/base/timeline.hpp"
#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig {

/// A run of pages taken for sending. `flags` records what was taken so send_failed can undo it.
struct PageRun {
  static constexpr std::uint8_t kUrgent = 1;          // served for a request
  static constexpr std::uint8_t kDirtyTaken = 2;      // D was set and cleared by the take
  static constexpr std::uint8_t kSentWasClear = 4;    // S was clear and set by the take
  std::uint64_t first = 0;
  std::uint64_t npages = 0;
  std::uint8_t flags = 0;
  bool urgent() const noexcept { return (flags & kUrgent) != 0; }
  bool operator==(const PageRun&) const = default;
};

struct ScannerCounters {
  std::uint64_t requests = 0;               // request() calls accepted into the queue
  std::uint64_t request_pages_served = 0;   // requested pages taken for sending
  std::uint64_t request_pages_dropped = 0;  // requested pages already delivered (S set, D clear)
  std::uint64_t requests_invalid = 0;       // ranges outside the region (not queued)
  std::uint64_t background_pages = 0;       // pages taken by the background scan
  std::uint64_t pages_put_back = 0;         // pages whose take send_failed undid
};

class PageScanner {
 public:
  /// A scanner over `dirty` and `sent` (same size), which must outlive it.
  PageScanner(PageBitmap& dirty, PageBitmap& sent) noexcept;

  /// Queues an urgent request for [first_page, first_page + npages). Any thread, no GIL. Returns
  /// false (counted, nothing queued) for an empty range or one outside the region.
  bool request(std::uint64_t first_page, std::uint64_t npages);
  /// Requested pages queued and not yet looked at.
  std::size_t pending_requests() const;
  /// For an idle sender (nothing dirty left, e.g. late in postcopy): spins briefly, then blocks
  /// until a request is queued, wake() is called, or `timeout` passes. True when requests are
  /// queued. Any thread; never needs the GIL.
  bool wait_for_request(std::chrono::microseconds timeout);
  /// Wakes every blocked wait_for_request; if none is blocked, the next call returns at once
  /// (the wake is kept until a wait consumes it, so a wake racing a wait's start is not lost).
  void wake();

  /// Takes up to max_pages pages into `out` (cleared first) and returns how many. Queued requests
  /// first: if any page was served for a request, the batch holds urgent runs only. Otherwise the
  /// background scan takes dirty pages from the cursor on (wrapping once). Runs are in take order,
  /// adjacent pages with equal flags merged. Every returned page had D test-and-cleared and S set.
  std::size_t next_batch(std::size_t max_pages, std::vector<PageRun>& out);
  /// A request taken at once instead of queued (for a sender that serves requests on the thread
  /// that reads them): the pages of [first_page, first_page + npages) that rule 2 serves, as urgent
  /// runs in `out` (cleared first), counted like a queued request. False, nothing taken, for a range
  /// outside the region. Safe beside next_batch on another thread: each page's D bit is
  /// test-and-cleared once.
  bool take_request(std::uint64_t first_page, std::uint64_t npages, std::vector<PageRun>& out);
  /// Convenience form of next_batch.
  std::vector<PageRun> next_batch(std::size_t max_pages) {
    std::vector<PageRun> out;
    next_batch(max_pages, out);
    return out;
  }
  /// Undoes the takes of `runs` (exactly as next_batch returned them) whose send failed: D back
  /// where it was taken, S cleared where it was set (rule 7).
  void send_failed(std::span<const PageRun> runs) noexcept;

  /// Where the background scan continues.
  std::size_t cursor() const noexcept { return cursor_.load(std::memory_order_relaxed); }
  /// Moves the background scan's cursor (clamped to the region).
  void set_cursor(std::size_t page) noexcept;
  ScannerCounters counters() const noexcept;
  /// From now on requests, pages taken for them, background pages and the dirty pages left (once
  /// per bin) are also counted into `t` (not owned; it must outlive the scanner's use; nullptr: no
  /// longer). Any thread.
  void set_timeline(Timeline* t) noexcept { timeline_.store(t, std::memory_order_release); }

 private:
  void count(Timeline::Series s, std::uint64_t n) noexcept {
    if (Timeline* t = timeline_.load(std::memory_order_acquire)) t->add(s, n);
  }
  std::size_t take_urgent(std::size_t max_pages, std::vector<PageRun>& out);
  std::size_t take_range(std::uint64_t first, std::uint64_t n, std::vector<PageRun>& out);
  std::size_t take_background(std::size_t max_pages, std::vector<PageRun>& out);

  PageBitmap& dirty_;
  PageBitmap& sent_;
  mutable std::mutex mu_;
  std::condition_variable cv_;    // request() and wake() notify; guarded by mu_
  std::uint64_t wake_epoch_ = 0;  // bumped by wake(), guarded by mu_
  bool wake_pending_ = false;     // set by wake(), consumed by a wait; guarded by mu_
  std::deque<std::pair<std::uint64_t, std::uint64_t>> queue_;  // (first, npages), guarded by mu_
  std::atomic<std::size_t> queued_{0};  // requests in queue_: a lock-free "anything to do?" check
  std::atomic<std::size_t> cursor_{0};
  std::atomic<std::uint64_t> requests_{0}, served_{0}, dropped_{0}, invalid_{0}, background_{0}, put_back_{0};
  std::atomic<Timeline*> timeline_{nullptr};
};

}  // namespace livemig
