// Concurrency test of the wire: several threads share one FrameWriter (bulk pages and urgent
// replies interleaved), while the other end reads into a region and sends requests back on the
// same socket (full duplex). Every page must arrive intact exactly where it belongs, with and
// without checksums. Built and run under ThreadSanitizer by .ci/run.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"
#include "check.hpp"

using namespace livemig;
using namespace livemig::wire;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kPages = 2048 + 5;

std::pair<UniqueFd, UniqueFd> socket_pair() {
  int sv[2];
  CHECK(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

std::vector<std::uint8_t> pattern_region(std::uint64_t seed) {
  std::vector<std::uint8_t> r(kPages * kPage);
  std::mt19937_64 g(seed);
  for (std::size_t i = 0; i < r.size(); i += 8) {
    const std::uint64_t v = g();
    std::memcpy(r.data() + i, &v, 8);
  }
  // Some zero pages so ZERO frames travel too.
  for (std::uint64_t p = 0; p < kPages; p += 17) std::memset(r.data() + p * kPage, 0, kPage);
  return r;
}

WireConfig config(bool checksums) {
  WireConfig c;
  c.page_size = kPage;
  c.region_pages = kPages;
  c.checksums = checksums;
  c.frame_pages = 32;
  c.batch_bytes = 256 * 1024;
  c.timeout_ms = 20000;
  return c;
}

// Counts requests and END, forwards requests to a callback.
class Control : public FrameHandler {
 public:
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override {}
  void end() override { ended = true; }
  void command(Command c, std::span<const std::uint8_t>) override { commands.push_back(c); }
  bool ended = false;
  std::vector<Command> commands;
};

// Four threads send disjoint quarters of the region through one writer while a fifth answers
// requests coming back on the same socket; the receiver checks every page and the counts.
void shared_writer_full_duplex(bool checksums) {
  const WireConfig cfg = config(checksums);
  const auto src = pattern_region(checksums ? 7 : 8);
  std::vector<std::uint8_t> dst(src.size(), 0xEE);
  auto [a, b] = socket_pair();
  FrameWriter out(a.get(), cfg);
  constexpr int kSenders = 4;
  constexpr std::uint32_t kRequests = 200;
  std::atomic<std::uint32_t> answered{0};

  // Source side: return-path reader answering requests through the shared writer.
  std::thread answerer([&] {
    FdInput in(a.get(), cfg.timeout_ms);
    FrameReader reader(in, cfg, Direction::kToSource);
    struct Server : FrameHandler {
      FrameWriter* w;
      const std::uint8_t* region;
      std::atomic<std::uint32_t>* answered;
      std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
      void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
      void zero(std::uint64_t, std::uint32_t) override {}
      void request(std::uint64_t first, std::uint32_t n) override {
        w->send_urgent_pages(first, n, region + first * kPage);
        answered->fetch_add(1, std::memory_order_relaxed);
      }
      void end() override {}
    } server;
    server.w = &out;
    server.region = src.data();
    server.answered = &answered;
    CHECK(reader.run(server));
  });
  std::vector<std::thread> senders;
  for (int t = 0; t < kSenders; ++t) {
    senders.emplace_back([&, t] {
      const std::uint64_t lo = kPages * static_cast<std::uint64_t>(t) / kSenders;
      const std::uint64_t hi = kPages * static_cast<std::uint64_t>(t + 1) / kSenders;
      for (std::uint64_t p = lo; p < hi; p += 50) {
        const std::uint64_t n = std::min<std::uint64_t>(50, hi - p);
        out.send_pages(p, n, src.data() + p * kPage, true);
      }
      out.flush();
    });
  }

  // Destination side: a requester thread on the return path, the reader in this thread.
  FrameWriter ret(b.get(), cfg);
  std::thread requester([&] {
    for (std::uint32_t i = 0; i < kRequests; ++i) ret.send_request((i * 131u) % (kPages - 3), 1 + i % 3);
  });
  PageBitmap received(kPages);
  Control control;
  RegionReceiver receiver(dst.data(), kPage, received, &control);
  FdInput in(b.get(), cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  // Everything the senders queued goes out; once the answers are too, the source ends the stream.
  // (The reader below must run meanwhile, or full socket buffers would stall the senders.)
  std::thread closer([&] {
    for (auto& s : senders) s.join();
    requester.join();
    while (answered.load(std::memory_order_relaxed) < kRequests) std::this_thread::yield();
    out.send_command(Command::kComplete);
    out.send_end();
  });
  CHECK(reader.run(receiver));
  CHECK(control.commands.size() == 1 && control.commands[0] == Command::kComplete);
  ret.send_end();
  closer.join();
  answerer.join();
  CHECK(received.count() == kPages);
  CHECK(std::memcmp(src.data(), dst.data(), src.size()) == 0);
  const WireStats st = out.stats();
  CHECK(st.pages + st.zero_pages >= kPages);
  CHECK(st.syscalls < st.frames);  // batched
}

// Postcopy receive: pages land in a staging buffer and go to a placement callback.
void staging_receiver() {
  const WireConfig cfg = config(true);
  const auto src = pattern_region(3);
  std::vector<std::uint8_t> dst(src.size(), 0xEE);
  auto [a, b] = socket_pair();
  std::thread sender([&] {
    FrameWriter out(a.get(), cfg);
    out.send_pages(0, kPages, src.data(), true);
    out.send_end();
  });
  std::uint64_t placed = 0;
  std::uint64_t zeroed = 0;
  StagingReceiver::PlaceFn place = [&](std::uint64_t first, std::uint32_t n, const std::uint8_t* data) {
    std::memcpy(dst.data() + first * kPage, data, std::size_t{n} * kPage);
    placed += n;
  };
  StagingReceiver::ZeroFn place_zero = [&](std::uint64_t first, std::uint32_t n) {
    std::memset(dst.data() + first * kPage, 0, std::size_t{n} * kPage);
    zeroed += n;
  };
  Control control;
  StagingReceiver receiver(cfg, place, place_zero, &control);
  FdInput in(b.get(), cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  CHECK(reader.run(receiver));
  sender.join();
  CHECK(placed + zeroed == kPages);
  CHECK(zeroed == (kPages + 16) / 17);
  CHECK(std::memcmp(src.data(), dst.data(), src.size()) == 0);
}

// A peer that closes mid-payload gives ConnectionLost, not a hang or a partial success.
void close_mid_payload() {
  const WireConfig cfg = config(false);
  const auto src = pattern_region(5);
  auto [a, b] = socket_pair();
  {
    FrameWriter mem(-1, cfg);
    mem.send_pages(0, 4, src.data());
    auto bytes = mem.take_bytes();
    CHECK(::write(a.get(), bytes.data(), bytes.size() - 100) == static_cast<ssize_t>(bytes.size() - 100));
    a.reset();
  }
  std::vector<std::uint8_t> dst(src.size());
  PageBitmap received(kPages);
  RegionReceiver receiver(dst.data(), kPage, received);
  FdInput in(b.get(), cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  bool lost = false;
  try {
    reader.next(receiver);
  } catch (const ConnectionLost&) {
    lost = true;
  }
  CHECK(lost);
  CHECK(received.count() == 0);
}

// Fault threads sending requests through a RequestSender: all arrive; after the peer closes,
// request() returns false without throwing and keeps the first error.
void request_sender() {
  const WireConfig cfg = config(false);
  auto [a, b] = socket_pair();
  FrameWriter out(b.get(), cfg);
  RequestSender sender(out);
  constexpr int kThreads = 3;
  constexpr int kEach = 100;
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) CHECK(sender.request(static_cast<std::uint64_t>(t * kEach + i), 1));
    });
  FdInput in(a.get(), cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToSource);
  struct Count : FrameHandler {
    std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
    void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
    void zero(std::uint64_t, std::uint32_t) override {}
    void request(std::uint64_t first, std::uint32_t) override { seen.push_back(first); }
    std::vector<std::uint64_t> seen;
  } count;
  for (int i = 0; i < kThreads * kEach; ++i) CHECK(reader.next(count) == FrameType::kRequest);
  for (auto& t : ts) t.join();
  std::sort(count.seen.begin(), count.seen.end());
  for (int i = 0; i < kThreads * kEach; ++i) CHECK(count.seen[static_cast<std::size_t>(i)] == static_cast<std::uint64_t>(i));
  a.reset();
  bool refused = false;
  for (int i = 0; i < 1000 && !refused; ++i) refused = !sender.request(1, 1);
  CHECK(refused && sender.failed() && !sender.error().empty());
  CHECK(!sender.request(2, 1));
}

}  // namespace

void shared_writer_full_duplex_plain() { shared_writer_full_duplex(false); }
void shared_writer_full_duplex_checksums() { shared_writer_full_duplex(true); }

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"shared_writer_full_duplex", shared_writer_full_duplex_plain},
                             {"shared_writer_full_duplex_checksums", shared_writer_full_duplex_checksums},
                             {"staging_receiver", staging_receiver},
                             {"close_mid_payload", close_mid_payload},
                             {"request_sender", request_sender}});
}
