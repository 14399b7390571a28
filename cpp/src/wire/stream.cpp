#include "livemig/wire/stream.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "livemig/base/errors.hpp"
#include "livemig/base/zero_page.hpp"

namespace livemig::wire {
namespace {

bool fd_is_blocking(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) throw_errno("fcntl", "F_GETFL on fd " + std::to_string(fd));
  return (fl & O_NONBLOCK) == 0;
}

void set_timeout_option(int fd, int opt, int timeout_ms) {
  timeval tv{};
  if (timeout_ms > 0) {
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
  }
  if (::setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv) != 0 && errno != ENOTSOCK)
    throw_errno("setsockopt", opt == SO_RCVTIMEO ? "SO_RCVTIMEO" : "SO_SNDTIMEO");
}

std::string seconds(int timeout_ms) { return std::to_string(timeout_ms / 1000.0).substr(0, 6) + " s"; }

bool lost_errno(int err) {
  return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNABORTED || err == ETIMEDOUT;
}

// Waits until fd is ready for `events`, or throws ConnectionLost after timeout_ms.
void wait_ready(int fd, short events, int timeout_ms, const char* step) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, timeout_ms > 0 ? timeout_ms : -1);
    if (r > 0) return;
    if (r == 0)
      throw ConnectionLost(std::string(step) + ": the peer was silent for " + seconds(timeout_ms) + " (timeout)");
    if (errno != EINTR) throw_errno("poll", step);
  }
}

}  // namespace

void set_socket_timeouts(int fd, int timeout_ms) {
  set_timeout_option(fd, SO_RCVTIMEO, timeout_ms);
  set_timeout_option(fd, SO_SNDTIMEO, timeout_ms);
}

// ---- FrameWriter ----

FrameWriter::FrameWriter(int fd, const WireConfig& cfg) : fd_(fd), cfg_(cfg) {
  cfg_.validate();
  cfg_.frame_pages = std::min(cfg_.frame_pages, cfg_.max_frame_pages());
  if (fd_ >= 0) {
    blocking_ = fd_is_blocking(fd_);
    if (blocking_) set_timeout_option(fd_, SO_SNDTIMEO, cfg_.timeout_ms);
  }
}

FrameWriter::FrameWriter(FrameOutput& out, const WireConfig& cfg) : fd_(-1), out_(&out), cfg_(cfg) {
  cfg_.validate();
  cfg_.frame_pages = std::min(cfg_.frame_pages, cfg_.max_frame_pages());
}

void FrameWriter::check_range(std::uint64_t first, std::uint64_t n, const char* what) const {
  if (first > cfg_.region_pages || n > cfg_.region_pages - first)
    throw std::out_of_range(std::string(what) + ": pages [" + std::to_string(first) + ", +" + std::to_string(n) +
                            ") outside the region of " + std::to_string(cfg_.region_pages) + " pages");
}

void FrameWriter::make_room(std::size_t payload_iovs) {
  const std::size_t need = 1 + payload_iovs + (cfg_.checksums ? 1 : 0);
  if (iovcnt_ + need > kMaxIov || nslots_ == kSlots) flush_locked();
}

void FrameWriter::queue_frame(const FrameHeader& h, std::span<const std::span<const std::uint8_t>> payload) {
  make_room(payload.size());
  Slot& s = slots_[nslots_++];
  encode_header(h, s.bytes.data());
  iov_[iovcnt_++] = {s.bytes.data(), kHeaderBytes};
  std::size_t bytes = kHeaderBytes;
  for (const auto& p : payload) {
    if (p.empty()) continue;
    // sendmsg never writes through iov_base; the cast only satisfies struct iovec.
    iov_[iovcnt_++] = {const_cast<std::uint8_t*>(p.data()), p.size()};
    bytes += p.size();
  }
  if (cfg_.checksums) {
    std::uint32_t st = crc32c_update(0xFFFFFFFFu, s.bytes.data(), kHeaderBytes);
    for (const auto& p : payload) st = crc32c_update(st, p.data(), p.size());
    store_le<std::uint32_t>(s.bytes.data() + kHeaderBytes, ~st);
    iov_[iovcnt_++] = {s.bytes.data() + kHeaderBytes, kCrcBytes};
    bytes += kCrcBytes;
  }
  queued_bytes_ += bytes;
  stats_.frames += 1;
  stats_.bytes += bytes;
}

