// The virtio-balloon free page hinting device: one state machine for the host side (the migration
// drives rounds at its dirty syncs) and the guest side (the balloon driver acknowledges rounds and
// reports free pages). A workload owns its device, as a VM owns its virtio-balloon; a migration
// routes the hints it accepts into the source's page state (set_target) and drives the rounds.
// See balloon/protocol.hpp for the ids and docs/design.md "Free page hinting" for the semantics.
//
// Concurrency: the command id, the state and the number of hints being applied share one atomic
// 64-bit word: [63:32] command id, [31:24] state, [23:0] hints in flight. A hint enters by a CAS
// that checks id and state and increments the in-flight count in the same step, so a host
// transition either happens before the check (the hint is dropped) or after it; host transitions
// then wait for the in-flight count to drain, so when they return every accepted hint of the old
// round is fully applied and no further hint of it can be.
// Orders: the entering CAS is acquire (the hint sees the host's round set-up); the leaving
// decrement is release and the host's drain wait loads with acquire, so the host sees what every
// hint that completed before its transition returned did to the target.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "livemig/balloon/protocol.hpp"
#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig::balloon {

/// The guest's view of the device (what a balloon driver talks to). Called from the driver's
/// thread (never with the GIL); must not block for long; thread-safe against the host side.
/// Like Linux's driver, a guest acts on a *change* of the id it reads: a new round id starts a
/// round, DONE frees the held pages; DONE followed by DONE is no new event.
struct Port {
  virtual ~Port() = default;
  /// The id the device shows: a round id, kCmdStop or kCmdDone.
  virtual std::uint32_t cmd_id() const noexcept = 0;
  /// Acknowledges round `id` (Requested -> Start); false unless `id` is current and Requested.
  virtual bool ack(std::uint32_t id) noexcept = 0;
  /// Reports [first, first + n) free in round `id`; false when dropped (stale id, not Start,
  /// outside the region) or not applied.
  virtual bool hint(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept = 0;
  /// Ends round `id` (Start -> Stop); ignored (counted) when `id` is not current and started.
  virtual void stop(std::uint32_t id) noexcept = 0;
};

/// Where accepted hints land (the source's page state, or a recorder).
struct HintTarget {
  virtual ~HintTarget() = default;
  /// Pages [first, first + n) (inside the region) were hinted free in round `id`, the current one.
  /// Called on the guest's thread while the hint is in flight; false when they could not be applied.
  virtual bool apply(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept = 0;
  /// The device now shows DONE (called on the host's thread, after in-flight hints drained).
  virtual void done() noexcept {}
};

/// What the device saw (each counter read atomically, not all at one instant).
struct Counters {
  std::uint64_t rounds = 0;                 ///< rounds the host started
  std::uint64_t acks = 0, acks_stale = 0;   ///< guest acknowledgements taken / refused
  std::uint64_t stops = 0, stops_stale = 0; ///< guest round ends taken / ignored
  std::uint64_t hints_accepted = 0;
  std::uint64_t pages_hinted = 0;
  std::uint64_t hints_dropped_stale = 0;    ///< wrong id or not in Start
  std::uint64_t hints_dropped_invalid = 0;  ///< empty or outside the region
  std::uint64_t hints_failed = 0;           ///< the target could not apply them
  std::uint64_t hints_unacked = 0;          ///< tagged with an id the guest never acknowledged: a driver bug
  bool operator==(const Counters&) const = default;
};

class Device : public Port {
 public:
  /// A device for a region of `npages` pages, in Stop, applying hints to `target` (which must
  /// outlive it, or until set_target replaces it).
  Device(std::uint64_t npages, HintTarget& target) noexcept;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  // ---- host side (one controlling thread) ----
  /// Starts round `id` (Requested); std::invalid_argument unless is_round_id(id). Returns once
  /// hints of the previous round still being applied are done.
  void host_request(std::uint32_t id);
  /// Starts the round after the last one started (kFirstRoundId at first); returns its id.
  std::uint32_t host_request_next();
  /// Shows STOP: hints are dropped from now; returns once in-flight ones are applied.
  void host_stop() noexcept;
  /// Shows DONE (the guest may reuse its hinted pages); drains like host_stop, then tells the target.
  void host_done() noexcept;
  /// The last round id started (0 before any).
  std::uint32_t last_round_id() const noexcept { return last_round_.load(std::memory_order_acquire); }
  /// Continues another device's id sequence (a migrated guest): the next round follows `id`.
  /// std::invalid_argument unless `id` is 0 (none yet) or a round id.
  void continue_after(std::uint32_t id);
  /// Routes accepted hints to `target` from now on (nullptr: back to the target given at
  /// construction). Host side: stops a running round first (in-flight hints drain), so no hint of
  /// it lands anywhere after this returns. `target` must have `pages()` pages and is kept alive.
  void set_target(std::shared_ptr<HintTarget> target);
  /// The device state.
  State state() const noexcept;
  /// Pages in the region (hints past it are dropped).
  std::uint64_t pages() const noexcept { return npages_; }

