// Stress tests of the source's concurrent parts, run under ThreadSanitizer in CI:
//  1. The balloon device over the source's hint sink: guest threads ack rounds and hint (current
//     and stale ids) while the host starts and stops rounds; no hint is accepted outside its round,
//     and once host_stop() returns nothing more of the round lands.
//  2. PageScanner: sender threads take batches (some sends "fail" and are put back) while a
//     request thread queues urgent requests and a writer re-dirties pages; at the end every page's
//     last written version was delivered.
//  3. Kernel dirty tracking: writer threads store into a tracked region while syncs run; every
//     page written is dirty after the final sync.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/source/hint_sink.hpp"
#include "livemig/source/page_scanner.hpp"
#include "livemig/source/source.hpp"
#include "check.hpp"
#include "livemig/base/page_size.hpp"

using namespace livemig;

namespace {

void balloon_rounds() {
  constexpr std::size_t kPages = 1 << 16;
  constexpr int kGuests = 2, kRounds = 300;
  PageBitmap dirty(kPages, true), hinted(kPages);
  HintSink target(dirty, hinted, nullptr);
  balloon::Device sink(kPages, target);
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> accepted_pages{0}, accepted_hints{0};
  std::vector<std::thread> guests;
  for (int g = 0; g < kGuests; ++g) {
    guests.emplace_back([&, g] {
      std::mt19937_64 rng(static_cast<std::uint64_t>(g) + 1);
      while (!done.load(std::memory_order_acquire)) {
        const std::uint32_t id = sink.cmd_id();
        if (sink.state() == balloon::State::Requested) sink.ack(id);
        const std::uint64_t first = rng() % kPages;
        const std::uint64_t n = 1 + rng() % std::min<std::uint64_t>(512, kPages - first);
        // A stale id (any other than the current one) never lands.
        CHECK(!sink.hint(id ^ 0x40000000U, first, n));
        if (sink.hint(id, first, n)) {
          accepted_hints.fetch_add(1, std::memory_order_relaxed);
          accepted_pages.fetch_add(n, std::memory_order_relaxed);
          // Applied before hint() returned.
          CHECK(hinted.test(first) && hinted.test(first + n - 1) && !dirty.test(first));
        }
        CHECK(!sink.hint(id, kPages, 1));  // outside the region
        if (rng() % 64 == 0) sink.stop(id);
        std::this_thread::yield();
      }
    });
  }
  std::uint32_t id = balloon::kFirstRoundId;
  for (int r = 0; r < kRounds; ++r) {
    sink.host_request(id);
    CHECK(sink.cmd_id() == id);
    for (int spin = 0; spin < 200 && sink.state() == balloon::State::Requested; ++spin) std::this_thread::yield();
    std::this_thread::yield();
    if (r % 2 == 0) sink.host_stop(); else sink.host_done();
    // Nothing of the round lands after the stop returned.
    const balloon::Counters before = sink.counters();
    for (int k = 0; k < 50; ++k) std::this_thread::yield();
    const balloon::Counters after = sink.counters();
    CHECK(before.hints_accepted == after.hints_accepted && before.pages_hinted == after.pages_hinted);
    id = balloon::next_round_id(id);
  }
  done.store(true, std::memory_order_release);
  for (auto& t : guests) t.join();
  const balloon::Counters c = sink.counters();
  CHECK(c.hints_accepted == accepted_hints.load());
  CHECK(c.pages_hinted == accepted_pages.load());
  CHECK(c.hints_dropped_invalid > 0);
  std::printf("hint sink: %llu hints accepted (%llu pages), %llu stale\n",
              static_cast<unsigned long long>(c.hints_accepted), static_cast<unsigned long long>(c.pages_hinted),
              static_cast<unsigned long long>(c.hints_dropped_stale));
  CHECK(balloon::next_round_id(0xFFFFFFFFU) == 0x80000000U && balloon::next_round_id(0x80000000U) == 0x80000001U);
  CHECK(balloon::next_round_id(balloon::kCmdDone) == balloon::kFirstRoundId);
}

void scanner_senders_requests_writer() {
  constexpr std::size_t kPages = 1 << 14;
  PageBitmap dirty(kPages, true), sent(kPages);
  PageScanner scanner(dirty, sent);
  std::vector<std::atomic<std::uint32_t>> version(kPages), delivered(kPages);
  std::atomic<bool> writer_done{false}, requests_done{false};

  auto deliver = [&](std::uint64_t p) {
    const std::uint32_t v = version[p].load(std::memory_order_relaxed);
    std::uint32_t cur = delivered[p].load(std::memory_order_relaxed);
    while (cur < v && !delivered[p].compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
    }
  };
  auto sender = [&](int seed) {
    std::mt19937 rng(static_cast<unsigned>(seed));
    std::vector<PageRun> runs;
    for (;;) {
      const bool quiet = writer_done.load(std::memory_order_acquire) && requests_done.load(std::memory_order_acquire);
      if (scanner.next_batch(1 + rng() % 300, runs) == 0) {
        if (quiet && scanner.pending_requests() == 0 && dirty.count() == 0) return;
        scanner.wait_for_request(std::chrono::microseconds(200));
        continue;
      }
      for (const PageRun& r : runs) {
        for (std::uint64_t p = r.first; p < r.first + r.npages; ++p) CHECK(sent.test(p));
      }
      if (rng() % 10 == 0) {
        scanner.send_failed(runs);
      } else {
        for (const PageRun& r : runs)
          for (std::uint64_t p = r.first; p < r.first + r.npages; ++p) deliver(p);
      }
    }
  };
  std::thread writer([&] {
    std::mt19937 rng(7);
    for (int i = 0; i < 60000; ++i) {
      const std::size_t p = rng() % kPages;
      version[p].fetch_add(1, std::memory_order_relaxed);
      dirty.set(p);  // acq_rel: the new version is visible to whoever takes the bit
    }
    writer_done.store(true, std::memory_order_release);
  });
  std::thread requester([&] {
    std::mt19937 rng(11);
    for (int i = 0; i < 15000; ++i) {
      const std::uint64_t p = rng() % kPages;
      const std::uint64_t n = std::min<std::uint64_t>(1 + rng() % 4, kPages - p);
      CHECK(scanner.request(p, n));
    }
    CHECK(!scanner.request(kPages, 1));
    requests_done.store(true, std::memory_order_release);
  });
  std::thread s1(sender, 1), s2(sender, 2);
  writer.join();
  requester.join();
  s1.join();
  s2.join();
  for (std::size_t p = 0; p < kPages; ++p) {
    CHECK(sent.test(p));
    CHECK(!dirty.test(p));
    CHECK(delivered[p].load() == version[p].load());
  }
  const ScannerCounters c = scanner.counters();
  CHECK(c.requests == 15000 && c.requests_invalid == 1);
  CHECK(c.pages_put_back > 0);
  std::printf("scanner: %llu background, %llu urgent served, %llu dropped, %llu put back\n",
              static_cast<unsigned long long>(c.background_pages), static_cast<unsigned long long>(c.request_pages_served),
              static_cast<unsigned long long>(c.request_pages_dropped), static_cast<unsigned long long>(c.pages_put_back));
}

void kernel_tracking_with_writers() {
  constexpr std::size_t kPages = 4096;
  std::unique_ptr<Source> src;
  try {
    src = std::make_unique<Source>(kPages, TrackMode::Kernel, Backing::Anonymous, system_page_size());
  } catch (const UnsupportedError& e) {
    test::skip(std::string("kernel dirty tracking unavailable: ") + e.what());
  }
  src->dirty()->reset();
  std::vector<std::atomic<bool>> written(kPages);
  std::atomic<int> running{2};
  // A guest balloon thread hints the upper half (which the writers never touch) while they write
  // the lower half and syncs run: hint resets of kernel tracking and harvests interleave freely.
  balloon::Recorder unused(kPages);
  balloon::Device sink(kPages, unused);
  sink.set_target(std::shared_ptr<balloon::HintTarget>(std::shared_ptr<void>(), &src->hint_sink()));
  sink.host_request(balloon::kFirstRoundId);
  CHECK(sink.ack(balloon::kFirstRoundId));
  std::thread hinter([&] {
    std::mt19937 rng(5);
    while (running.load(std::memory_order_acquire) != 0) {
      const std::size_t first = kPages / 2 + rng() % (kPages / 2 - 64);
      CHECK(sink.hint(balloon::kFirstRoundId, first, 1 + rng() % 64));
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 3);
      for (int i = 0; i < 3000; ++i) {
        const std::size_t p = rng() % (kPages / 2);
        written[p].store(true, std::memory_order_relaxed);
        reinterpret_cast<std::atomic<std::uint8_t>*>(src->data() + p * system_page_size())->fetch_add(1, std::memory_order_relaxed);
      }
      running.fetch_sub(1, std::memory_order_release);
    });
  }
  while (running.load(std::memory_order_acquire) != 0) src->sync();
  for (auto& t : writers) t.join();
  hinter.join();
  sink.host_stop();
  src->sync();
  CHECK(sink.counters().hints_accepted > 0 && sink.counters().hints_failed == 0);
  CHECK(src->dirty()->none(kPages / 2, kPages));
  for (std::size_t p = 0; p < kPages; ++p) CHECK(src->dirty()->test(p) == written[p].load());
  CHECK(src->sync() == 0);
  std::printf("kernel tracking: %zu pages written, all seen\n", src->dirty()->count());
}

}  // namespace

int main(int argc, char** argv) {
  return test::run(argc, argv,
                   {{"balloon_rounds", balloon_rounds},
                    {"scanner_senders_requests_writer", scanner_senders_requests_writer},
                    {"kernel_tracking_with_writers", kernel_tracking_with_writers}});
}
