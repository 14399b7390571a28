// Commands on the main channel (docs/protocol.md "Commands and acknowledgements"): the one home
// of their numbers.
#pragma once

#include <cstdint>

namespace livemig::wire {

enum class Command : std::uint64_t {
  kSwitchover = 1,     ///< a postcopy switchover follows; the destination answers AckKind::kSwitchover.
  kPostcopyStart = 2,  ///< the destination guest may run; missing pages are requested.
  kComplete = 3,       ///< every page was sent; the migration is done.
  kCommitted = 4,      ///< precopy: the source saw the destination guest run and will not resume its own.
  kPostcopyNext = 5,   ///< postcopy follows the precopy round starting now: bound the main channel's queue
                       ///< (capability postcopy-next).
  kDrain = 6,          ///< precopy, before the pause: answer AckKind::kDrained once everything before it is
                       ///< applied (capability precopy-drain).
};
/// The largest command number of this protocol version.
inline constexpr std::uint64_t kMaxCommand = 6;

}  // namespace livemig::wire
