// Frames on a byte stream: a batching FrameWriter (writev straight from region memory, never a
// syscall per page) and a validating FrameReader that dispatches to a FrameHandler, with receivers
// for precopy (payload read straight into the region) and postcopy (payload read into a staging
// buffer and handed to a placement callback). The handshake happens before, in Python (wire.py).
#pragma once

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "livemig/base/fd.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/format.hpp"

namespace livemig::wire {

/// Counters of one writer or reader. Read them only when the object is idle.
struct WireStats {
  std::uint64_t frames = 0;      ///< frames written / read
  std::uint64_t pages = 0;       ///< pages carried by PAGES frames
  std::uint64_t zero_pages = 0;  ///< pages carried by ZERO frames
  std::uint64_t bytes = 0;       ///< bytes on the wire, headers included
  std::uint64_t syscalls = 0;    ///< sendmsg / recvmsg calls
  bool operator==(const WireStats&) const = default;
};

/// Where a FrameWriter's batches go instead of straight to a socket (a TLS channel).
class FrameOutput {
 public:
  virtual ~FrameOutput() = default;
  /// Writes the iovecs' `total` bytes in order (it may consume the iovecs), waiting at most
  /// `timeout_ms` (<= 0: no limit) for the peer to make room; returns the send calls made.
  /// Throws ConnectionLost / ProtocolError / AuthenticationError / KernelError. Called by one
  /// thread at a time.
  virtual std::uint64_t write_all(struct iovec* iov, std::size_t iovcnt, std::size_t total, int timeout_ms) = 0;
};

/// Puts SO_SNDTIMEO / SO_RCVTIMEO on a socket so a blocking call gives up after `timeout_ms`
/// (<= 0 clears them). Not a socket (a pipe): ignored. Throws KernelError("setsockopt").
void set_socket_timeouts(int fd, int timeout_ms);

/// Writes frames to a socket (or, with fd < 0, to memory: see take_bytes). Thread-safe: calls are
/// serialised by an internal mutex, and each frame goes out whole, never interleaved with another.
/// Page frames are queued and go out in batches (one sendmsg for up to ~1000 iovecs or
/// cfg.batch_bytes); every other frame flushes the queue at once. A queued page frame points at
/// the caller's memory until the next flush: region memory stays valid, other buffers must too.
/// With checksums, page data is copied into a bounce buffer first so a page the guest writes while
/// queued cannot make its CRC wrong (the write itself is caught by dirty tracking).
/// Errors: ConnectionLost when the peer is gone or silent past cfg.timeout_ms, KernelError for any
/// other send failure. After an error the writer is unusable (its queue is dropped).
class FrameWriter {
 public:
  /// A writer on `fd` (not owned; a blocking socket), or a memory writer when fd < 0.
  FrameWriter(int fd, const WireConfig& cfg);
  /// A writer whose batches go to `out` (not owned; it must outlive the writer), e.g. a TlsChannel.
  FrameWriter(FrameOutput& out, const WireConfig& cfg);
  FrameWriter(const FrameWriter&) = delete;
  FrameWriter& operator=(const FrameWriter&) = delete;
  ~FrameWriter() = default;