void FrameWriter::queue_pages_locked(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) {
  const std::size_t bytes = std::size_t{n} * cfg_.page_size;
  const std::uint8_t* src = data;
  if (cfg_.checksums) {
    // Snapshot the pages: the CRC must describe exactly the bytes that go out. Any flush happens
    // before the copy, so a queued frame's snapshot is never reused under it.
    if (bounce_.empty()) bounce_.resize(cfg_.batch_bytes + std::size_t{cfg_.max_frame_pages()} * cfg_.page_size);
    make_room(1);
    if (bounce_used_ + bytes > bounce_.size()) flush_locked();
    std::memcpy(bounce_.data() + bounce_used_, data, bytes);
    src = bounce_.data() + bounce_used_;
    bounce_used_ += bytes;
  }
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kPages);
  h.count = n;
  h.arg = first;
  h.length = bytes;
  const std::span<const std::uint8_t> payload[] = {{src, bytes}};
  queue_frame(h, payload);
  stats_.pages += n;
  if (queued_bytes_ >= cfg_.batch_bytes) flush_locked();
}

void FrameWriter::queue_zero_locked(std::uint64_t first, std::uint64_t n) {
  while (n > 0) {
    const auto k = static_cast<std::uint32_t>(std::min<std::uint64_t>(n, 0xFFFFFFFFu));
    FrameHeader h;
    h.type = static_cast<std::uint8_t>(FrameType::kZero);
    h.count = k;
    h.arg = first;
    queue_frame(h, {});
    stats_.zero_pages += k;
    first += k;
    n -= k;
  }
}

void FrameWriter::send_pages(std::uint64_t first, std::uint64_t n, const std::uint8_t* data, bool detect_zero) {
  check_range(first, n, "send_pages");
  const std::size_t ps = cfg_.page_size;
  std::lock_guard lock(mu_);
  std::uint64_t i = 0;
  while (i < n) {
    bool zero = false;
    std::uint64_t j = n;
    if (detect_zero) {
      zero = is_zero(data + i * ps, ps);
      // Extend the run of pages of the same kind, but never past one frame of data pages.
      const std::uint64_t limit = zero ? n : std::min<std::uint64_t>(n, i + cfg_.frame_pages);
      j = i + 1;
      while (j < limit && is_zero(data + j * ps, ps) == zero) ++j;
    }
    if (zero) {
      queue_zero_locked(first + i, j - i);
    } else {
      for (std::uint64_t k = i; k < j; k += cfg_.frame_pages) {
        const auto m = static_cast<std::uint32_t>(std::min<std::uint64_t>(cfg_.frame_pages, j - k));
        queue_pages_locked(first + k, m, data + k * ps);
      }
    }
    i = j;
  }
}

void FrameWriter::send_urgent_pages(std::uint64_t first, std::uint64_t n, const std::uint8_t* data) {
  check_range(first, n, "send_urgent_pages");
  std::lock_guard lock(mu_);
  const std::size_t mark = iovcnt_;
  const std::uint64_t flushes = flushes_;
  for (std::uint64_t k = 0; k < n; k += cfg_.frame_pages) {
    const auto m = static_cast<std::uint32_t>(std::min<std::uint64_t>(cfg_.frame_pages, n - k));
    queue_pages_locked(first + k, m, data + k * cfg_.page_size);
  }
  // Unless the queue was flushed meanwhile (then only urgent frames are left), move the urgent
  // frames' iovecs in front of the bulk ones; each frame's iovecs stay together and in order.
  if (flushes_ == flushes) std::rotate(iov_.begin(), iov_.begin() + static_cast<std::ptrdiff_t>(mark),
                                       iov_.begin() + static_cast<std::ptrdiff_t>(iovcnt_));
  flush_locked();
}

void FrameWriter::send_zero(std::uint64_t first, std::uint64_t n) {
  check_range(first, n, "send_zero");
  std::lock_guard lock(mu_);
  queue_zero_locked(first, n);
}

