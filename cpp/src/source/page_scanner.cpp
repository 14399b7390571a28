#include "livemig/source/page_scanner.hpp"

#include <algorithm>
#include <bit>
#include <thread>

namespace livemig {
namespace {

using Word = PageBitmap::Word;

// Appends [first, first + n) with `flags`, merging into the last run when adjacent and alike.
void emit(std::vector<PageRun>& out, std::uint64_t first, std::uint64_t n, std::uint8_t flags) {
  if (!out.empty()) {
    PageRun& last = out.back();
    if (last.flags == flags && last.first + last.npages == first) {
      last.npages += n;
      return;
    }
  }
  out.push_back(PageRun{first, n, flags});
}

}  // namespace

PageScanner::PageScanner(PageBitmap& dirty, PageBitmap& sent) noexcept : dirty_(dirty), sent_(sent) {}

bool PageScanner::request(std::uint64_t first_page, std::uint64_t npages) {
  const std::uint64_t size = dirty_.size();
  if (npages == 0 || first_page >= size || npages > size - first_page) {
    invalid_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  {
    std::lock_guard lock(mu_);
    queue_.emplace_back(first_page, npages);
    // Under the lock, so a sender that sees the count also finds the entry.
    queued_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  requests_.fetch_add(1, std::memory_order_relaxed);
  count(Timeline::kRequests, 1);
  return true;
}

bool PageScanner::wait_for_request(std::chrono::microseconds timeout) {
  // A hand-off to a halted CPU costs tens of microseconds here: spin a little first.
  for (int i = 0; i < 2000; ++i) {
    if (queued_.load(std::memory_order_acquire) != 0) return true;
    if (i > 200) std::this_thread::yield();
  }
  std::unique_lock lock(mu_);
  if (!wake_pending_) {
    const std::uint64_t epoch = wake_epoch_;
    cv_.wait_for(lock, timeout, [&] { return !queue_.empty() || wake_epoch_ != epoch; });
  }
  wake_pending_ = false;
  return !queue_.empty();
}

void PageScanner::wake() {
  {
    std::lock_guard lock(mu_);
    ++wake_epoch_;
    wake_pending_ = true;
  }
  cv_.notify_all();
}

std::size_t PageScanner::pending_requests() const {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& r : queue_) n += r.second;
  return n;
}

void PageScanner::set_cursor(std::size_t page) noexcept {
  cursor_.store(page < dirty_.size() ? page : 0, std::memory_order_relaxed);
}

std::size_t PageScanner::take_urgent(std::size_t max_pages, std::vector<PageRun>& out) {
  std::size_t served = 0;
  while (served < max_pages) {
    std::uint64_t first = 0, n = 0;
    {
      std::lock_guard lock(mu_);
      if (queue_.empty()) break;
      auto& front = queue_.front();
      first = front.first;
      n = front.second;
      // Take at most the budget; the rest stays at the head of the queue.
      const std::uint64_t budget = max_pages - served;
      if (n > budget) {
        front.first += budget;
        front.second -= budget;
        n = budget;
      } else {
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    served += take_range(first, n, out);
  }
  return served;
}

std::size_t PageScanner::take_range(std::uint64_t first, std::uint64_t n, std::vector<PageRun>& out) {
  std::uint64_t dropped = 0, served = 0;
  for (std::uint64_t p = first; p < first + n; ++p) {
    // Rule 2: served unless delivered in its current version (S set, D clear). D first: a page
    // dirtied again must go even if it was sent before.
    const bool d = dirty_.test_and_clear(p);
    const bool s_was = sent_.test_and_set(p);
    if (!d && s_was) {
      ++dropped;
      continue;
    }
    const std::uint8_t flags = static_cast<std::uint8_t>(PageRun::kUrgent | (d ? PageRun::kDirtyTaken : 0) |
                                                         (s_was ? 0 : PageRun::kSentWasClear));
    emit(out, p, 1, flags);
    ++served;
  }
  if (dropped != 0) dropped_.fetch_add(dropped, std::memory_order_relaxed);
  if (served != 0) {
    served_.fetch_add(served, std::memory_order_relaxed);
    count(Timeline::kRequestPages, served);
  }
  // Rule 6: the background scan continues just after the requested pages.
  set_cursor(first + n);
  return served;
}

std::size_t PageScanner::take_background(std::size_t max_pages, std::vector<PageRun>& out) {
  const std::size_t size = dirty_.size();
  if (size == 0) return 0;
  std::size_t taken = 0;
  const std::size_t start = cursor_.load(std::memory_order_relaxed);
  std::size_t pos = start;
  // Two legs: [start, size) then [0, start).
  for (int leg = 0; leg < 2 && taken < max_pages; ++leg) {
    const std::size_t limit = leg == 0 ? size : start;
    if (leg == 1) pos = 0;
    while (taken < max_pages) {
      const std::size_t p = dirty_.find_next_set(pos, limit);
      if (p == PageBitmap::npos) {
        pos = limit;
        break;
      }
      const std::size_t w = p / PageBitmap::kWordBits, bit = p % PageBitmap::kWordBits;
      // Bits [bit, bit + budget) of the word, within [.., limit).
      const std::size_t budget = max_pages - taken;
      const std::size_t hi = std::min({PageBitmap::kWordBits, bit + budget, limit - w * PageBitmap::kWordBits});
      const Word mask = (hi == PageBitmap::kWordBits ? ~Word{0} : (Word{1} << hi) - 1) & (~Word{0} << bit);
      // Test-and-clear D for these bits, then set S: acq_rel, so the data the writer stored before
      // the page was marked dirty is what the sender reads after the take.
      const Word x = dirty_.word(w).fetch_and(~mask, std::memory_order_acq_rel) & mask;
      const Word s_prev = sent_.word(w).fetch_or(x, std::memory_order_acq_rel);
      const Word fresh = x & ~s_prev;
      Word rest = x;
      while (rest != 0) {
        const auto lo = static_cast<std::size_t>(std::countr_zero(rest));
        const bool is_fresh = ((fresh >> lo) & 1U) != 0;
        // The run of bits from lo that are taken and share lo's freshness.
        const Word same = rest & (is_fresh ? fresh : ~fresh);
        const Word ones = ~(same >> lo);
        const std::size_t len = ones == 0 ? PageBitmap::kWordBits - lo : static_cast<std::size_t>(std::countr_zero(ones));
        emit(out, w * PageBitmap::kWordBits + lo, len,
             static_cast<std::uint8_t>(PageRun::kDirtyTaken | (is_fresh ? PageRun::kSentWasClear : 0)));
        rest &= (lo + len >= PageBitmap::kWordBits) ? 0 : (~Word{0} << (lo + len));
      }
      taken += static_cast<std::size_t>(std::popcount(x));
      pos = w * PageBitmap::kWordBits + hi;
    }
    if (taken >= max_pages) break;
  }
  if (taken != 0) {
    background_.fetch_add(taken, std::memory_order_relaxed);
    count(Timeline::kPushPages, taken);
  }
  // The pages left, once per bin (a popcount of the bitmap), and whenever the scan found none (so
  // the bin where the push drained says 0).
  if (Timeline* t = timeline_.load(std::memory_order_acquire);
      t != nullptr && t->started_at() > 0 && (taken == 0 || t->due(Timeline::kLeftPages)))
    t->level(Timeline::kLeftPages, dirty_.count());
  cursor_.store(pos >= size ? 0 : pos, std::memory_order_relaxed);
  return taken;
}

std::size_t PageScanner::next_batch(std::size_t max_pages, std::vector<PageRun>& out) {
  out.clear();
  if (max_pages == 0) return 0;
  if (queued_.load(std::memory_order_acquire) != 0) {
    const std::size_t n = take_urgent(max_pages, out);
    if (n != 0) return n;
  }
  return take_background(max_pages, out);
}

bool PageScanner::take_request(std::uint64_t first_page, std::uint64_t npages, std::vector<PageRun>& out) {
  out.clear();
  const std::uint64_t size = dirty_.size();
  if (npages == 0 || first_page >= size || npages > size - first_page) {
    invalid_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  requests_.fetch_add(1, std::memory_order_relaxed);
  count(Timeline::kRequests, 1);
  take_range(first_page, npages, out);
  return true;
}

void PageScanner::send_failed(std::span<const PageRun> runs) noexcept {
  std::uint64_t n = 0;
  for (const PageRun& r : runs) {
    if (r.npages == 0 || r.first >= dirty_.size() || r.npages > dirty_.size() - r.first) continue;
    // Order: S back first, then D; a request racing in sees either the old state or "dirty".
    if ((r.flags & PageRun::kSentWasClear) != 0) sent_.clear_range(r.first, r.first + r.npages);
    if ((r.flags & PageRun::kDirtyTaken) != 0) dirty_.set_range(r.first, r.first + r.npages);
    n += r.npages;
  }
  if (n != 0) put_back_.fetch_add(n, std::memory_order_relaxed);
}

ScannerCounters PageScanner::counters() const noexcept {
  ScannerCounters c;
  c.requests = requests_.load(std::memory_order_relaxed);
  c.request_pages_served = served_.load(std::memory_order_relaxed);
  c.request_pages_dropped = dropped_.load(std::memory_order_relaxed);
  c.requests_invalid = invalid_.load(std::memory_order_relaxed);
  c.background_pages = background_.load(std::memory_order_relaxed);
  c.pages_put_back = put_back_.load(std::memory_order_relaxed);
  return c;
}

}  // namespace livemig