  /// Queues pages [first, first + n) whose data starts at `data` (page `first` at data[0]), in
  /// frames of cfg.frame_pages pages. With detect_zero, all-zero pages travel as ZERO frames.
  /// std::out_of_range when the range leaves the region.
  void send_pages(std::uint64_t first, std::uint64_t n, const std::uint8_t* data, bool detect_zero = false);
  /// Sends pages [first, first + n) ahead of every page frame still queued (rule 6 when there is
  /// no urgent channel), then flushes. Frames already handed to the kernel stay ahead of them.
  void send_urgent_pages(std::uint64_t first, std::uint64_t n, const std::uint8_t* data);
  /// Queues a run of all-zero pages (split into frames of at most 2^32 - 1 pages).
  void send_zero(std::uint64_t first, std::uint64_t n);
  /// Sends discard ranges (split into frames of cfg.max_ranges). Ranges must be non-empty and in
  /// the region (std::out_of_range / std::invalid_argument otherwise). Flushes.
  void send_discard(std::span<const Range> ranges);
  /// Sends local-fill ranges with their 32-bit fill value. Flushes.
  void send_local_fill(std::span<const Range> ranges, std::uint32_t value);
  /// Sends an opaque device state blob (at most cfg.max_device_state bytes). Flushes.
  void send_device_state(std::span<const std::uint8_t> blob);
  /// Sends a command with optional argument bytes (at most 64 KiB). Flushes.
  void send_command(Command cmd, std::span<const std::uint8_t> args = {});
  /// Sends end of stream. Flushes.
  void send_end();
  /// Return path: asks for pages [first, first + n). Flushes.
  void send_request(std::uint64_t first, std::uint32_t n);
  /// Return path: sends the received bitmap (its size must be cfg.region_pages). Flushes.
  void send_received_bitmap(const PageBitmap& received);
  /// Return path: an acknowledgement of `kind` (0..3) with a value. Flushes.
  void send_ack(std::uint32_t kind, std::uint64_t value);
  /// Sends an error message (truncated to 4096 bytes). Flushes.
  void send_error(std::string_view message);
  /// Sends everything queued. No-op when nothing is.
  void flush();

  /// Memory writer only: the bytes written so far (and clears them).
  std::vector<std::uint8_t> take_bytes();
  /// Counters so far.
  WireStats stats() const;
  /// Pages, zero pages and bytes handed to the socket (or output) by the flushes so far, read
  /// without the writer's lock: a live view may call it from any thread while a flush blocks.
  /// frames and syscalls are 0.
  WireStats sent() const noexcept;
  const WireConfig& config() const noexcept { return cfg_; }

 private:
  static constexpr std::size_t kMaxIov = 1024;  // IOV_MAX on Linux
  static constexpr std::size_t kSlots = kMaxIov / 3;
  struct Slot {
    std::array<std::uint8_t, kHeaderBytes + kCrcBytes> bytes;
  };

  // All below with mu_ held.
  /// Flushes unless a frame with `payload_iovs` payload pieces fits in the current batch.
  void make_room(std::size_t payload_iovs);
  void queue_frame(const FrameHeader& h, std::span<const std::span<const std::uint8_t>> payload);
  void queue_pages_locked(std::uint64_t first, std::uint32_t n, const std::uint8_t* data);
  void queue_zero_locked(std::uint64_t first, std::uint64_t n);
  void flush_locked();
  void write_all(struct iovec* iov, std::size_t iovcnt, std::size_t total);
  void check_range(std::uint64_t first, std::uint64_t n, const char* what) const;
  void send_ranges(FrameType type, std::span<const Range> ranges, std::uint64_t arg);

  int fd_;
  FrameOutput* out_ = nullptr;  // not null: batches go there instead of fd_
  bool blocking_ = true;
  WireConfig cfg_;
  mutable std::mutex mu_;
  std::array<struct iovec, kMaxIov> iov_{};
  std::size_t iovcnt_ = 0;
  std::array<Slot, kSlots> slots_{};
  std::size_t nslots_ = 0;
  std::size_t queued_bytes_ = 0;
  std::uint64_t flushes_ = 0;  // flush_locked calls that sent something
  std::vector<std::uint8_t> bounce_;  // checksums: page copies of the queued frames
  std::size_t bounce_used_ = 0;
  std::vector<std::uint8_t> memory_;  // fd < 0: everything written
  WireStats stats_;
  // stats_'s pages / zero_pages / bytes as of the last flush that returned (sent()); relaxed:
  // they are figures for a display, ordered with nothing.
  std::atomic<std::uint64_t> sent_pages_{0}, sent_zero_pages_{0}, sent_bytes_{0};
  void publish_sent() noexcept;
};

/// Where a FrameReader's bytes come from.
class FrameInput {
 public:
  virtual ~FrameInput() = default;
  /// Fills the iovecs completely and returns the total, or returns fewer bytes only at end of
  /// stream. Throws ConnectionLost / KernelError on failure or timeout.
  virtual std::size_t read_full(struct iovec* iov, int iovcnt) = 0;
  /// Throws the error for a stream that ended in the middle of `what` (got of want bytes):
  /// ConnectionLost on a socket, ProtocolError for a buffer.
  [[noreturn]] virtual void truncated(const std::string& what, std::size_t got, std::size_t want) = 0;
  /// Number of read system calls so far.
  std::uint64_t syscalls = 0;
};

/// Reads a socket (not owned). A peer silent for timeout_ms is ConnectionLost.
/// Small reads (headers, one-page frames, control frames) go through a 16 KiB read-ahead buffer,
/// so a header and its small payload cost one recv between them; the rest of a large payload is
/// received straight into its destination with MSG_WAITALL (no copy). Hence: one FdInput per
/// socket for the socket's life, or bytes it read ahead are lost.
class FdInput final : public FrameInput {
 public:
  static constexpr std::size_t kAhead = 16 * 1024;
  FdInput(int fd, int timeout_ms);
  std::size_t read_full(struct iovec* iov, int iovcnt) override;
  [[noreturn]] void truncated(const std::string& what, std::size_t got, std::size_t want) override;