void FrameWriter::send_ranges(FrameType type, std::span<const Range> ranges, std::uint64_t arg) {
  const char* what = type == FrameType::kDiscard ? "send_discard" : "send_local_fill";
  for (const Range& r : ranges) {
    if (r.npages == 0) throw std::invalid_argument(std::string(what) + ": empty range at page " + std::to_string(r.first));
    check_range(r.first, r.npages, what);
  }
  std::lock_guard lock(mu_);
  std::vector<std::uint8_t> buf;
  for (std::size_t at = 0; at < ranges.size(); at += cfg_.max_ranges) {
    const std::size_t k = std::min<std::size_t>(cfg_.max_ranges, ranges.size() - at);
    buf.resize(k * kRangeBytes);
    for (std::size_t i = 0; i < k; ++i) {
      store_le<std::uint64_t>(buf.data() + i * kRangeBytes, ranges[at + i].first);
      store_le<std::uint64_t>(buf.data() + i * kRangeBytes + 8, ranges[at + i].npages);
    }
    FrameHeader h;
    h.type = static_cast<std::uint8_t>(type);
    h.count = static_cast<std::uint32_t>(k);
    h.arg = arg;
    h.length = buf.size();
    const std::span<const std::uint8_t> payload[] = {buf};
    queue_frame(h, payload);
    flush_locked();  // buf is reused
  }
}

void FrameWriter::send_discard(std::span<const Range> ranges) { send_ranges(FrameType::kDiscard, ranges, 0); }

void FrameWriter::send_local_fill(std::span<const Range> ranges, std::uint32_t value) {
  send_ranges(FrameType::kLocalFill, ranges, value);
}

void FrameWriter::send_device_state(std::span<const std::uint8_t> blob) {
  if (blob.size() > cfg_.max_device_state)
    throw std::invalid_argument("device state of " + std::to_string(blob.size()) + " bytes past the limit of " +
                                std::to_string(cfg_.max_device_state));
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kDeviceState);
  h.length = blob.size();
  const std::span<const std::uint8_t> payload[] = {blob};
  queue_frame(h, payload);
  flush_locked();
}

void FrameWriter::send_command(Command cmd, std::span<const std::uint8_t> args) {
  const auto c = static_cast<std::uint64_t>(cmd);
  if (c == 0 || c > kMaxCommand) throw std::invalid_argument("unknown command " + std::to_string(c));
  if (args.size() > kMaxCommandArgs)
    throw std::invalid_argument("command arguments of " + std::to_string(args.size()) + " bytes, limit 65536");
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kCommand);
  h.arg = c;
  h.length = args.size();
  const std::span<const std::uint8_t> payload[] = {args};
  queue_frame(h, payload);
  flush_locked();
}

void FrameWriter::send_end() {
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kEnd);
  queue_frame(h, {});
  flush_locked();
}

void FrameWriter::send_request(std::uint64_t first, std::uint32_t n) {
  if (n == 0) throw std::invalid_argument("send_request: zero pages");
  check_range(first, n, "send_request");
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kRequest);
  h.count = n;
  h.arg = first;
  queue_frame(h, {});
  flush_locked();
}

void FrameWriter::send_received_bitmap(const PageBitmap& received) {
  if (received.size() != cfg_.region_pages)
    throw std::invalid_argument("received bitmap has " + std::to_string(received.size()) + " pages, the region " +
                                std::to_string(cfg_.region_pages));
  std::vector<std::uint8_t> bits(received.byte_size());
  received.export_bytes(bits);
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kReceivedBitmap);
  h.length = bits.size();
  const std::span<const std::uint8_t> payload[] = {bits};
  queue_frame(h, payload);
  flush_locked();
}

void FrameWriter::send_ack(std::uint32_t kind, std::uint64_t value) {
  if (kind > kMaxAckKind) throw std::invalid_argument("unknown ack kind " + std::to_string(kind));
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kAck);
  h.count = kind;
  h.arg = value;
  queue_frame(h, {});
  flush_locked();
}

void FrameWriter::send_error(std::string_view message) {
  if (message.size() > kMaxErrorMessage) message = message.substr(0, kMaxErrorMessage);
  std::lock_guard lock(mu_);
  FrameHeader h;
  h.type = static_cast<std::uint8_t>(FrameType::kError);
  h.length = message.size();
  const std::span<const std::uint8_t> payload[] = {
      {reinterpret_cast<const std::uint8_t*>(message.data()), message.size()}};
  queue_frame(h, payload);
  flush_locked();
}

void FrameWriter::flush() {
  std::lock_guard lock(mu_);
  flush_locked();
}

void FrameWriter::flush_locked() {
  if (iovcnt_ == 0) return;
  ++flushes_;
  const std::size_t cnt = std::exchange(iovcnt_, 0);
  const std::size_t total = std::exchange(queued_bytes_, 0);
  nslots_ = 0;
  bounce_used_ = 0;
  if (out_ != nullptr) {
    stats_.syscalls += out_->write_all(iov_.data(), cnt, total, cfg_.timeout_ms);
  } else if (fd_ < 0) {
    for (std::size_t i = 0; i < cnt; ++i) {
      const auto* p = static_cast<const std::uint8_t*>(iov_[i].iov_base);
      memory_.insert(memory_.end(), p, p + iov_[i].iov_len);
    }
  } else {
    write_all(iov_.data(), cnt, total);
  }
  publish_sent();  // everything queued has gone out
}

