// livemig_wire_ab: the plaintext frame path's throughput and request latency, using only the
// FrameWriter / FdInput / FrameReader API that predates TLS, so the same file builds against an
// older tree: run both binaries alternately to compare before and after a change (docs/performance.md).
//
//   livemig_wire_ab [rounds]   one line per round: bulk GB/s and each end's CPU ns per byte
//                              (socketpair, TCP), one-page request round trip p50 in us
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/bench/wire.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"

using namespace livemig;

namespace {

std::pair<UniqueFd, UniqueFd> pair_of(bool tcp) {
  if (!tcp) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) throw_errno("socketpair", "ab");
    return {UniqueFd(sv[0]), UniqueFd(sv[1])};
  }
  UniqueFd lst(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(lst.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(lst.get(), 1) != 0 ||
      ::getsockname(lst.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw_errno("listen", "ab");
  UniqueFd a(::socket(AF_INET, SOCK_STREAM, 0));
  if (::connect(a.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0) throw_errno("connect", "ab");
  UniqueFd b(::accept(lst.get(), nullptr, nullptr));
  const int one = 1;
  ::setsockopt(a.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(b.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return {std::move(a), std::move(b)};
}

struct EndOnly : wire::FrameHandler {
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override {}
  void end() override {}
};

double thread_cpu() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

struct Bulk {
  double gbps;
  double sender_ns_per_byte;
  double receiver_ns_per_byte;
};

// 1 GiB of 1 MiB page frames from a 64 MiB region into another.
Bulk bulk(bool tcp) {
  constexpr std::size_t kPage = 4096;
  constexpr std::size_t kRegion = 64u << 20;
  constexpr int kPasses = 16;
  auto [a, b] = pair_of(tcp);
  Mapping src = Mapping::anonymous(kRegion);
  Mapping dst = Mapping::anonymous(kRegion);
  std::memset(src.data(), 0x5a, kRegion);
  std::memset(dst.data(), 0, kRegion);
  wire::WireConfig cfg;
  cfg.page_size = kPage;
  cfg.region_pages = kRegion / kPage;
  cfg.frame_pages = 256;
  const auto t0 = std::chrono::steady_clock::now();
  double sender_cpu = 0;
  std::thread sender([&] {
    const double c0 = thread_cpu();
    wire::FrameWriter w(a.get(), cfg);
    for (int p = 0; p < kPasses; ++p) {
      w.send_pages(0, cfg.region_pages, src.data());
      w.flush();
    }
    w.send_end();
    sender_cpu = thread_cpu() - c0;
  });
  const double c0 = thread_cpu();
  wire::FdInput in(b.get(), cfg.timeout_ms);
  wire::FrameReader reader(in, cfg, wire::Direction::kToDestination);
  PageBitmap received(cfg.region_pages);
  EndOnly control;
  wire::RegionReceiver rx(dst.data(), kPage, received, &control);
  if (!reader.run(rx)) std::abort();
  const double receiver_cpu = thread_cpu() - c0;
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  sender.join();
  if (std::memcmp(src.data(), dst.data(), kRegion) != 0) std::abort();
  const double bytes = static_cast<double>(kRegion) * kPasses;
  return {bytes / s / 1e9, sender_cpu / bytes * 1e9, receiver_cpu / bytes * 1e9};
}

// One-page requests answered on a second socket (the existing request loops); p50 in us.
double request_p50() {
  constexpr std::size_t kPage = 4096;
  constexpr std::size_t kPages = 1024;
  auto [ra, rb] = pair_of(true);
  auto [ua, ub] = pair_of(true);
  std::vector<std::uint8_t> src(kPages * kPage, 0x11), dst(kPages * kPage);
  wire::WireConfig cfg;
  cfg.page_size = kPage;
  cfg.region_pages = kPages;
  std::thread server([&] { bench::wire::request_server(rb.get(), ua.get(), cfg, src.data()); });
  auto ns = bench::wire::request_client(ra.get(), ub.get(), cfg, dst.data(), 2000);
  server.join();
  std::sort(ns.begin(), ns.end());
  return static_cast<double>(ns[ns.size() / 2]) / 1000.0;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 1;
  for (int r = 0; r < rounds; ++r) {
    const Bulk u = bulk(false);
    const Bulk t = bulk(true);
    const double q = request_p50();
    std::printf("unix %.2f GB/s (cpu %.3f + %.3f ns/B)  tcp %.2f GB/s (cpu %.3f + %.3f ns/B)  request p50 %.1f us\n",
                u.gbps, u.sender_ns_per_byte, u.receiver_ns_per_byte, t.gbps, t.sender_ns_per_byte,
                t.receiver_ns_per_byte, q);
    std::fflush(stdout);
  }
  return 0;
}
