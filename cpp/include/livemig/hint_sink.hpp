// HintSink: the host side of virtio-balloon free page hinting, and where hints land in the source's
// page state.
//
// The host (the Python balloon device, at round events) starts, stops and ends rounds; the guest's
// balloon driver (any thread, lock-free, never the GIL) acknowledges a round and sends hints tagged
// with its command id. A hint counts only while its id is the current round's and the round is in
// START. An accepted hint resets the kernel's write tracking of its pages, clears their dirty bits
// and sets their hinted bits; it never touches memory (DESIGN.md rule 5).
//
// Concurrency: the command id, the device state and the number of hints being applied share one
// atomic 64-bit word: [63:32] command id, [31:24] state, [23:0] hints in flight. A hint enters by a
// CAS that checks id and state and increments the in-flight count in the same step, so a host
// transition either happens before the check (the hint is dropped) or after it; host_stop(),
// host_done() and host_request() then wait for the in-flight count to drain, so when they return
// every accepted hint of the old round is fully applied and no further hint of it can be.
// Orders: the entering CAS is acquire (the hint sees the host's round set-up); the leaving
// decrement is release and the host's drain wait loads with acquire, so the host sees the D/H
// changes of every hint that completed before its transition returned.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "livemig/page_bitmap.hpp"

namespace livemig {

class DirtyTracker;

inline constexpr std::uint32_t kCmdStop = 0, kCmdDone = 1;
/// The first round id (DESIGN.md: ids start at 0x80000001 and wrap from 0xFFFFFFFF to 0x80000000).
inline constexpr std::uint32_t kCmdFirst = 0x80000001U;

enum class BalloonState : std::uint8_t { Stop = 0, Requested = 1, Start = 2, Done = 3 };

/// The round id after `id` (0x80000001, ..., 0xFFFFFFFF, 0x80000000, ...).
constexpr std::uint32_t next_cmd_id(std::uint32_t id) noexcept {
  return id == 0xFFFFFFFFU ? 0x80000000U : (id < 0x80000000U ? kCmdFirst : id + 1);
}

struct HintCounters {
  std::uint64_t hints_accepted = 0;
  std::uint64_t pages_hinted = 0;
  std::uint64_t hints_dropped_stale = 0;    // wrong id or not in START
  std::uint64_t hints_dropped_invalid = 0;  // range outside the region, or empty
  std::uint64_t hints_failed = 0;           // the kernel refused to reset write tracking
};

class HintSink {
 public:
  /// A sink that applies hints to `dirty` and `hinted` (same size) and resets write tracking in
  /// `tracker` (may be null: then only the bitmaps change). All must outlive the sink.
  HintSink(PageBitmap& dirty, PageBitmap& hinted, DirtyTracker* tracker) noexcept;
  HintSink(const HintSink&) = delete;
  HintSink& operator=(const HintSink&) = delete;

  // ---- host side (the balloon device; Python allocates ids) ----
  /// New round: the device shows cmd_id, state REQUESTED. Throws invalid_argument for ids 0 and 1.
  /// Waits for hints of the previous round still being applied.
  void host_request(std::uint32_t cmd_id);
  /// The device shows STOP, state STOP: hints are dropped from now; returns once in-flight ones are applied.
  void host_stop() noexcept;
  /// The device shows DONE, state DONE (the guest may reuse its hinted pages); drains like host_stop.
  void host_done() noexcept;
  /// What the device shows the guest: the round id while REQUESTED/START, else kCmdStop / kCmdDone.
  std::uint32_t cmd_id() const noexcept;
  /// The device state.
  BalloonState state() const noexcept;

  // ---- guest side (any thread; lock-free; never the GIL) ----
  /// The guest echoes cmd_id: REQUESTED -> START when cmd_id is current; false otherwise.
  bool guest_ack(std::uint32_t cmd_id) noexcept;
  /// Hints [first_page, first_page + npages) free. Applied (true) only when cmd_id is current and
  /// the state START and the range inside the region; else dropped and counted (false).
  bool hint(std::uint32_t cmd_id, std::uint64_t first_page, std::uint64_t npages) noexcept;
  /// The guest ends its round: START -> STOP when cmd_id is current; false otherwise.
  bool guest_stop(std::uint32_t cmd_id) noexcept;

  /// A snapshot of the counters (each read atomically, not all at one instant).
  HintCounters counters() const noexcept;
  std::size_t pages() const noexcept { return dirty_.size(); }

 private:
  static constexpr int kIdShift = 32, kStateShift = 24;
  static constexpr std::uint64_t kInflightMask = (std::uint64_t{1} << kStateShift) - 1;
  static constexpr std::uint64_t pack(std::uint32_t id, BalloonState s) noexcept {
    return (std::uint64_t{id} << kIdShift) | (std::uint64_t{static_cast<std::uint8_t>(s)} << kStateShift);
  }
  static constexpr std::uint32_t id_of(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w >> kIdShift); }
  static constexpr BalloonState state_of(std::uint64_t w) noexcept {
    return static_cast<BalloonState>((w >> kStateShift) & 0xFF);
  }
  // Replaces id and state, keeping the in-flight count; then waits for it to reach zero.
  void host_transition(std::uint32_t id, BalloonState s) noexcept;
  // CAS from (cmd_id, from) to (cmd_id, to), keeping the in-flight count.
  bool guest_transition(std::uint32_t cmd_id, BalloonState from, BalloonState to) noexcept;

  PageBitmap& dirty_;
  PageBitmap& hinted_;
  DirtyTracker* tracker_;
  std::atomic<std::uint64_t> word_{pack(kCmdStop, BalloonState::Stop)};
  // Counters: relaxed, they order nothing.
  std::atomic<std::uint64_t> hints_accepted_{0}, pages_hinted_{0}, hints_dropped_stale_{0},
      hints_dropped_invalid_{0}, hints_failed_{0};
};

}  // namespace livemig
