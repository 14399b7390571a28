// Free page hinting (virtio-balloon semantics, docs/design.md "Free page hinting"): the command
// ids, the round-id rule and the device states. The one home of these constants: the source's hint
// sink, the destination's local device, the guest's driver and Python (through _core) use these.
#pragma once

#include <cstdint>

namespace livemig::balloon {

/// The device shows STOP: no round runs; hints are dropped.
inline constexpr std::uint32_t kCmdStop = 0;
/// The device shows DONE: the guest may reuse every page it hinted.
inline constexpr std::uint32_t kCmdDone = 1;
/// The first round id. Round ids run 0x80000001 ... 0xFFFFFFFF, then wrap to 0x80000000.
inline constexpr std::uint32_t kFirstRoundId = 0x80000001U;
/// The smallest round id (reached only by wrapping).
inline constexpr std::uint32_t kMinRoundId = 0x80000000U;

/// The round id after `id`; any id that is not a round id (STOP, DONE, none yet) is followed by the
/// first round id. Never returns 0 or 1.
constexpr std::uint32_t next_round_id(std::uint32_t id) noexcept {
  return id == 0xFFFFFFFFU ? kMinRoundId : (id < kMinRoundId ? kFirstRoundId : id + 1);
}
/// True for ids that name a round (neither STOP, DONE nor a reserved id below 0x80000000).
constexpr bool is_round_id(std::uint32_t id) noexcept { return id >= kMinRoundId; }

/// The device's state. Only in Start are hints accepted.
enum class State : std::uint8_t {
  Stop = 0,       ///< no round: the device shows STOP
  Requested = 1,  ///< the host started a round; the guest has not acknowledged its id yet
  Start = 2,      ///< the guest acknowledged: hints tagged with the round id count
  Done = 3,       ///< the device shows DONE
};

}  // namespace livemig::balloon