void FrameWriter::publish_sent() noexcept {
  sent_pages_.store(stats_.pages, std::memory_order_relaxed);
  sent_zero_pages_.store(stats_.zero_pages, std::memory_order_relaxed);
  sent_bytes_.store(stats_.bytes, std::memory_order_relaxed);
}

WireStats FrameWriter::sent() const noexcept {
  WireStats s;
  s.pages = sent_pages_.load(std::memory_order_relaxed);
  s.zero_pages = sent_zero_pages_.load(std::memory_order_relaxed);
  s.bytes = sent_bytes_.load(std::memory_order_relaxed);
  return s;
}

void FrameWriter::write_all(struct iovec* iov, std::size_t iovcnt, std::size_t total) {
  std::size_t idx = 0;
  std::size_t done = 0;
  while (idx < iovcnt) {
    msghdr msg{};
    msg.msg_iov = iov + idx;
    msg.msg_iovlen = iovcnt - idx;
    stats_.syscalls += 1;
    const ssize_t r = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        if (blocking_)
          throw ConnectionLost("send: the peer read nothing for " + seconds(cfg_.timeout_ms) + " (timeout) after " +
                               std::to_string(done) + " of " + std::to_string(total) + " bytes");
        wait_ready(fd_, POLLOUT, cfg_.timeout_ms, "send");
        continue;
      }
      if (lost_errno(err))
        throw ConnectionLost("send: connection lost (" + std::string(std::strerror(err)) + ") after " +
                             std::to_string(done) + " of " + std::to_string(total) + " bytes");
      throw_errno("send", "sendmsg on fd " + std::to_string(fd_), 0, done);
    }
    auto left = static_cast<std::size_t>(r);
    done += left;
    while (idx < iovcnt && left >= iov[idx].iov_len) {
      left -= iov[idx].iov_len;
      ++idx;
    }
    if (left > 0) {
      iov[idx].iov_base = static_cast<std::uint8_t*>(iov[idx].iov_base) + left;
      iov[idx].iov_len -= left;
    }
  }
}

std::vector<std::uint8_t> FrameWriter::take_bytes() {
  std::lock_guard lock(mu_);
  flush_locked();
  return std::exchange(memory_, {});
}

WireStats FrameWriter::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

// ---- inputs ----

FdInput::FdInput(int fd, int timeout_ms)
    : fd_(fd), timeout_ms_(timeout_ms), blocking_(fd_is_blocking(fd)), ahead_(new std::uint8_t[kAhead]) {
  if (blocking_) set_timeout_option(fd_, SO_RCVTIMEO, timeout_ms_);
}

std::size_t FdInput::recv_some(struct iovec* iov, std::size_t iovcnt, int flags) {
  for (;;) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovcnt;
    syscalls += 1;
    const ssize_t r = ::recvmsg(fd_, &msg, flags);
    if (r >= 0) return static_cast<std::size_t>(r);
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      if (blocking_) throw ConnectionLost("recv: the peer was silent for " + seconds(timeout_ms_) + " (timeout)");
      wait_ready(fd_, POLLIN, timeout_ms_, "recv");
      continue;
    }
    if (lost_errno(err)) throw ConnectionLost("recv: connection lost (" + std::string(std::strerror(err)) + ")");
    throw_errno("recv", "recvmsg on fd " + std::to_string(fd_));
  }
}

