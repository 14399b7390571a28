// Stress test of the guest model's concurrency: writer threads (random workload + churn), the
// balloon driver and a host thread flipping the device's command id, while the main thread pauses,
// checks and resumes the guest over and over. Every check runs while the guest is paused, so under
// ThreadSanitizer any write a "parked" thread still made would be reported as a race with the
// checker's reads. Then export/import into a second region, and the increment oracle across
// pause/resume cycles. Built and run under ThreadSanitizer by .ci/run.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "livemig/base/fd.hpp"
#include "livemig/guest/guest.hpp"
#include "check.hpp"

using namespace livemig::guest;
using livemig::test::wait_for;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kPages = 512;

// Checks of a paused guest: the page sets partition the region, every page the device accepted
// since the last DONE is held, every allocated page verifies.
void check_paused(Guest& g, const livemig::balloon::LocalDevice& dev) {
  const auto states = g.page_states();
  const auto st = g.stats();
  std::uint64_t alloc = 0, free_ = 0, held = 0;
  for (auto s : states) {
    alloc += s == static_cast<std::uint8_t>(PageState::Allocated);
    free_ += s == static_cast<std::uint8_t>(PageState::Free);
    held += s == static_cast<std::uint8_t>(PageState::Held);
  }
  CHECK(alloc == st.allocated_pages && free_ == st.free_pages && held == st.pages_held);
  CHECK(alloc + free_ + held == kPages);
  const auto& hinted = dev.recorder().since_done();
  for (std::size_t p = 0; p < kPages; ++p)
    if (hinted.test(p)) CHECK(states[p] == static_cast<std::uint8_t>(PageState::Held));
  const auto v = g.verify();
  if (v.mismatches != 0)
    std::fprintf(stderr, "page %llu: %s\n", static_cast<unsigned long long>(v.first[0].page), v.first[0].kind);
  CHECK(v.mismatches == 0);
  CHECK(v.pages_checked == alloc);
}

