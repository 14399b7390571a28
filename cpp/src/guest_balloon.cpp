// LocalBalloonDevice: the host side of free page hinting, in process, for tests and for guests that
// run without a host device.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "livemig/guest.hpp"

namespace livemig::guest {

namespace {
constexpr std::uint32_t id_of(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> 8); }
constexpr DeviceState state_of(std::uint64_t w) noexcept { return static_cast<DeviceState>(w & 0xFF); }
constexpr std::size_t kAckedKept = 64;  // recent acknowledged ids remembered for hints_unacked
}  // namespace

LocalBalloonDevice::LocalBalloonDevice(std::uint64_t npages) : npages_(npages), since_done_(npages) {}

void LocalBalloonDevice::host_request(std::uint32_t id) {
  if (!is_round_id(id))
    throw std::invalid_argument("round id " + std::to_string(id) + " is not a round id (>= 0x80000000)");
  std::lock_guard lk(mu_);
  last_round_ = id;
  // Release: pairs with the driver's acquire load of the id.
  word_.store(pack(id, DeviceState::Requested), std::memory_order_release);
}

std::uint32_t LocalBalloonDevice::host_request_next() {
  std::lock_guard lk(mu_);
  last_round_ = next_round_id(last_round_);
  word_.store(pack(last_round_, DeviceState::Requested), std::memory_order_release);
  return last_round_;
}

void LocalBalloonDevice::host_stop() noexcept {
  std::lock_guard lk(mu_);
  word_.store(pack(kCmdStop, DeviceState::Stop), std::memory_order_release);
}

void LocalBalloonDevice::host_done() noexcept {
  std::lock_guard lk(mu_);
  word_.store(pack(kCmdDone, DeviceState::Done), std::memory_order_release);
  since_done_.reset();
}

DeviceState LocalBalloonDevice::state() const noexcept { return state_of(word_.load(std::memory_order_acquire)); }

std::uint32_t LocalBalloonDevice::last_round_id() const noexcept {
  std::lock_guard lk(mu_);
  return last_round_;
}

std::uint32_t LocalBalloonDevice::cmd_id() const noexcept { return id_of(word_.load(std::memory_order_acquire)); }

bool LocalBalloonDevice::ack(std::uint32_t id) noexcept {
  std::lock_guard lk(mu_);
  // Like HintSink::guest_ack: only the REQUESTED -> START transition succeeds.
  if (word_.load(std::memory_order_relaxed) != pack(id, DeviceState::Requested)) {
    ++counters_.acks_stale;
    return false;
  }
  word_.store(pack(id, DeviceState::Start), std::memory_order_release);
  ++counters_.acks;
  acked_.push_back(id);
  if (acked_.size() > kAckedKept) acked_.erase(acked_.begin());
  return true;
}

bool LocalBalloonDevice::hint(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept {
  std::lock_guard lk(mu_);
  if (std::find(acked_.begin(), acked_.end(), id) == acked_.end()) ++counters_.hints_unacked;
  if (n == 0 || first >= npages_ || n > npages_ - first) {
    ++counters_.hints_invalid;
    return false;
  }
  if (word_.load(std::memory_order_relaxed) != pack(id, DeviceState::Start)) {
    ++counters_.hints_dropped_stale;
    return false;
  }
  try {
    accepted_.push_back({id, first, n});
  } catch (...) {  // out of memory for the log: keep counting, drop the record
  }
  since_done_.set_range(first, first + n);
  ++counters_.hints_accepted;
  counters_.pages_hinted += n;
  return true;
}

void LocalBalloonDevice::stop(std::uint32_t id) noexcept {
  std::lock_guard lk(mu_);
  if (word_.load(std::memory_order_relaxed) != pack(id, DeviceState::Start)) {
    ++counters_.stops_stale;
    return;
  }
  // Like the host's HintSink, the device then shows STOP.
  word_.store(pack(kCmdStop, DeviceState::Stop), std::memory_order_release);
  ++counters_.stops;
}

std::vector<HintRecord> LocalBalloonDevice::accepted() const {
  std::lock_guard lk(mu_);
  return accepted_;
}

std::vector<std::uint8_t> LocalBalloonDevice::hinted_since_done() const {
  std::lock_guard lk(mu_);
  std::vector<std::uint8_t> out(since_done_.byte_size());
  since_done_.export_bytes(out);
  return out;
}

LocalBalloonDevice::Counters LocalBalloonDevice::counters() const {
  std::lock_guard lk(mu_);
  return counters_;
}

}  // namespace livemig::guest