  // ---- guest side (Port; any thread, lock-free) ----
  std::uint32_t cmd_id() const noexcept override;
  bool ack(std::uint32_t id) noexcept override;
  bool hint(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept override;
  void stop(std::uint32_t id) noexcept override;

  Counters counters() const noexcept;

 private:
  static constexpr int kIdShift = 32, kStateShift = 24;
  static constexpr std::uint64_t kInflightMask = (std::uint64_t{1} << kStateShift) - 1;
  static constexpr std::uint64_t pack(std::uint32_t id, State s) noexcept {
    return (std::uint64_t{id} << kIdShift) | (std::uint64_t{static_cast<std::uint8_t>(s)} << kStateShift);
  }
  static constexpr std::uint32_t id_of(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> kIdShift); }
  static constexpr State state_of(std::uint64_t w) noexcept { return static_cast<State>((w >> kStateShift) & 0xFF); }
  // Replaces id and state, keeping the in-flight count; then waits for it to reach zero.
  void host_transition(std::uint32_t id, State s) noexcept;
  // CAS from (id, from) to (id, to), keeping the in-flight count.
  bool guest_transition(std::uint32_t id, State from, State to) noexcept;

  std::uint64_t npages_;
  HintTarget& own_target_;
  // The target hints are applied to: read by hint() inside its in-flight window; replaced only by
  // the host after draining (set_target), so a hint never sees a target being dropped.
  std::atomic<HintTarget*> target_;
  std::shared_ptr<HintTarget> target_owner_;  // host side only
  std::atomic<std::uint64_t> word_{pack(kCmdStop, State::Stop)};
  std::atomic<std::uint32_t> last_round_{0};
  std::atomic<std::uint32_t> last_acked_{0};
  // Counters: relaxed, they order nothing.
  std::atomic<std::uint64_t> rounds_{0}, acks_{0}, acks_stale_{0}, stops_{0}, stops_stale_{0}, hints_accepted_{0},
      pages_hinted_{0}, hints_dropped_stale_{0}, hints_dropped_invalid_{0}, hints_failed_{0}, hints_unacked_{0};
};

/// A target that keeps what was hinted: every accepted hint in order, and the pages hinted since the
/// last DONE. For the destination's device (its guest's driver runs on, nothing to skip) and tests.
class Recorder final : public HintTarget {
 public:
  struct Record {
    std::uint32_t id;
    std::uint64_t first;
    std::uint64_t npages;
  };
  explicit Recorder(std::uint64_t npages) : since_done_(npages) {}
  bool apply(std::uint32_t id, std::uint64_t first, std::uint64_t n) noexcept override;
  void done() noexcept override { since_done_.reset(); }
  /// Every accepted hint, in order (any thread).
  std::vector<Record> accepted() const;
  /// Pages hinted since the last DONE, as a bitmap (any thread).
  const PageBitmap& since_done() const noexcept { return since_done_; }

 private:
  mutable std::mutex mu_;
  std::vector<Record> accepted_;
  PageBitmap since_done_;
};

namespace detail {
struct RecorderBase {
  explicit RecorderBase(std::uint64_t npages) : recorder_(npages) {}
  Recorder recorder_;
};
}  // namespace detail

/// A device with a recorder: the destination's balloon device, and the one tests drive.
class LocalDevice final : private detail::RecorderBase, public Device {
 public:
  explicit LocalDevice(std::uint64_t npages) : RecorderBase(npages), Device(npages, recorder_) {}
  /// What the device's guest hinted.
  const Recorder& recorder() const noexcept { return recorder_; }
};

}  // namespace livemig::balloon