 private:
  // One recvmsg into `iov` (with `flags`), retried on EINTR / EAGAIN; 0 at end of stream.
  std::size_t recv_some(struct iovec* iov, std::size_t iovcnt, int flags);
  int fd_;
  int timeout_ms_;
  bool blocking_;
  std::unique_ptr<std::uint8_t[]> ahead_;
  std::size_t ahead_pos_ = 0;
  std::size_t ahead_len_ = 0;
};

/// Makes the input a session's reader thread uses for a socket (e.g. its TLS channel's); throws
/// when it has none for that fd. Sessions given no opener read the sockets themselves (FdInput).
using InputOpener = std::function<std::unique_ptr<FrameInput>(int fd, int timeout_ms)>;
/// `open(fd, timeout_ms)` when `open` is set, an FdInput on fd otherwise.
std::unique_ptr<FrameInput> open_input(const InputOpener& open, int fd, int timeout_ms);

/// Reads a byte buffer (for decoding captured streams and fuzzing). Truncation is ProtocolError.
class MemoryInput final : public FrameInput {
 public:
  explicit MemoryInput(std::span<const std::uint8_t> data) : data_(data) {}
  std::size_t read_full(struct iovec* iov, int iovcnt) override;
  [[noreturn]] void truncated(const std::string& what, std::size_t got, std::size_t want) override;
  /// Bytes not yet read.
  std::size_t remaining() const noexcept { return data_.size() - pos_; }

 private:
  std::span<const std::uint8_t> data_;
  std::size_t pos_ = 0;
};

/// What a FrameReader calls for each frame, after the header (and CRC, if any) checked out. The
/// default for every control frame throws ProtocolError("unexpected ... frame"); the reader has
/// already refused frames of the wrong direction.
class FrameHandler {
 public:
  virtual ~FrameHandler() = default;
  /// Where to read the payload of pages [first, first + n): n * page_size writable bytes.
  virtual std::uint8_t* page_buffer(std::uint64_t first, std::uint32_t n) = 0;
  /// The payload of pages [first, first + n) is complete (and its CRC good) at `data`.
  virtual void pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) = 0;
  /// Pages [first, first + n) are all zero.
  virtual void zero(std::uint64_t first, std::uint32_t n) = 0;
  /// Drop these pages (clear their received bits); ranges are in the region and non-empty.
  virtual void discard(std::span<const Range> ranges);
  /// A fault on these pages is resolved locally with pages filled with `value`.
  virtual void local_fill(std::span<const Range> ranges, std::uint32_t value);
  /// The device state blob.
  virtual void device_state(std::span<const std::uint8_t> blob);
  /// A command and its argument bytes.
  virtual void command(Command cmd, std::span<const std::uint8_t> args);
  /// End of stream on this channel.
  virtual void end();
  /// Return path: the peer asks for pages [first, first + n).
  virtual void request(std::uint64_t first, std::uint32_t n);
  /// Return path: the peer's received bitmap, ceil(region_pages / 8) little-endian bytes.
  virtual void received_bitmap(std::span<const std::uint8_t> bits);
  /// An acknowledgement.
  virtual void ack(std::uint32_t kind, std::uint64_t value);
  /// The peer reports an error.
  virtual void error(std::string_view message);
};

