// The counters a live view reads while a migration runs: the Timeline (adds and level samples from
// many threads, read at the same time), the scanner's timeline hooks, and FrameWriter::sent() read
// while another thread writes. Run under ThreadSanitizer in CI.
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <numeric>
#include <thread>
#include <vector>

#include "check.hpp"
#include "livemig/base/timeline.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/source/page_scanner.hpp"
#include "livemig/wire/stream.hpp"

using namespace livemig;

namespace {

std::uint64_t sum(const std::vector<std::uint64_t>& v) { return std::accumulate(v.begin(), v.end(), std::uint64_t{0}); }

// Four threads add to two series and sample a level while a reader polls the totals: every add
// lands in exactly one bin (the bins sum to the totals), and nothing before start() counts.
void timeline_concurrent() {
  Timeline t(0.001, 1000);
  t.add(Timeline::kRequests, 5);  // before start: ignored
  CHECK(t.total(Timeline::kRequests) == 0);
  t.start();
  constexpr int kThreads = 4, kAdds = 20000;
  std::atomic<bool> done{false};
  std::thread reader([&] {
    std::uint64_t last = 0;
    while (!done.load(std::memory_order_acquire)) {
      const std::uint64_t now = t.total(Timeline::kRequests);
      CHECK(now >= last);  // a total never goes back
      last = now;
    }
  });
  std::vector<std::thread> ws;
  for (int i = 0; i < kThreads; ++i)
    ws.emplace_back([&, i] {
      for (int k = 0; k < kAdds; ++k) {
        t.add(Timeline::kRequests, 1);
        t.add(Timeline::kPushPages, 3);
        if (t.due(Timeline::kLeftPages)) t.level(Timeline::kLeftPages, static_cast<std::uint64_t>(i * kAdds + k));
      }
    });
  for (auto& w : ws) w.join();
  done.store(true, std::memory_order_release);
  reader.join();
  CHECK(t.total(Timeline::kRequests) == kThreads * kAdds);
  CHECK(t.total(Timeline::kPushPages) == 3ull * kThreads * kAdds);
  CHECK(sum(t.series(Timeline::kRequests)) == kThreads * kAdds);
  CHECK(sum(t.series(Timeline::kPushPages)) == 3ull * kThreads * kAdds);
  const auto left = t.series(Timeline::kLeftPages);
  CHECK(left.size() == t.series(Timeline::kRequests).size());
  CHECK(t.started_at() > 0);
}

// The scanner counts requests, pages taken for them and background pages into its timeline, and
// samples the dirty pages left; the figures match its own counters.
void scanner_counts() {
  constexpr std::size_t kPages = 4096;
  PageBitmap dirty(kPages), sent(kPages);
  dirty.set_range(0, kPages);
  PageScanner sc(dirty, sent);
  Timeline t(0.001, 10000);
  sc.set_timeline(&t);
  t.start();
  std::vector<PageRun> out;
  CHECK(sc.take_request(100, 4, out));
  std::size_t background = 0;
  std::thread requester([&] {
    for (std::uint64_t p = 2000; p < 2100; ++p) sc.request(p, 1);
  });
  while (sc.next_batch(64, out) != 0) {
    for (const PageRun& r : out)
      if (!r.urgent()) background += r.npages;
  }
  requester.join();
  while (sc.next_batch(64, out) != 0) {
    for (const PageRun& r : out)
      if (!r.urgent()) background += r.npages;
  }
  const ScannerCounters c = sc.counters();
  CHECK(t.total(Timeline::kRequests) == c.requests);
  CHECK(c.requests == 101);
  CHECK(t.total(Timeline::kRequestPages) == c.request_pages_served);
  CHECK(t.total(Timeline::kPushPages) == c.background_pages);
  CHECK(c.background_pages == background);
  CHECK(c.request_pages_served + c.background_pages == kPages);
  CHECK(t.total(Timeline::kLeftPages) <= kPages);  // the last sample: a level, not a count
  sc.set_timeline(nullptr);
}

// FrameWriter::sent() read from another thread while pages go out: it only grows, and ends equal
// to stats().
void writer_sent_live() {
  test::Pair p;
  wire::WireConfig cfg;
  cfg.page_size = 4096;
  cfg.region_pages = 1024;
  wire::FrameWriter w(p.a.get(), cfg);
  std::vector<std::uint8_t> pages(1024 * 4096, 1);
  std::atomic<bool> done{false};
  std::thread drain([&] {
    std::vector<std::uint8_t> buf(1 << 16);
    while (::read(p.b.get(), buf.data(), buf.size()) > 0) {
    }
  });
  std::thread reader([&] {
    std::uint64_t last = 0;
    while (!done.load(std::memory_order_acquire)) {
      const auto s = w.sent();
      CHECK(s.bytes >= last);
      last = s.bytes;
    }
  });
  for (int round = 0; round < 8; ++round) {
    w.send_pages(0, 1024, pages.data());
    w.flush();
  }
  done.store(true, std::memory_order_release);
  reader.join();
  const auto s = w.sent();
  const auto full = w.stats();
  CHECK(s.pages == 8 * 1024 && s.pages == full.pages && s.bytes == full.bytes);
  ::shutdown(p.a.get(), SHUT_WR);
  drain.join();
}

}  // namespace

int main(int argc, char** argv) {
  return test::run(argc, argv,
                   {{"timeline_concurrent", timeline_concurrent},
                    {"scanner_counts", scanner_counts},
                    {"writer_sent_live", writer_sent_live}});
}
