// The wire format: frame types, the 24-byte frame header, limits, CRC32C. See docs/protocol.md.
//
// Every frame is a little-endian header, then `length` payload bytes, then (only when the
// `checksums` capability was negotiated) a 4-byte CRC32C of header and payload:
//
//   offset 0  u8  type      FrameType
//   offset 1  u8  flags     must be 0 (version 1)
//   offset 2  u16 reserved  must be 0
//   offset 4  u32 count     pages, ranges or ack kind, by type
//   offset 8  u64 arg       first page, fill value, command or ack value, by type
//   offset 16 u64 length    payload bytes
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "livemig/base/page_range.hpp"
#include "livemig/wire/ack.hpp"
#include "livemig/wire/command.hpp"
#include "livemig/wire/frame_type.hpp"

namespace livemig::wire {

/// Protocol version spoken by this build; a peer with another version is refused.
inline constexpr std::uint16_t kProtocolVersion = 1;
/// Bytes in a frame header.
inline constexpr std::size_t kHeaderBytes = 24;
/// Bytes in the CRC32C trailer (checksums capability only).
inline constexpr std::size_t kCrcBytes = 4;
/// Bytes per encoded page range (u64 first, u64 npages).
inline constexpr std::size_t kRangeBytes = 16;
/// Largest PAGES payload, whatever the page size (at least one page is always allowed).
inline constexpr std::size_t kMaxPagePayload = std::size_t{4} << 20;
/// Largest COMMAND argument blob.
inline constexpr std::size_t kMaxCommandArgs = 64 * 1024;
/// Largest ERROR message.
inline constexpr std::size_t kMaxErrorMessage = 4096;

/// Which way a channel's frames go; each direction accepts only its own frame types.
enum class Direction : std::uint8_t {
  kToDestination = 0,  ///< main, urgent and extra page channels.
  kToSource = 1,       ///< the return path.
};

/// A half-open page range [first, first + npages).
using Range = livemig::PageRange;

/// What both ends agreed on in the handshake, plus local limits.
struct WireConfig {
  std::size_t page_size = 4096;          ///< bytes per page, a power of two >= 64.
  std::uint64_t region_pages = 0;        ///< pages in the region; every page number is below this.
  bool checksums = false;                ///< CRC32C trailer on every frame.
  std::uint32_t frame_pages = 256;       ///< pages per PAGES frame the writer emits (clamped to the max).
  std::size_t batch_bytes = 4u << 20;    ///< writer flushes once this many bytes are queued.
  std::uint64_t max_device_state = 256u << 20;  ///< largest DEVICE_STATE blob accepted.
  std::uint32_t max_ranges = 1u << 16;   ///< most ranges in one DISCARD / LOCAL_FILL frame.
  int timeout_ms = 30000;                ///< a peer silent for this long is lost; <= 0: wait forever.

  /// Most pages one PAGES frame may carry for this page size.
  std::uint32_t max_frame_pages() const noexcept {
    const std::size_t n = kMaxPagePayload / page_size;
    return n == 0 ? 1u : static_cast<std::uint32_t>(n);
  }
  /// Throws std::invalid_argument when the fields are inconsistent.
  void validate() const;
};

/// Name of a frame type ("PAGES", ...), or "0x.." for an unknown one.
std::string frame_type_name(std::uint8_t type);
/// True when `type` is a frame type of this version.
bool known_frame_type(std::uint8_t type) noexcept;
/// True when frames of `type` may travel in `dir`.
bool allowed_in(FrameType type, Direction dir) noexcept;

/// A decoded (not yet validated) frame header.
struct FrameHeader {
  std::uint8_t type = 0;
  std::uint8_t flags = 0;
  std::uint16_t reserved = 0;
  std::uint32_t count = 0;
  std::uint64_t arg = 0;
  std::uint64_t length = 0;
};

// Little-endian stores and loads. The wire is little-endian; so is every host livemig builds for
// (x86-64, aarch64), which the static_assert keeps honest.
static_assert(std::endian::native == std::endian::little, "livemig's wire code assumes a little-endian host");
template <class T>
inline void store_le(std::uint8_t* p, T v) noexcept {
  std::memcpy(p, &v, sizeof v);
}
template <class T>
inline T load_le(const std::uint8_t* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Writes `h` as 24 bytes at `out`.
void encode_header(const FrameHeader& h, std::uint8_t* out) noexcept;
/// Reads 24 bytes at `in`.
FrameHeader decode_header(const std::uint8_t* in) noexcept;

/// Checks every header field against `cfg` for a frame arriving in `dir`; throws ProtocolError
/// naming the field. After it returns, the payload length is known to be within the limits and
/// every page range in the header lies inside the region.
void validate_header(const FrameHeader& h, const WireConfig& cfg, Direction dir);

/// Checks one range from a DISCARD / LOCAL_FILL payload; throws ProtocolError.
void validate_range(const Range& r, const WireConfig& cfg, const char* frame);

/// CRC32C (Castagnoli) state update: feed the running value, starting from 0xFFFFFFFF; the final
/// checksum is the bitwise NOT of the last value. Uses the SSE4.2 crc32 instruction.
std::uint32_t crc32c_update(std::uint32_t state, const void* data, std::size_t len) noexcept;
/// CRC32C of one buffer.
inline std::uint32_t crc32c(const void* data, std::size_t len) noexcept {
  return ~crc32c_update(0xFFFFFFFFu, data, len);
}

}  // namespace livemig::wire