std::size_t FdInput::read_full(struct iovec* iov_in, int iovcnt) {
  std::array<struct iovec, 4> iov{};
  if (iovcnt < 1 || iovcnt > static_cast<int>(iov.size())) throw std::invalid_argument("read_full: 1 to 4 iovecs");
  const auto cnt = static_cast<std::size_t>(iovcnt);
  std::size_t left = 0;
  for (std::size_t i = 0; i < cnt; ++i) {
    iov[i] = iov_in[i];
    left += iov[i].iov_len;
  }
  std::size_t idx = 0;
  std::size_t done = 0;
  auto advance = [&](std::size_t k) {
    done += k;
    left -= k;
    while (idx < cnt && k >= iov[idx].iov_len) {
      k -= iov[idx].iov_len;
      ++idx;
    }
    if (k > 0) {
      iov[idx].iov_base = static_cast<std::uint8_t*>(iov[idx].iov_base) + k;
      iov[idx].iov_len -= k;
    }
  };
  while (left > 0) {
    if (ahead_pos_ < ahead_len_) {
      // Serve what the read-ahead buffer holds.
      while (idx < cnt && iov[idx].iov_len == 0) ++idx;
      const std::size_t k = std::min(iov[idx].iov_len, ahead_len_ - ahead_pos_);
      std::memcpy(iov[idx].iov_base, ahead_.get() + ahead_pos_, k);
      ahead_pos_ += k;
      advance(k);
      continue;
    }
    if (left >= kAhead) {
      // Large: straight into the destination, all of it in as few calls as the kernel allows.
      while (idx < cnt && iov[idx].iov_len == 0) ++idx;
      const std::size_t r = recv_some(iov.data() + idx, cnt - idx, MSG_WAITALL);
      if (r == 0) return done;
      advance(r);
      continue;
    }
    // Small: whatever is there (at least one byte) into the read-ahead buffer.
    iovec a{ahead_.get(), kAhead};
    const std::size_t r = recv_some(&a, 1, 0);
    if (r == 0) return done;
    ahead_pos_ = 0;
    ahead_len_ = r;
  }
  return done;
}

void FdInput::truncated(const std::string& what, std::size_t got, std::size_t want) {
  throw ConnectionLost("the peer closed the connection in the middle of " + what + " (" + std::to_string(got) +
                       " of " + std::to_string(want) + " bytes)");
}

std::unique_ptr<FrameInput> open_input(const InputOpener& open, int fd, int timeout_ms) {
  if (!open) return std::make_unique<FdInput>(fd, timeout_ms);
  auto in = open(fd, timeout_ms);
  if (!in) throw ProtocolError("no input for fd " + std::to_string(fd));
  return in;
}

std::size_t MemoryInput::read_full(struct iovec* iov, int iovcnt) {
  std::size_t done = 0;
  for (int i = 0; i < iovcnt; ++i) {
    const std::size_t k = std::min(iov[i].iov_len, remaining());
    if (k > 0) std::memcpy(iov[i].iov_base, data_.data() + pos_, k);
    pos_ += k;
    done += k;
    if (k < iov[i].iov_len) break;
  }
  return done;
}

void MemoryInput::truncated(const std::string& what, std::size_t got, std::size_t want) {
  throw ProtocolError("truncated " + what + ": " + std::to_string(got) + " of " + std::to_string(want) + " bytes");
}

// ---- FrameHandler defaults ----

namespace {
[[noreturn]] void unexpected(FrameType t) {
  throw ProtocolError("unexpected " + frame_type_name(static_cast<std::uint8_t>(t)) + " frame here");
}
}  // namespace

void FrameHandler::discard(std::span<const Range>) { unexpected(FrameType::kDiscard); }
void FrameHandler::local_fill(std::span<const Range>, std::uint32_t) { unexpected(FrameType::kLocalFill); }
void FrameHandler::device_state(std::span<const std::uint8_t>) { unexpected(FrameType::kDeviceState); }
void FrameHandler::command(Command, std::span<const std::uint8_t>) { unexpected(FrameType::kCommand); }
void FrameHandler::end() { unexpected(FrameType::kEnd); }
void FrameHandler::request(std::uint64_t, std::uint32_t) { unexpected(FrameType::kRequest); }
void FrameHandler::received_bitmap(std::span<const std::uint8_t>) { unexpected(FrameType::kReceivedBitmap); }
void FrameHandler::ack(std::uint32_t, std::uint64_t) { unexpected(FrameType::kAck); }
void FrameHandler::error(std::string_view message) {
  throw ProtocolError("the peer reported an error: " + std::string(message));
}

// ---- FrameReader ----

FrameReader::FrameReader(FrameInput& in, const WireConfig& cfg, Direction dir) : in_(in), cfg_(cfg), dir_(dir) {
  cfg_.validate();
}

void FrameReader::read_exact(void* p, std::size_t n, const char* what) {
  iovec v{p, n};
  const std::size_t got = in_.read_full(&v, 1);
  if (got < n) in_.truncated(what, got, n);
}

