#include "livemig/balloon/device.hpp"

#include <stdexcept>
#include <string>
#include <thread>

namespace livemig::balloon {

Device::Device(std::uint64_t npages, HintTarget& target) noexcept
    : npages_(npages), own_target_(target), target_(&target) {}

void Device::set_target(std::shared_ptr<HintTarget> target) {
  // A round in progress ends first: its hints drain before the target changes (the guest's next
  // ack of a round id would be refused anyway until the host starts a new round).
  const State s = state();
  if (s == State::Requested || s == State::Start) host_stop();
  HintTarget* t = target ? target.get() : &own_target_;
  // Drained above, and no round runs: no hint is in flight, none can enter until the host starts a
  // round. Release: a hint that enters later (acquire CAS on word_, after host_request's release)
  // sees the new target.
  target_.store(t, std::memory_order_release);
  target_owner_ = std::move(target);
}

void Device::host_transition(std::uint32_t id, State s) noexcept {
  std::uint64_t w = word_.load(std::memory_order_relaxed);
  // acq_rel: release publishes the round set-up to hints that enter under the new word.
  while (!word_.compare_exchange_weak(w, pack(id, s) | (w & kInflightMask), std::memory_order_acq_rel,
                                      std::memory_order_relaxed)) {
  }
  // Drain: hints that entered before the CAS finish applying; acquire pairs with their release
  // decrement so what they did to the target is visible to the caller.
  for (unsigned spins = 0; (word_.load(std::memory_order_acquire) & kInflightMask) != 0; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

void Device::host_request(std::uint32_t id) {
  if (!is_round_id(id))
    throw std::invalid_argument("command id " + std::to_string(id) + " is not a round id (0x80000000 or more)");
  last_round_.store(id, std::memory_order_release);
  rounds_.fetch_add(1, std::memory_order_relaxed);
  host_transition(id, State::Requested);
}

std::uint32_t Device::host_request_next() {
  const std::uint32_t id = next_round_id(last_round_id());
  host_request(id);
  return id;
}

void Device::continue_after(std::uint32_t id) {
  if (id != 0 && !is_round_id(id))
    throw std::invalid_argument("command id " + std::to_string(id) + " is not a round id (0x80000000 or more)");
  last_round_.store(id, std::memory_order_release);
}

void Device::host_stop() noexcept { host_transition(kCmdStop, State::Stop); }

void Device::host_done() noexcept {
  host_transition(kCmdDone, State::Done);
  target_.load(std::memory_order_acquire)->done();
}

std::uint32_t Device::cmd_id() const noexcept { return id_of(word_.load(std::memory_order_acquire)); }

State Device::state() const noexcept { return state_of(word_.load(std::memory_order_acquire)); }

bool Device::guest_transition(std::uint32_t id, State from, State to) noexcept {
  std::uint64_t w = word_.load(std::memory_order_acquire);
  for (;;) {
    if (id_of(w) != id || state_of(w) != from) return false;
    if (word_.compare_exchange_weak(w, pack(id, to) | (w & kInflightMask), std::memory_order_acq_rel,
                                    std::memory_order_acquire))
      return true;
  }
}

bool Device::ack(std::uint32_t id) noexcept {
  if (!guest_transition(id, State::Requested, State::Start)) {
    acks_stale_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  last_acked_.store(id, std::memory_order_relaxed);
  acks_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void Device::stop(std::uint32_t id) noexcept {
  if (guest_transition(id, State::Start, State::Stop))
    stops_.fetch_add(1, std::memory_order_relaxed);
  else
    stops_stale_.fetch_add(1, std::memory_order_relaxed);
}

bool Device::hint(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept {
  if (id != last_acked_.load(std::memory_order_relaxed)) hints_unacked_.fetch_add(1, std::memory_order_relaxed);
  if (n == 0 || first >= npages_ || n > npages_ - first) {
    hints_dropped_invalid_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Enter: check id and state and count ourselves in flight in one CAS (acquire: see the round's set-up).
  std::uint64_t w = word_.load(std::memory_order_acquire);
  for (;;) {
    if (id_of(w) != id || state_of(w) != State::Start || (w & kInflightMask) == kInflightMask) {
      hints_dropped_stale_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acquire, std::memory_order_acquire)) break;
  }
  const bool ok = target_.load(std::memory_order_acquire)->apply(id, first, n);
  if (ok) {
    hints_accepted_.fetch_add(1, std::memory_order_relaxed);
    pages_hinted_.fetch_add(n, std::memory_order_relaxed);
  } else {
    hints_failed_.fetch_add(1, std::memory_order_relaxed);
  }
  // Leave: release, so a host transition that sees the count drop also sees what apply() did.
  word_.fetch_sub(1, std::memory_order_release);
  return ok;
}

Counters Device::counters() const noexcept {
  Counters c;
  c.rounds = rounds_.load(std::memory_order_relaxed);
  c.acks = acks_.load(std::memory_order_relaxed);
  c.acks_stale = acks_stale_.load(std::memory_order_relaxed);
  c.stops = stops_.load(std::memory_order_relaxed);
  c.stops_stale = stops_stale_.load(std::memory_order_relaxed);
  c.hints_accepted = hints_accepted_.load(std::memory_order_relaxed);
  c.pages_hinted = pages_hinted_.load(std::memory_order_relaxed);
  c.hints_dropped_stale = hints_dropped_stale_.load(std::memory_order_relaxed);
  c.hints_dropped_invalid = hints_dropped_invalid_.load(std::memory_order_relaxed);
  c.hints_failed = hints_failed_.load(std::memory_order_relaxed);
  c.hints_unacked = hints_unacked_.load(std::memory_order_relaxed);
  return c;
}

bool Recorder::apply(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept {
  {
    std::lock_guard lk(mu_);
    try {
      accepted_.push_back({id, first, n});
    } catch (...) {  // out of memory for the log: the bitmap still holds the pages
    }
  }
  since_done_.set_range(first, first + n);
  return true;
}

std::vector<Recorder::Record> Recorder::accepted() const {
  std::lock_guard lk(mu_);
  return accepted_;
}

}  // namespace livemig::balloon