/// Reads and validates frames from a FrameInput and dispatches them. Not thread-safe: one reader
/// thread per channel. Every malformed frame is a ProtocolError naming the frame type and field;
/// a bad CRC is reported after the payload was read (a page buffer may then hold bad bytes, but
/// the handler's pages() is never called for them).
class FrameReader {
 public:
  FrameReader(FrameInput& in, const WireConfig& cfg, Direction dir);

  /// Reads one frame and dispatches it; returns its type, or nullopt at a clean end of stream
  /// (end of input exactly at a frame boundary).
  std::optional<FrameType> next(FrameHandler& handler);
  /// Reads frames until an END frame (returns true) or a clean end of stream (false).
  bool run(FrameHandler& handler);
  /// Counters so far.
  const WireStats& stats() const noexcept { return stats_; }
  const WireConfig& config() const noexcept { return cfg_; }

 private:
  void read_exact(void* p, std::size_t n, const char* what);
  void read_payload(const FrameHeader& h, std::uint8_t* dst, std::size_t n);
  void check_crc(const FrameHeader& h, std::uint32_t state);
  std::span<const std::uint8_t> read_small_payload(const FrameHeader& h);

  FrameInput& in_;
  WireConfig cfg_;
  Direction dir_;
  std::array<std::uint8_t, kHeaderBytes> hdr_{};
  std::vector<std::uint8_t> scratch_;
  std::vector<Range> ranges_;
  WireStats stats_;
};

/// Forwards every control frame to another handler (or, when that is null, to FrameHandler's
/// default, which throws). Base of the page receivers below.
class ControlForwarder : public FrameHandler {
 public:
  explicit ControlForwarder(FrameHandler* control) : control_(control) {}
  void discard(std::span<const Range> ranges) override;
  void local_fill(std::span<const Range> ranges, std::uint32_t value) override;
  void device_state(std::span<const std::uint8_t> blob) override;
  void command(Command cmd, std::span<const std::uint8_t> args) override;
  void end() override;
  void request(std::uint64_t first, std::uint32_t n) override;
  void received_bitmap(std::span<const std::uint8_t> bits) override;
  void ack(std::uint32_t kind, std::uint64_t value) override;
  void error(std::string_view message) override;

 protected:
  FrameHandler* control_;
};

/// Precopy receiver: page payloads are read straight into the region and then marked in the
/// received bitmap; zero runs clear the pages that are not zero already (a read, then a memset only
/// where needed); a discard clears the received bits, then is forwarded. Other control frames go to
/// `control` (null: throw).
class RegionReceiver : public ControlForwarder {
 public:
  /// `region` holds received.size() pages of `page_size` bytes.
  RegionReceiver(std::uint8_t* region, std::size_t page_size, PageBitmap& received, FrameHandler* control = nullptr)
      : ControlForwarder(control), region_(region), page_size_(page_size), received_(received) {}
  std::uint8_t* page_buffer(std::uint64_t first, std::uint32_t n) override;
  void pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) override;
  void zero(std::uint64_t first, std::uint32_t n) override;
  void discard(std::span<const Range> ranges) override;

 private:
  std::uint8_t* region_;
  std::size_t page_size_;
  PageBitmap& received_;
};