void FrameReader::check_crc(const FrameHeader& h, std::uint32_t state) {
  std::uint8_t trailer[kCrcBytes];
  read_exact(trailer, kCrcBytes, "a CRC32C trailer");
  const std::uint32_t want = load_le<std::uint32_t>(trailer);
  const std::uint32_t got = ~state;
  if (want != got) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " frame: CRC32C mismatch (trailer 0x%08x, computed 0x%08x)", want, got);
    throw ProtocolError(frame_type_name(h.type) + buf);
  }
}

void FrameReader::read_payload(const FrameHeader& h, std::uint8_t* dst, std::size_t n) {
  std::uint8_t trailer[kCrcBytes];
  iovec v[2] = {{dst, n}, {trailer, kCrcBytes}};
  const std::size_t want = n + (cfg_.checksums ? kCrcBytes : 0);
  if (want == 0) return;
  // Payload and trailer in one call: a PAGES frame costs a header read and this.
  const std::size_t got = n == 0 ? in_.read_full(v + 1, 1) : in_.read_full(v, cfg_.checksums ? 2 : 1);
  if (got < want) in_.truncated("a " + frame_type_name(h.type) + " frame", kHeaderBytes + got, kHeaderBytes + want);
  if (cfg_.checksums) {
    std::uint32_t st = crc32c_update(0xFFFFFFFFu, hdr_.data(), kHeaderBytes);
    st = crc32c_update(st, dst, n);
    const std::uint32_t trailer_crc = load_le<std::uint32_t>(trailer);
    if (trailer_crc != ~st) {
      char buf[96];
      std::snprintf(buf, sizeof buf, " frame: CRC32C mismatch (trailer 0x%08x, computed 0x%08x)", trailer_crc, ~st);
      throw ProtocolError(frame_type_name(h.type) + buf);
    }
  }
}

std::span<const std::uint8_t> FrameReader::read_small_payload(const FrameHeader& h) {
  // Grow as bytes arrive, so a header announcing a large blob costs nothing until it is sent.
  const auto len = static_cast<std::size_t>(h.length);
  scratch_.clear();
  while (scratch_.size() < len) {
    const std::size_t have = scratch_.size();
    const std::size_t chunk = std::min<std::size_t>(len - have, std::size_t{1} << 20);
    scratch_.resize(have + chunk);
    iovec v{scratch_.data() + have, chunk};
    const std::size_t got = in_.read_full(&v, 1);
    if (got < chunk)
      in_.truncated("a " + frame_type_name(h.type) + " frame", kHeaderBytes + have + got, kHeaderBytes + len);
  }
  if (cfg_.checksums) {
    std::uint32_t st = crc32c_update(0xFFFFFFFFu, hdr_.data(), kHeaderBytes);
    check_crc(h, crc32c_update(st, scratch_.data(), scratch_.size()));
  }
  return {scratch_.data(), len};
}

std::optional<FrameType> FrameReader::next(FrameHandler& handler) {
  iovec v{hdr_.data(), kHeaderBytes};
  const std::size_t got = in_.read_full(&v, 1);
  if (got == 0) return std::nullopt;
  if (got < kHeaderBytes) in_.truncated("a frame header", got, kHeaderBytes);
  const FrameHeader h = decode_header(hdr_.data());
  validate_header(h, cfg_, dir_);
  const auto type = static_cast<FrameType>(h.type);
  stats_.frames += 1;
  stats_.bytes += kHeaderBytes + h.length + (cfg_.checksums ? kCrcBytes : 0);
  switch (type) {
    case FrameType::kPages: {
      std::uint8_t* dst = handler.page_buffer(h.arg, h.count);
      read_payload(h, dst, static_cast<std::size_t>(h.length));
      handler.pages(h.arg, h.count, dst);
      stats_.pages += h.count;
      break;
    }
    case FrameType::kZero:
      read_payload(h, nullptr, 0);
      handler.zero(h.arg, h.count);
      stats_.zero_pages += h.count;
      break;
    case FrameType::kDiscard:
    case FrameType::kLocalFill: {
      const auto p = read_small_payload(h);
      const char* name = type == FrameType::kDiscard ? "DISCARD" : "LOCAL_FILL";
      ranges_.resize(h.count);
      for (std::size_t i = 0; i < h.count; ++i) {
        ranges_[i] = {load_le<std::uint64_t>(p.data() + i * kRangeBytes),
                      load_le<std::uint64_t>(p.data() + i * kRangeBytes + 8)};
        validate_range(ranges_[i], cfg_, name);
      }
      if (type == FrameType::kDiscard)
        handler.discard(ranges_);
      else
        handler.local_fill(ranges_, static_cast<std::uint32_t>(h.arg));
      break;
    }
    case FrameType::kDeviceState:
      handler.device_state(read_small_payload(h));
      break;
    case FrameType::kCommand:
      handler.command(static_cast<Command>(h.arg), read_small_payload(h));
      break;
    case FrameType::kEnd:
      read_payload(h, nullptr, 0);
      handler.end();
      break;
    case FrameType::kRequest:
      read_payload(h, nullptr, 0);
      handler.request(h.arg, h.count);
      break;
    case FrameType::kReceivedBitmap: {
      const auto p = read_small_payload(h);
      const std::size_t tail = cfg_.region_pages % 8;
      if (tail != 0 && (p.back() >> tail) != 0)
        throw ProtocolError("RECEIVED_BITMAP frame: bits set past the region's " + std::to_string(cfg_.region_pages) +
                            " pages");
      handler.received_bitmap(p);
      break;
    }
    case FrameType::kAck:
      read_payload(h, nullptr, 0);
      handler.ack(h.count, h.arg);
      break;
    case FrameType::kError: {
      const auto p = read_small_payload(h);
      handler.error({reinterpret_cast<const char*>(p.data()), p.size()});
      break;
    }
  }
  stats_.syscalls = in_.syscalls;
  return type;
}

