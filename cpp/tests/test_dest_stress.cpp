// Stress test of DestRegion under concurrency (run under ThreadSanitizer by CI): racing placers of
// the same pages, faulting threads served through the request queue while a background pusher
// and local fills run, discards racing placement, and the prefault racing precopy receivers
// before postcopy. Faults are real userfaultfd faults; TSan
// does not see the kernel's writes, so the checks read only what the kernel placed.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "livemig/dest/region.hpp"
#include "livemig/base/errors.hpp"
#include "check.hpp"
#include "livemig/base/page_size.hpp"

using livemig::DestRegion;
using livemig::PageRange;

namespace {

constexpr std::size_t kPages = 1024;

std::vector<std::uint8_t> make_ref(std::size_t pages, std::size_t ps, unsigned seed) {
  std::vector<std::uint8_t> v(pages * ps);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng());
  return v;
}

std::uint8_t read_byte(const std::uint8_t* p) { return *static_cast<const volatile std::uint8_t*>(p); }

// Serves the request queue from `ref` until `stop`.
void serve(DestRegion& d, const std::vector<std::uint8_t>& ref, const std::atomic<bool>& stop) {
  const std::size_t ps = d.page_bytes();
  while (!stop.load()) {
    d.queue().wait(2'000'000);
    for (const PageRange& r : d.queue().drain()) d.place(r.first, r.npages, ref.data() + r.first * ps);
  }
}

// Four threads place every page (single pages and runs, different data): each page lands once,
// whole, and placed + dropped + EEXIST add up.
void racing_placers() {
  DestRegion d(kPages * livemig::system_page_size(), false, livemig::system_page_size());
  const std::size_t ps = d.page_bytes();
  d.start_postcopy();
  std::vector<std::vector<std::uint8_t>> data;
  for (int t = 0; t < 4; ++t) data.emplace_back(kPages * ps, static_cast<std::uint8_t>(0x10 + t));
  std::atomic<std::size_t> placed{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      const std::size_t step = t % 2 == 0 ? 1 : 16;
      for (std::size_t p = 0; p < kPages; p += step) placed += d.place(p, step, data[static_cast<std::size_t>(t)].data() + p * ps);
    });
  }
  for (auto& th : ts) th.join();
  CHECK(placed.load() == kPages);
  const auto c = d.counters();
  CHECK(c.placed == kPages);
  CHECK(c.duplicates + c.eexist == 3 * kPages);
  CHECK(c.errors == 0);
  CHECK(d.received()->count() == kPages);
  for (std::size_t p = 0; p < kPages; ++p) {
    const std::uint8_t first = read_byte(d.data() + p * ps);
    CHECK(first >= 0x10 && first < 0x14);
    for (std::size_t i = 0; i < ps; i += 512) CHECK(read_byte(d.data() + p * ps + i) == first);
  }
  d.stop();
}

// Faulting threads, a request server, a background pusher and local fills at once.
void faults_requests_and_fills() {
  DestRegion d(kPages * livemig::system_page_size(), false, livemig::system_page_size());
  const std::size_t ps = d.page_bytes();
  const auto ref = make_ref(kPages, ps, 1);
  const PageRange fill{900, 124};
  d.set_local_fill({&fill, 1}, 0xA5A5A5A5u);
  d.start_postcopy();
  std::atomic<bool> stop{false};
  std::thread server([&] { serve(d, ref, stop); });
  std::thread pusher([&] {
    for (std::size_t p = 0; p < fill.first; p += 8) d.place(p, std::min<std::size_t>(8, fill.first - p), ref.data() + p * ps);
  });
  std::vector<std::thread> touchers;
  for (int t = 0; t < 3; ++t) {
    touchers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 7);
      for (int k = 0; k < 300; ++k) {
        const std::size_t p = rng() % kPages;
        const std::uint8_t b = read_byte(d.data() + p * ps + 100);
        if (p >= fill.first)
          CHECK(b == 0xA5);
        else
          CHECK(b == ref[p * ps + 100]);
      }
    });
  }
  for (auto& th : touchers) th.join();
  pusher.join();
  stop = true;
  server.join();
  const auto c = d.counters();
  CHECK(c.errors == 0);
  CHECK(d.received()->count(0, fill.first) == fill.first);
  CHECK(c.requested_pages <= c.faults);
  d.stop();
}

// Discards of the lower half race placement, faults and duplicate pushes in the upper half (the
// contract: discard never races placement of the same pages); then every page reads right and
// the discarded pages come back through faults and requests.
void discards_race_placement() {
  DestRegion d(kPages * livemig::system_page_size(), false, livemig::system_page_size());
  const std::size_t ps = d.page_bytes();
  const std::size_t half = kPages / 2;
  const auto ref = make_ref(kPages, ps, 2);
  d.start_postcopy();
  CHECK(d.place(0, kPages, ref.data()) == kPages);
  std::atomic<bool> stop{false};
  std::thread server([&] { serve(d, ref, stop); });
  std::thread discarder([&] {
    std::mt19937 rng(3);
    for (int k = 0; k < 200; ++k) {
      const PageRange r{rng() % (half - 16), 1 + rng() % 16};
      d.discard({&r, 1});
    }
  });
  std::thread pusher([&] {
    for (int round = 0; round < 3; ++round)
      for (std::size_t p = half; p < kPages; p += 4) d.place(p, 4, ref.data() + p * ps);
  });
  std::thread reader([&] {
    for (std::size_t p = half; p < kPages; ++p) CHECK(read_byte(d.data() + p * ps + 7) == ref[p * ps + 7]);
  });
  discarder.join();
  pusher.join();
  reader.join();
  for (std::size_t p = 0; p < kPages; ++p) CHECK(read_byte(d.data() + p * ps + 7) == ref[p * ps + 7]);
  stop = true;
  server.join();
  const auto c = d.counters();
  CHECK(c.errors == 0);
  CHECK(c.duplicates == 3 * half);
  CHECK(d.received()->count() == kPages);
  d.stop();
}

