#include "livemig/hint_sink.hpp"

#include <stdexcept>
#include <string>
#include <thread>

#include "livemig/dirty_tracker.hpp"

namespace livemig {

HintSink::HintSink(PageBitmap& dirty, PageBitmap& hinted, DirtyTracker* tracker) noexcept
    : dirty_(dirty), hinted_(hinted), tracker_(tracker) {}

void HintSink::host_transition(std::uint32_t id, BalloonState s) noexcept {
  std::uint64_t w = word_.load(std::memory_order_relaxed);
  // acq_rel: release publishes the round set-up to hints that enter under the new word.
  while (!word_.compare_exchange_weak(w, pack(id, s) | (w & kInflightMask), std::memory_order_acq_rel,
                                      std::memory_order_relaxed)) {
  }
  // Drain: hints that entered before the CAS finish applying; acquire pairs with their release
  // decrement so their bitmap changes are visible to the caller.
  for (unsigned spins = 0; (word_.load(std::memory_order_acquire) & kInflightMask) != 0; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

void HintSink::host_request(std::uint32_t cmd_id) {
  if (cmd_id == kCmdStop || cmd_id == kCmdDone)
    throw std::invalid_argument("command id " + std::to_string(cmd_id) + " is reserved (STOP/DONE), not a round id");
  host_transition(cmd_id, BalloonState::Requested);
}

void HintSink::host_stop() noexcept { host_transition(kCmdStop, BalloonState::Stop); }

void HintSink::host_done() noexcept { host_transition(kCmdDone, BalloonState::Done); }

std::uint32_t HintSink::cmd_id() const noexcept { return id_of(word_.load(std::memory_order_acquire)); }

BalloonState HintSink::state() const noexcept { return state_of(word_.load(std::memory_order_acquire)); }

bool HintSink::guest_transition(std::uint32_t cmd_id, BalloonState from, BalloonState to) noexcept {
  std::uint64_t w = word_.load(std::memory_order_acquire);
  for (;;) {
    if (id_of(w) != cmd_id || state_of(w) != from) return false;
    if (word_.compare_exchange_weak(w, pack(cmd_id, to) | (w & kInflightMask), std::memory_order_acq_rel,
                                    std::memory_order_acquire))
      return true;
  }
}

bool HintSink::guest_ack(std::uint32_t cmd_id) noexcept {
  return guest_transition(cmd_id, BalloonState::Requested, BalloonState::Start);
}

bool HintSink::guest_stop(std::uint32_t cmd_id) noexcept {
  return guest_transition(cmd_id, BalloonState::Start, BalloonState::Stop);
}

bool HintSink::hint(std::uint32_t cmd_id, std::uint64_t first_page, std::uint64_t npages) noexcept {
  const std::uint64_t size = dirty_.size();
  if (npages == 0 || first_page >= size || npages > size - first_page) {
    hints_dropped_invalid_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Enter: check id and state and count ourselves in flight in one CAS (acquire: see the round's set-up).
  std::uint64_t w = word_.load(std::memory_order_acquire);
  for (;;) {
    if (id_of(w) != cmd_id || state_of(w) != BalloonState::Start || (w & kInflightMask) == kInflightMask) {
      hints_dropped_stale_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acquire, std::memory_order_acquire)) break;
  }
  const std::size_t first = first_page, end = first_page + npages;
  // Reset write tracking first, then clear D: a write racing in after the reset shows up at the
  // next sync (the guest should not write pages it hinted, but if it does the page is sent).
  const bool ok = tracker_ == nullptr || tracker_->reset(first, npages);
  if (ok) {
    if ((end - 1) / PageBitmap::kWordBits == first / PageBitmap::kWordBits) {
      // Within one word: skip the locked RMWs when they would change nothing. Each round the guest
      // hints its free pages again, so "D already clear, H already set" is the common case.
      const std::size_t wi = first / PageBitmap::kWordBits;
      const PageBitmap::Word mask = range_mask_for_word(wi, first, end);
      if ((dirty_.word(wi).load(std::memory_order_acquire) & mask) != 0)
        dirty_.word(wi).fetch_and(~mask, std::memory_order_acq_rel);
      if ((hinted_.word(wi).load(std::memory_order_acquire) & mask) != mask)
        hinted_.word(wi).fetch_or(mask, std::memory_order_acq_rel);
    } else {
      dirty_.clear_range(first, end);
      hinted_.set_range(first, end);
    }
    hints_accepted_.fetch_add(1, std::memory_order_relaxed);
    pages_hinted_.fetch_add(npages, std::memory_order_relaxed);
  } else {
    hints_failed_.fetch_add(1, std::memory_order_relaxed);
  }
  // Leave: release, so a host transition that sees the count drop also sees D and H.
  word_.fetch_sub(1, std::memory_order_release);
  return ok;
}

HintCounters HintSink::counters() const noexcept {
  HintCounters c;
  c.hints_accepted = hints_accepted_.load(std::memory_order_relaxed);
  c.pages_hinted = pages_hinted_.load(std::memory_order_relaxed);
  c.hints_dropped_stale = hints_dropped_stale_.load(std::memory_order_relaxed);
  c.hints_dropped_invalid = hints_dropped_invalid_.load(std::memory_order_relaxed);
  c.hints_failed = hints_failed_.load(std::memory_order_relaxed);
  return c;
}

}  // namespace livemig