bool FrameReader::run(FrameHandler& handler) {
  for (;;) {
    const auto t = next(handler);
    if (!t) return false;
    if (*t == FrameType::kEnd) return true;
  }
}

// ---- receivers ----

void ControlForwarder::discard(std::span<const Range> r) {
  control_ ? control_->discard(r) : FrameHandler::discard(r);
}
void ControlForwarder::local_fill(std::span<const Range> r, std::uint32_t v) {
  control_ ? control_->local_fill(r, v) : FrameHandler::local_fill(r, v);
}
void ControlForwarder::device_state(std::span<const std::uint8_t> b) {
  control_ ? control_->device_state(b) : FrameHandler::device_state(b);
}
void ControlForwarder::command(Command c, std::span<const std::uint8_t> a) {
  control_ ? control_->command(c, a) : FrameHandler::command(c, a);
}
void ControlForwarder::end() { control_ ? control_->end() : FrameHandler::end(); }
void ControlForwarder::request(std::uint64_t f, std::uint32_t n) {
  control_ ? control_->request(f, n) : FrameHandler::request(f, n);
}
void ControlForwarder::received_bitmap(std::span<const std::uint8_t> b) {
  control_ ? control_->received_bitmap(b) : FrameHandler::received_bitmap(b);
}
void ControlForwarder::ack(std::uint32_t k, std::uint64_t v) { control_ ? control_->ack(k, v) : FrameHandler::ack(k, v); }
void ControlForwarder::error(std::string_view m) { control_ ? control_->error(m) : FrameHandler::error(m); }

std::uint8_t* RegionReceiver::page_buffer(std::uint64_t first, std::uint32_t) { return region_ + first * page_size_; }

void RegionReceiver::pages(std::uint64_t first, std::uint32_t n, const std::uint8_t*) {
  received_.set_range(first, first + n);
}

void RegionReceiver::zero(std::uint64_t first, std::uint32_t n) {
  for (std::uint64_t p = first; p < first + n; ++p) {
    std::uint8_t* a = region_ + p * page_size_;
    if (!is_zero(a, page_size_)) std::memset(a, 0, page_size_);
  }
  received_.set_range(first, first + n);
}

void RegionReceiver::discard(std::span<const Range> ranges) {
  for (const Range& r : ranges) received_.clear_range(r.first, r.first + r.npages);
  if (control_) control_->discard(ranges);
}

StagingReceiver::StagingReceiver(const WireConfig& cfg, PlaceFn place, ZeroFn place_zero, FrameHandler* control)
    : ControlForwarder(control),
      staging_(Mapping::anonymous(std::size_t{cfg.max_frame_pages()} * cfg.page_size)),
      place_(std::move(place)),
      place_zero_(std::move(place_zero)) {}

bool RequestSender::request(std::uint64_t first, std::uint32_t n) noexcept {
  if (failed()) return false;
  try {
    writer_.send_request(first, n);
    return true;
  } catch (const std::exception& e) {
    std::lock_guard lock(mu_);
    if (error_.empty()) error_ = e.what();
  } catch (...) {
    std::lock_guard lock(mu_);
    if (error_.empty()) error_ = "unknown error sending a page request";
  }
  // Release: error() readers that see failed() also see the message.
  failed_.store(true, std::memory_order_release);
  return false;
}