// Whether page `p` of `d` is present (pagemap bit 63) or swapped (bit 62).
bool present(const DestRegion& d, std::size_t p) {
  static const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0);
  std::uint64_t entry = 0;
  const auto vpn = reinterpret_cast<std::uintptr_t>(d.data() + p * d.page_bytes()) / d.page_bytes();
  CHECK(::pread(fd, &entry, sizeof entry, static_cast<off_t>(vpn * sizeof entry)) == static_cast<ssize_t>(sizeof entry));
  return (entry >> 62) != 0;
}

// The prefault populates the region while a receiver writes pages in place (precopy); then the
// switchover: every page not received is missing again, so in postcopy each one faults, is
// requested and placed exactly once with the source's data, and a hinted page never sent reads as
// its fill value. Without the settle the prefault's zero pages would be read instead (the tail is
// checked present before it: the failure this catches was really set up).
void prefault_then_postcopy() {
  const std::size_t ps = livemig::system_page_size();
  constexpr std::size_t kN = 4096, kHole = 1000, kHoleEnd = 1100, kSent = 3000;
  const PageRange fill{3900, 100};
  DestRegion d(kN * ps, false, ps);
  const auto ref = make_ref(kN, ps, 4);
  d.start_prefault({4, 16 * ps});
  // The receiver: pages [0, kSent) but the hole, in 50-page frames, written in place.
  std::thread receiver([&] {
    for (std::size_t p = 0; p < kSent; p += 50) {
      if (p >= kHole && p < kHoleEnd) continue;
      std::memcpy(d.data() + p * ps, ref.data() + p * ps, 50 * ps);
      d.mark_received(p, 50);
      d.wrote_in_place(p, 50);
    }
  });
  receiver.join();
  livemig::test::wait_for([&] { return d.prefault_stats().finished; }, 20, "the prefault to finish");
  const auto before = d.prefault_stats();
  CHECK(!before.failed);
  CHECK(before.threads >= 1 && !before.tried.empty());
  CHECK(before.populated_pages > 0);
  // The calibration populated the last pages, which nothing sent: present, reading zero.
  for (std::size_t p = kN - 16; p < kN; ++p) CHECK(present(d, p));
  CHECK(read_byte(d.data() + (kN - 1) * ps) == 0);
  d.set_local_fill({&fill, 1}, 0xA5A5A5A5u);
  d.start_postcopy();  // settles the prefault first
  const auto after = d.prefault_stats();
  CHECK(after.dropped_pages > 0);
  CHECK(after.dropped_pages <= kN - d.received()->count());
  for (std::size_t p = 0; p < kN; ++p)
    if (!d.received()->test(p)) CHECK(!present(d, p));
  std::atomic<bool> stop{false};
  std::thread server([&] { serve(d, ref, stop); });
  std::vector<std::thread> touchers;
  for (int t = 0; t < 2; ++t) {
    touchers.emplace_back([&, t] {
      for (std::size_t p = static_cast<std::size_t>(t); p < kN; p += 2) {
        const std::uint8_t b = read_byte(d.data() + p * ps + 100);
        if (p >= fill.first && p < fill.first + fill.npages)
          CHECK(b == 0xA5);
        else
          CHECK(b == ref[p * ps + 100]);
      }
    });
  }
  for (auto& th : touchers) th.join();
  stop = true;
  server.join();
  const std::size_t unsent = (kHoleEnd - kHole) + (kN - kSent) - fill.npages;
  const auto c = d.counters();
  CHECK(c.errors == 0);
  CHECK(c.placed_twice == 0);
  CHECK(c.eexist == 0);
  CHECK(c.duplicates == 0);
  CHECK(c.placed == unsent);  // every page not received: placed once, after its fault
  CHECK(c.requested_pages == unsent);
  CHECK(c.local_fills == fill.npages);
  CHECK(c.filled == fill.npages);
  CHECK(d.received()->count() == kN);
  d.stop();
}

}  // namespace

// A case that needs userfaultfd: skipped, saying why, where the kernel or this process lacks it.
template <void (*F)()>
void needs_uffd() {
  try {
    F();
  } catch (const livemig::UnsupportedError& e) {
    livemig::test::skip(std::string("userfaultfd unavailable: ") + e.what());
  }
}

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"racing_placers", needs_uffd<racing_placers>},
                             {"faults_requests_and_fills", needs_uffd<faults_requests_and_fills>},
                             {"discards_race_placement", needs_uffd<discards_race_placement>},
                             {"prefault_then_postcopy", needs_uffd<prefault_then_postcopy>}});
}
