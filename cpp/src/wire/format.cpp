#include "livemig/wire/format.hpp"

#include <nmmintrin.h>

#include <cstdio>
#include <stdexcept>

#include "livemig/base/errors.hpp"

namespace livemig::wire {
namespace {

std::string hex(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] void bad(const FrameHeader& h, const std::string& what) {
  throw ProtocolError(frame_type_name(h.type) + " frame: " + what);
}

// [first, first + n) inside a region of `pages` pages, without overflow.
bool in_region(std::uint64_t first, std::uint64_t n, std::uint64_t pages) noexcept {
  return first < pages && n <= pages - first;
}

std::string range_text(std::uint64_t first, std::uint64_t n) {
  return "pages [" + std::to_string(first) + ", " + std::to_string(first) + " + " + std::to_string(n) + ")";
}

}  // namespace

void WireConfig::validate() const {
  if (page_size < 64 || (page_size & (page_size - 1)) != 0)
    throw std::invalid_argument("page_size must be a power of two >= 64, got " + std::to_string(page_size));
  if (frame_pages == 0) throw std::invalid_argument("frame_pages must be >= 1");
  if (max_ranges == 0) throw std::invalid_argument("max_ranges must be >= 1");
}

std::string frame_type_name(std::uint8_t type) {
  switch (static_cast<FrameType>(type)) {
    case FrameType::kPages: return "PAGES";
    case FrameType::kZero: return "ZERO";
    case FrameType::kDiscard: return "DISCARD";
    case FrameType::kLocalFill: return "LOCAL_FILL";
    case FrameType::kDeviceState: return "DEVICE_STATE";
    case FrameType::kCommand: return "COMMAND";
    case FrameType::kEnd: return "END";
    case FrameType::kRequest: return "REQUEST";
    case FrameType::kReceivedBitmap: return "RECEIVED_BITMAP";
    case FrameType::kAck: return "ACK";
    case FrameType::kError: return "ERROR";
  }
  return "unknown (type " + hex(type) + ")";
}

bool known_frame_type(std::uint8_t type) noexcept {
  return (type >= 0x01 && type <= 0x07) || (type >= 0x10 && type <= 0x13);
}

bool allowed_in(FrameType type, Direction dir) noexcept {
  // DEVICE_STATE goes both ways: on the return path it carries the destination's final report.
  if (type == FrameType::kEnd || type == FrameType::kError || type == FrameType::kDeviceState) return true;
  const bool to_dest = static_cast<std::uint8_t>(type) < 0x10;
  return to_dest == (dir == Direction::kToDestination);
}

void encode_header(const FrameHeader& h, std::uint8_t* out) noexcept {
  out[0] = h.type;
  out[1] = h.flags;
  store_le<std::uint16_t>(out + 2, h.reserved);
  store_le<std::uint32_t>(out + 4, h.count);
  store_le<std::uint64_t>(out + 8, h.arg);
  store_le<std::uint64_t>(out + 16, h.length);
}

FrameHeader decode_header(const std::uint8_t* in) noexcept {
  FrameHeader h;
  h.type = in[0];
  h.flags = in[1];
  h.reserved = load_le<std::uint16_t>(in + 2);
  h.count = load_le<std::uint32_t>(in + 4);
  h.arg = load_le<std::uint64_t>(in + 8);
  h.length = load_le<std::uint64_t>(in + 16);
  return h;
}

void validate_range(const Range& r, const WireConfig& cfg, const char* frame) {
  if (r.npages == 0) throw ProtocolError(std::string(frame) + " frame: empty range at page " + std::to_string(r.first));
  if (!in_region(r.first, r.npages, cfg.region_pages))
    throw ProtocolError(std::string(frame) + " frame: " + range_text(r.first, r.npages) +
                        " outside the region of " + std::to_string(cfg.region_pages) + " pages");
}

void validate_header(const FrameHeader& h, const WireConfig& cfg, Direction dir) {
  if (!known_frame_type(h.type)) throw ProtocolError("unknown frame type " + hex(h.type));
  const auto type = static_cast<FrameType>(h.type);
  if (!allowed_in(type, dir))
    bad(h, std::string("not allowed on a ") +
               (dir == Direction::kToDestination ? "source-to-destination channel" : "return path"));
  if (h.flags != 0) bad(h, "flags " + hex(h.flags) + " set (version 1 defines none)");
  if (h.reserved != 0) bad(h, "reserved field is " + hex(h.reserved) + ", must be 0");
  auto no_payload = [&] {
    if (h.length != 0) bad(h, "length " + std::to_string(h.length) + ", must be 0");
  };
  auto pages_in_region = [&] {
    if (h.count == 0) bad(h, "zero pages");
    if (!in_region(h.arg, h.count, cfg.region_pages))
      bad(h, range_text(h.arg, h.count) + " outside the region of " + std::to_string(cfg.region_pages) + " pages");
  };
  switch (type) {
    case FrameType::kPages:
      pages_in_region();
      if (h.count > cfg.max_frame_pages())
        bad(h, std::to_string(h.count) + " pages, more than the limit of " + std::to_string(cfg.max_frame_pages()));
      if (h.length != std::uint64_t{h.count} * cfg.page_size)
        bad(h, "length " + std::to_string(h.length) + " is not " + std::to_string(h.count) + " pages of " +
                   std::to_string(cfg.page_size) + " bytes");
      return;
    case FrameType::kZero:
    case FrameType::kRequest:
      pages_in_region();
      no_payload();
      return;
    case FrameType::kDiscard:
    case FrameType::kLocalFill:
      if (h.count == 0) bad(h, "no ranges");
      if (h.count > cfg.max_ranges)
        bad(h, std::to_string(h.count) + " ranges, more than the limit of " + std::to_string(cfg.max_ranges));
      if (h.length != std::uint64_t{h.count} * kRangeBytes)
        bad(h, "length " + std::to_string(h.length) + " is not " + std::to_string(h.count) + " ranges of 16 bytes");
      if (type == FrameType::kDiscard && h.arg != 0) bad(h, "arg is " + hex(h.arg) + ", must be 0");
      if (type == FrameType::kLocalFill && h.arg > 0xFFFFFFFFu)
        bad(h, "fill value " + hex(h.arg) + " does not fit in 32 bits");
      return;
    case FrameType::kDeviceState:
      if (h.count != 0 || h.arg != 0) bad(h, "count and arg must be 0");
      if (h.length > cfg.max_device_state)
        bad(h, "length " + std::to_string(h.length) + " past the limit of " + std::to_string(cfg.max_device_state));
      return;
    case FrameType::kCommand:
      if (h.count != 0) bad(h, "count must be 0");
      if (h.arg == 0 || h.arg > kMaxCommand) bad(h, "unknown command " + std::to_string(h.arg));
      if (h.length > kMaxCommandArgs)
        bad(h, "length " + std::to_string(h.length) + " past the limit of " + std::to_string(kMaxCommandArgs));
      return;
    case FrameType::kEnd:
      if (h.count != 0 || h.arg != 0) bad(h, "count and arg must be 0");
      no_payload();
      return;
    case FrameType::kReceivedBitmap: {
      if (h.count != 0 || h.arg != 0) bad(h, "count and arg must be 0");
      const std::uint64_t want = (cfg.region_pages + 7) / 8;
      if (h.length != want)
        bad(h, "length " + std::to_string(h.length) + ", the region's bitmap is " + std::to_string(want) + " bytes");
      return;
    }
    case FrameType::kAck:
      if (h.count > kMaxAckKind) bad(h, "unknown ack kind " + std::to_string(h.count));
      no_payload();
      return;
    case FrameType::kError:
      if (h.count != 0 || h.arg != 0) bad(h, "count and arg must be 0");
      if (h.length > kMaxErrorMessage)
        bad(h, "length " + std::to_string(h.length) + " past the limit of " + std::to_string(kMaxErrorMessage));
      return;
  }
}

namespace {

// Three independent crc32 chains hide the instruction's 3-cycle latency; the three partial CRCs
// are joined by "shifting" a CRC over the bytes that follow it, a linear map over GF(2) applied
// with four 256-entry tables (the method of Mark Adler's crc32c.c). kLong and kShort are the
// block sizes per chain.
constexpr std::size_t kLong = 8192;
constexpr std::size_t kShort = 256;
constexpr std::uint32_t kPoly = 0x82F63B78u;  // CRC-32C, reflected

std::uint32_t gf2_times(const std::uint32_t* mat, std::uint32_t vec) noexcept {
  std::uint32_t sum = 0;
  while (vec != 0) {
    if (vec & 1u) sum ^= *mat;
    vec >>= 1;
    ++mat;
  }
  return sum;
}

void gf2_square(std::uint32_t* square, const std::uint32_t* mat) noexcept {
  for (int n = 0; n < 32; ++n) square[n] = gf2_times(mat, mat[n]);
}

// The operator that appends `len` zero bytes to a CRC state, in `even`.
void zeros_op(std::uint32_t* even, std::size_t len) noexcept {
  std::uint32_t odd[32];
  odd[0] = kPoly;  // one zero bit
  std::uint32_t row = 1;
  for (int n = 1; n < 32; ++n) {
    odd[n] = row;
    row <<= 1;
  }
  gf2_square(even, odd);  // two zero bits
  gf2_square(odd, even);  // four zero bits
  // Each square doubles the length; the first puts the one-byte operator in even.
  do {
    gf2_square(even, odd);
    len >>= 1;
    if (len == 0) return;
    gf2_square(odd, even);
    len >>= 1;
  } while (len != 0);
  for (int n = 0; n < 32; ++n) even[n] = odd[n];
}

struct ShiftTable {
  std::uint32_t t[4][256];
  explicit ShiftTable(std::size_t len) noexcept {
    std::uint32_t op[32];
    zeros_op(op, len);
    for (std::uint32_t n = 0; n < 256; ++n) {
      t[0][n] = gf2_times(op, n);
      t[1][n] = gf2_times(op, n << 8);
      t[2][n] = gf2_times(op, n << 16);
      t[3][n] = gf2_times(op, n << 24);
    }
  }
  std::uint32_t shift(std::uint32_t crc) const noexcept {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

const ShiftTable& long_table() {
  static const ShiftTable t(kLong);
  return t;
}
const ShiftTable& short_table() {
  static const ShiftTable t(kShort);
  return t;
}

std::uint64_t load64(const std::uint8_t* p) noexcept {
  std::uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// Three chains over [p, p + 3 * block), joined.
std::uint64_t three_way(std::uint64_t c0, const std::uint8_t* p, std::size_t block, const ShiftTable& tab) noexcept {
  std::uint64_t c1 = 0;
  std::uint64_t c2 = 0;
  for (std::size_t i = 0; i < block; i += 8) {
    c0 = _mm_crc32_u64(c0, load64(p + i));
    c1 = _mm_crc32_u64(c1, load64(p + block + i));
    c2 = _mm_crc32_u64(c2, load64(p + 2 * block + i));
  }
  c0 = tab.shift(static_cast<std::uint32_t>(c0)) ^ c1;
  c0 = tab.shift(static_cast<std::uint32_t>(c0)) ^ c2;
  return c0;
}

}  // namespace

std::uint32_t crc32c_update(std::uint32_t state, const void* data, std::size_t len) noexcept {
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::uint64_t c = state;
  if (len >= 3 * kShort) {
    static const ShiftTable& lt = long_table();
    static const ShiftTable& st = short_table();
    while (len >= 3 * kLong) {
      c = three_way(c, p, kLong, lt);
      p += 3 * kLong;
      len -= 3 * kLong;
    }
    while (len >= 3 * kShort) {
      c = three_way(c, p, kShort, st);
      p += 3 * kShort;
      len -= 3 * kShort;
    }
  }
  while (len >= 8) {
    c = _mm_crc32_u64(c, load64(p));
    p += 8;
    len -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (len > 0) {
    c32 = _mm_crc32_u8(c32, *p++);
    --len;
  }
  return c32;
}

}  // namespace livemig::wire
