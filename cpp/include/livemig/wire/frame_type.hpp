// Frame types (docs/protocol.md "Frames"): the one home of their numbers.
#pragma once

#include <cstdint>

namespace livemig::wire {

enum class FrameType : std::uint8_t {
  // Source to destination (main, urgent and extra page channels).
  kPages = 0x01,        ///< count pages from page arg, payload count * page_size bytes.
  kZero = 0x02,         ///< count all-zero pages from page arg, no payload.
  kDiscard = 0x03,      ///< count ranges in the payload: drop these pages, clear their received bits.
  kLocalFill = 0x04,    ///< count ranges; arg is the u32 fill value; the destination fills on fault.
  kDeviceState = 0x05,  ///< opaque blob of `length` bytes.
  kCommand = 0x06,      ///< arg is a Command, payload its argument bytes.
  kEnd = 0x07,          ///< end of stream on this channel (either direction).
  // Destination to source (return path).
  kRequest = 0x10,         ///< please send count pages from page arg.
  kReceivedBitmap = 0x11,  ///< the destination's received bitmap, ceil(region_pages / 8) bytes.
  kAck = 0x12,             ///< count is an AckKind, arg its value.
  kError = 0x13,           ///< UTF-8 message of `length` bytes (either direction).
};

}  // namespace livemig::wire