void stress_driver_and_writers() {
  auto region = livemig::Mapping::anonymous(kPages * kPage);
  auto dev = std::make_shared<livemig::balloon::LocalDevice>(kPages);
  GuestConfig cfg;
  cfg.workload = Workload::Random;
  cfg.rate = 100000;
  cfg.threads = 2;
  cfg.free_fraction = 0.5;
  cfg.churn = 20000;
  cfg.poll_interval_us = 100;
  cfg.hint_reserve = 0.25;
  cfg.seed = 42;
  Guest g(region.data(), region.size(), cfg, dev);
  g.start();

  // The host: rounds around "syncs", and now and then DONE (left visible until the guest saw it).
  std::atomic<bool> host_run{true};
  std::atomic<std::uint64_t> host_rounds{0};
  std::thread host([&] {
    std::uint64_t n = 0;
    while (host_run.load()) {
      dev->host_request_next();
      g.kick();
      std::this_thread::sleep_for(std::chrono::microseconds(300 + (n % 5) * 200));
      dev->host_stop();
      if (++n % 4 == 0) {
        const auto seen = g.stats().done_seen;
        dev->host_done();
        g.kick();
        const auto end = Clock::now() + std::chrono::seconds(10);
        while (g.stats().done_seen == seen && host_run.load() && Clock::now() < end)
          std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      host_rounds.store(n);
    }
  });
  // A racy observer: stats and page states while everything runs.
  std::atomic<bool> obs_run{true};
  std::thread observer([&] {
    while (obs_run.load()) {
      (void)g.stats();
      (void)g.page_states();
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });

  for (int i = 0; i < 150; ++i) {
    g.pause();
    check_paused(g, *dev);
    if (i % 20 == 19) {  // a full stop and restart keeps the state
      g.stop();
      check_paused(g, *dev);
      g.start();
    } else {
      g.resume();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  wait_for([&] { return host_rounds.load() >= 8; }, 60, "8 host rounds");
  host_run.store(false);
  host.join();
  obs_run.store(false);
  observer.join();

  // The end of a migration: DONE; the driver gives every held page back. (The host may have left
  // DONE showing already: the driver acts on a change of id, so a second DONE is no new event.)
  dev->host_done();
  g.kick();
  wait_for([&] { return g.stats().last_cmd_id == livemig::balloon::kCmdDone && g.stats().pages_held == 0; }, 30, "DONE seen");
  g.pause();
  CHECK(g.stats().pages_held == 0);
  check_paused(g, *dev);
  const auto c = dev->counters();
  CHECK(c.hints_unacked == 0 && c.hints_dropped_invalid == 0);
  CHECK(g.stats().rounds > 0 && g.stats().pages_hinted > 0 && g.stats().allocations > 0);
  std::fprintf(stderr, "guest: %llu rounds, %llu hints, %llu dropped, %llu writes, %llu allocations\n",
               static_cast<unsigned long long>(g.stats().rounds), static_cast<unsigned long long>(c.hints_accepted),
               static_cast<unsigned long long>(c.hints_dropped_stale),
               static_cast<unsigned long long>(g.stats().pages_written),
               static_cast<unsigned long long>(g.stats().allocations));

  // Hold some pages again, then migrate: export, copy, import on a second region and device.
  dev->host_request_next();
  g.resume();
  wait_for([&] { return g.stats().pages_held > 0; }, 30, "pages held");
  g.pause();
  const auto state = g.export_state();
  auto region2 = livemig::Mapping::anonymous(kPages * kPage);
  std::memcpy(region2.data(), region.data(), kPages * kPage);
  auto dev2 = std::make_shared<livemig::balloon::LocalDevice>(kPages);
  Guest g2(region2.data(), region2.size(), state, dev2);
  CHECK(g2.stats().pages_held == g.stats().pages_held);
  check_paused(g2, *dev2);
  dev2->host_done();
  g2.start();
  wait_for([&] { return g2.stats().done_seen > g.stats().done_seen; }, 30, "DONE on the destination");
  const auto written = g2.stats().pages_written;
  wait_for([&] { return g2.stats().pages_written > written + 500; }, 30, "writes on the destination");
  g2.pause();
  CHECK(g2.stats().pages_held == 0);
  check_paused(g2, *dev2);
  g2.stop();
  g.stop();
}

void stress_increment() {
  constexpr std::size_t kIncPages = 256;
  auto region = livemig::Mapping::anonymous(kIncPages * kPage);
  GuestConfig cfg;
  cfg.workload = Workload::Increment;
  cfg.rate = 200000;
  cfg.free_fraction = 0.125;
  auto dev = std::make_shared<livemig::balloon::LocalDevice>(kIncPages);
  Guest g(region.data(), region.size(), cfg, dev);
  g.start();
  for (int i = 0; i < 40; ++i) {
    g.pause();
    const auto r = g.check_increment();
    CHECK(r.ok && r.pages_checked == kIncPages - 32);
    CHECK(g.verify().mismatches == 0);
    g.resume();
    if (i % 10 == 0) dev->host_request_next();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  wait_for([&] { return g.stats().passes >= 2; }, 30, "two passes");
  g.stop();
  CHECK(g.check_increment().ok);
}

// One round between a guest and a device: the driver acknowledges, hints the free half, stops.
void device_round() {
  constexpr std::size_t kN = 64;
  auto region = livemig::Mapping::anonymous(kN * kPage);
  auto dev = std::make_shared<livemig::balloon::LocalDevice>(kN);
  GuestConfig cfg;
  cfg.free_fraction = 0.5;
  cfg.poll_interval_us = 100;
  Guest g(region.data(), region.size(), cfg, dev);
  g.start();
  const auto id = dev->host_request_next();
  wait_for([&] { return dev->counters().stops == 1; }, 30, "a round");
  const auto acc = dev->recorder().accepted();
  CHECK(acc.size() == 1 && acc[0].id == id && acc[0].first == 32 && acc[0].npages == 32);
  CHECK(g.stats().pages_held == 32);
  CHECK(dev->counters().hints_unacked == 0);
  g.stop();
}

}  // namespace

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"device_round", device_round},
                             {"driver_and_writers", stress_driver_and_writers},
                             {"increment", stress_increment}});
}
