// Channel kinds and indices (docs/protocol.md "Transports and channels"): the one home of their
// numbers. The kind travels in the handshake's HELLO; the index names a channel in session events.
#pragma once

#include <cstdint>

namespace livemig::wire {

/// What a connection's socket is for, as its HELLO announces it.
enum class ChannelKind : std::uint8_t {
  kMain = 0,    ///< pages and commands; its other direction is the return path
  kUrgent = 1,  ///< requested pages in postcopy
  kPages = 2,   ///< an extra page channel for precopy throughput
  kResume = 3,  ///< the main channel of a paused session's new connection (recovery)
};

/// Session events name channels by index: main, urgent, then the extra page channels.
inline constexpr std::uint64_t kMainChannel = 0;
inline constexpr std::uint64_t kUrgentChannel = 1;
/// Extra page channel i has index kFirstExtraChannel + i.
inline constexpr std::uint64_t kFirstExtraChannel = 2;

}  // namespace livemig::wire
