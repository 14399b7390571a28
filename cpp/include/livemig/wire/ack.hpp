// Acknowledgement kinds on the return path (docs/protocol.md "Commands and acknowledgements"): the
// one home of their numbers.
#pragma once

#include <cstdint>

namespace livemig::wire {

enum class AckKind : std::uint32_t {
  /// The destination guest runs; the value is the command it answered (2 postcopy start, 3
  /// complete), or kNeverRan when a resumed connection finds a guest that never ran.
  kGuestRuns = 0,
  /// COMMAND 1 (switchover) arrived and everything sent before it was applied; value 0.
  kSwitchover = 1,
  /// COMMAND 6 (drain) arrived and everything sent before it was applied; the value is the number
  /// of pages received so far.
  kDrained = 2,
};
/// The largest ack kind of this protocol version.
inline constexpr std::uint32_t kMaxAckKind = 2;
/// AckKind::kGuestRuns value on a resume: the destination guest never ran (switchover broke).
inline constexpr std::uint64_t kNeverRan = 0;

}  // namespace livemig::wire
