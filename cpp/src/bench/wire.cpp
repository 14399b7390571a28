#include "livemig/bench/wire.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "livemig/base/errors.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"

namespace livemig::bench::wire {

using livemig::wire::Direction;
using livemig::wire::FdInput;
using livemig::wire::FrameType;
using livemig::wire::kHeaderBytes;
using livemig::wire::RegionReceiver;
using livemig::wire::FrameReader;
using livemig::wire::FrameHandler;
using livemig::wire::FrameWriter;
using livemig::wire::FrameHeader;
namespace {

void send_exact(int fd, const std::uint8_t* p, std::size_t n) {
  while (n > 0) {
    const ssize_t r = ::send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) throw ConnectionLost("raw send: connection lost");
      throw_errno("send", "raw baseline");
    }
    p += r;
    n -= static_cast<std::size_t>(r);
  }
}

// Returns false at end of stream before the first byte.
bool recv_exact(int fd, std::uint8_t* p, std::size_t n) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::recv(fd, p + done, n - done, MSG_WAITALL);
    if (r == 0) {
      if (done == 0) return false;
      throw ConnectionLost("raw recv: the peer closed mid-message");
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == ECONNRESET) throw ConnectionLost("raw recv: connection lost");
      throw_errno("recv", "raw baseline");
    }
    done += static_cast<std::size_t>(r);
  }
  return true;
}

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// Serves REQUEST frames from the region on an urgent-channel writer.
class RequestServer : public FrameHandler {
 public:
  RequestServer(FrameWriter& out, const std::uint8_t* region, std::size_t page_size)
      : out_(out), region_(region), page_size_(page_size) {}
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { throw ProtocolError("no pages on the return path"); }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override {}
  void request(std::uint64_t first, std::uint32_t n) override {
    out_.send_pages(first, n, region_ + first * page_size_);
    out_.flush();
    ++served;
  }
  void end() override {}
  std::uint64_t served = 0;

 private:
  FrameWriter& out_;
  const std::uint8_t* region_;
  std::size_t page_size_;
};

}  // namespace

std::uint64_t raw_send(int fd, const std::uint8_t* data, std::size_t len, std::size_t chunk) {
  std::uint64_t calls = 0;
  std::size_t done = 0;
  while (done < len) {
    const std::size_t k = std::min(chunk, len - done);
    send_exact(fd, data + done, k);
    done += k;
    ++calls;
  }
  return calls;
}

std::uint64_t raw_recv(int fd, std::uint8_t* data, std::size_t len, std::size_t chunk) {
  std::uint64_t calls = 0;
  std::size_t done = 0;
  while (done < len) {
    const std::size_t k = std::min(chunk, len - done);
    if (!recv_exact(fd, data + done, k)) throw ConnectionLost("raw recv: the peer closed early");
    done += k;
    ++calls;
  }
  return calls;
}

std::vector<std::uint64_t> raw_pingpong_client(int fd, std::size_t request, std::size_t reply, std::size_t iters,
                                               RawRegion region, int reply_fd) {
  const int in = reply_fd >= 0 ? reply_fd : fd;
  std::vector<std::uint8_t> req(request, 0x5a);
  std::vector<std::uint8_t> rep(reply);
  std::vector<std::uint64_t> out;
  out.reserve(iters);
  for (std::size_t i = 0; i < iters; ++i) {
    const std::uint64_t t0 = now_ns();
    send_exact(fd, req.data(), req.size());
    if (region.base != nullptr && reply > kHeaderBytes) {
      std::uint8_t* page = region.base + ((i * 7919) % region.pages) * region.page_size;
      if (!recv_exact(in, rep.data(), kHeaderBytes) || !recv_exact(in, page, reply - kHeaderBytes))
        throw ConnectionLost("raw ping-pong: the server closed");
    } else if (!recv_exact(in, rep.data(), rep.size())) {
      throw ConnectionLost("raw ping-pong: the server closed");
    }
    out.push_back(now_ns() - t0);
  }
  ::shutdown(fd, SHUT_WR);
  return out;
}

std::uint64_t raw_pingpong_server(int fd, std::size_t request, std::size_t reply, RawRegion region, int reply_fd) {
  const int out = reply_fd >= 0 ? reply_fd : fd;
  std::vector<std::uint8_t> req(request);
  std::vector<std::uint8_t> rep(reply, 0xa5);
  std::uint64_t n = 0;
  while (recv_exact(fd, req.data(), req.size())) {
    if (region.base != nullptr && reply > kHeaderBytes) {
      const std::uint8_t* page = region.base + ((n * 7919) % region.pages) * region.page_size;
      iovec iov[2] = {{rep.data(), kHeaderBytes}, {const_cast<std::uint8_t*>(page), reply - kHeaderBytes}};
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = 2;
      if (::sendmsg(out, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(reply)) throw_errno("send", "raw ping-pong");
    } else {
      send_exact(out, rep.data(), rep.size());
    }
    ++n;
  }
  return n;
}

std::vector<std::uint64_t> request_client(int ret_fd, int urgent_fd, const WireConfig& cfg, std::uint8_t* region,
                                          std::size_t iters) {
  FrameWriter ret(ret_fd, cfg);
  FdInput in(urgent_fd, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  PageBitmap received(cfg.region_pages);
  RegionReceiver receiver(region, cfg.page_size, received);
  std::vector<std::uint64_t> out;
  out.reserve(iters);
  for (std::size_t i = 0; i < iters; ++i) {
    const std::uint64_t page = (i * 7919) % cfg.region_pages;
    const std::uint64_t t0 = now_ns();
    ret.send_request(page, 1);
    const auto t = reader.next(receiver);
    if (t != FrameType::kPages || !received.test(page)) throw ProtocolError("request client: wrong answer");
    out.push_back(now_ns() - t0);
  }
  ret.send_end();
  return out;
}

std::uint64_t request_server(int ret_fd, int urgent_fd, const WireConfig& cfg, const std::uint8_t* region) {
  FrameWriter urgent(urgent_fd, cfg);
  FdInput in(ret_fd, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToSource);
  RequestServer server(urgent, region, cfg.page_size);
  reader.run(server);
  urgent.send_end();
  return server.served;
}

}  // namespace livemig::bench::wire