/// Postcopy receiver: page payloads are read into one staging buffer (reused) and handed to
/// `place`; zero runs go to `place_zero`. The placement engine copies them into the region (one
/// UFFDIO_COPY; no copy besides). The staging buffer is page-aligned anonymous memory (one frame's
/// worth), so `place` may also UFFDIO_MOVE its pages out; the next frame then faults fresh pages
/// in. Control frames go to `control` (null: throw).
class StagingReceiver : public ControlForwarder {
 public:
  using PlaceFn = std::function<void(std::uint64_t first, std::uint32_t n, const std::uint8_t* data)>;
  using ZeroFn = std::function<void(std::uint64_t first, std::uint32_t n)>;
  StagingReceiver(const WireConfig& cfg, PlaceFn place, ZeroFn place_zero, FrameHandler* control = nullptr);
  std::uint8_t* page_buffer(std::uint64_t first, std::uint32_t n) override;
  void pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) override;
  void zero(std::uint64_t first, std::uint32_t n) override;

 private:
  Mapping staging_;
  PlaceFn place_;
  ZeroFn place_zero_;
};

/// Sends page requests for a fault thread (the destination's RequestSink forwards to it): never
/// throws and never blocks longer than the writer's timeout. The first failure is kept, later
/// requests are dropped (the migration is failing; pausing and recovery are the caller's).
class RequestSender {
 public:
  explicit RequestSender(FrameWriter& writer) : writer_(writer) {}
  /// Sends REQUEST(first, n) at once; false (and nothing sent) once a send has failed.
  bool request(std::uint64_t first, std::uint32_t n) noexcept;
  /// True after a send failed.
  bool failed() const noexcept { return failed_.load(std::memory_order_acquire); }
  /// The first failure's message (empty while none). Call after failed() returned true.
  std::string error() const;

 private:
  FrameWriter& writer_;
  std::atomic<bool> failed_{false};
  mutable std::mutex mu_;
  std::string error_;
};

/// One decoded frame, owning its payload (for the Python layer, tests and the decoder).
struct Frame {
  FrameType type = FrameType::kEnd;
  std::uint64_t first = 0;     ///< PAGES / ZERO / REQUEST: first page
  std::uint32_t count = 0;     ///< pages, or the ack kind
  std::uint64_t value = 0;     ///< LOCAL_FILL fill value, COMMAND number, ACK value
  std::vector<Range> ranges;   ///< DISCARD / LOCAL_FILL
  std::vector<std::uint8_t> data;  ///< page bytes, blob, command args, bitmap, error message
};

/// Keeps the frames it is handed as Frames, one pump() at a time. With a region attached
/// (precopy), page and zero frames go into the region instead (and mark the received bitmap) and
/// pump() reads on past them.
class CollectingHandler : public FrameHandler {
 public:
  explicit CollectingHandler(const WireConfig& cfg) : cfg_(cfg) {}
  /// Page frames from now on go into `region` and mark `received` (both must outlive this).
  void attach_region(std::uint8_t* region, std::shared_ptr<PageBitmap> received);
  /// Page frames are kept as Frames again.
  void detach_region();

  /// Reads frames until one is kept (returned), END included, or the stream ends cleanly (nullopt).
  std::optional<Frame> pump(FrameReader& reader);

  std::uint8_t* page_buffer(std::uint64_t first, std::uint32_t n) override;
  void pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) override;
  void zero(std::uint64_t first, std::uint32_t n) override;
  void discard(std::span<const Range> ranges) override;
  void local_fill(std::span<const Range> ranges, std::uint32_t value) override;
  void device_state(std::span<const std::uint8_t> blob) override;
  void command(Command cmd, std::span<const std::uint8_t> args) override;
  void end() override;
  void request(std::uint64_t first, std::uint32_t n) override;
  void received_bitmap(std::span<const std::uint8_t> bits) override;
  void ack(std::uint32_t kind, std::uint64_t value) override;
  void error(std::string_view message) override;

 private:
  Frame& keep(FrameType t);
  WireConfig cfg_;
  std::uint8_t* region_ = nullptr;
  std::shared_ptr<PageBitmap> received_;
  Frame pending_;                // a page frame whose payload is being read
  std::optional<Frame> kept_;    // the frame pump() returns
};

/// Decodes a whole byte buffer as frames travelling in `dir`. Throws ProtocolError on anything
/// malformed, a truncated last frame included.
std::vector<Frame> decode_frames(std::span<const std::uint8_t> bytes, const WireConfig& cfg, Direction dir);

}  // namespace livemig::wire