std::string RequestSender::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

std::uint8_t* StagingReceiver::page_buffer(std::uint64_t, std::uint32_t) { return staging_.data(); }

void StagingReceiver::pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) { place_(first, n, data); }

void StagingReceiver::zero(std::uint64_t first, std::uint32_t n) { place_zero_(first, n); }

// ---- CollectingHandler ----

void CollectingHandler::attach_region(std::uint8_t* region, std::shared_ptr<PageBitmap> received) {
  if (!received || received->size() != cfg_.region_pages)
    throw std::invalid_argument("received bitmap must have region_pages = " + std::to_string(cfg_.region_pages) +
                                " pages");
  region_ = region;
  received_ = std::move(received);
}

void CollectingHandler::detach_region() {
  region_ = nullptr;
  received_.reset();
}

Frame& CollectingHandler::keep(FrameType t) {
  kept_.emplace();
  kept_->type = t;
  return *kept_;
}

std::optional<Frame> CollectingHandler::pump(FrameReader& reader) {
  kept_.reset();
  while (!kept_) {
    if (!reader.next(*this)) return std::nullopt;
  }
  return std::exchange(kept_, std::nullopt);
}

std::uint8_t* CollectingHandler::page_buffer(std::uint64_t first, std::uint32_t n) {
  if (region_ != nullptr) return region_ + first * cfg_.page_size;
  pending_.data.resize(std::size_t{n} * cfg_.page_size);
  return pending_.data.data();
}

void CollectingHandler::pages(std::uint64_t first, std::uint32_t n, const std::uint8_t*) {
  if (region_ != nullptr) {
    received_->set_range(first, first + n);
    return;
  }
  Frame& f = keep(FrameType::kPages);
  f.first = first;
  f.count = n;
  f.data = std::move(pending_.data);
  pending_.data = {};
}

void CollectingHandler::zero(std::uint64_t first, std::uint32_t n) {
  if (region_ != nullptr) {
    RegionReceiver(region_, cfg_.page_size, *received_).zero(first, n);
    return;
  }
  Frame& f = keep(FrameType::kZero);
  f.first = first;
  f.count = n;
}

void CollectingHandler::discard(std::span<const Range> ranges) {
  if (region_ != nullptr)
    for (const Range& r : ranges) received_->clear_range(r.first, r.first + r.npages);
  keep(FrameType::kDiscard).ranges.assign(ranges.begin(), ranges.end());
}

void CollectingHandler::local_fill(std::span<const Range> ranges, std::uint32_t value) {
  Frame& f = keep(FrameType::kLocalFill);
  f.ranges.assign(ranges.begin(), ranges.end());
  f.value = value;
}

void CollectingHandler::device_state(std::span<const std::uint8_t> blob) {
  keep(FrameType::kDeviceState).data.assign(blob.begin(), blob.end());
}

void CollectingHandler::command(Command cmd, std::span<const std::uint8_t> args) {
  Frame& f = keep(FrameType::kCommand);
  f.value = static_cast<std::uint64_t>(cmd);
  f.data.assign(args.begin(), args.end());
}

void CollectingHandler::end() { keep(FrameType::kEnd); }

void CollectingHandler::request(std::uint64_t first, std::uint32_t n) {
  Frame& f = keep(FrameType::kRequest);
  f.first = first;
  f.count = n;
}

void CollectingHandler::received_bitmap(std::span<const std::uint8_t> bits) {
  keep(FrameType::kReceivedBitmap).data.assign(bits.begin(), bits.end());
}

void CollectingHandler::ack(std::uint32_t kind, std::uint64_t value) {
  Frame& f = keep(FrameType::kAck);
  f.count = kind;
  f.value = value;
}

void CollectingHandler::error(std::string_view message) {
  keep(FrameType::kError).data.assign(message.begin(), message.end());
}

std::vector<Frame> decode_frames(std::span<const std::uint8_t> bytes, const WireConfig& cfg, Direction dir) {
  MemoryInput in(bytes);
  FrameReader reader(in, cfg, dir);
  CollectingHandler h(cfg);
  std::vector<Frame> out;
  while (auto f = h.pump(reader)) out.push_back(std::move(*f));
  return out;
}

}  // namespace livemig::wire
