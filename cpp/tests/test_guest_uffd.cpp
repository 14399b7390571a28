// The guest on a migration destination: its threads run over a userfaultfd-registered region whose
// pages are missing until a handler thread places them (UFFDIO_COPY from the source's copy, or
// UFFDIO_ZEROPAGE for pages the guest held as hinted, like a local fill). The guest must fault,
// resume, pause (waiting for faulting threads), see DONE, reuse its hinted pages and verify, with
// every page placed at most once. Skips (exit 0, says so) without userfaultfd.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/guest/guest.hpp"
#include "livemig/base/userfaultfd.hpp"
#include "check.hpp"

using namespace livemig::guest;
using livemig::test::wait_for;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kPages = 512;

}  // namespace

void migrate_with_faults() {
  // The source: a busy guest that hints half its free pool, then pauses for switchover.
  auto src = livemig::Mapping::anonymous(kPages * kPage);
  auto dev = std::make_shared<livemig::balloon::LocalDevice>(kPages);
  GuestConfig cfg;
  cfg.workload = Workload::Random;
  cfg.rate = 50000;
  cfg.threads = 2;
  cfg.free_fraction = 0.5;
  cfg.churn = 10000;
  cfg.poll_interval_us = 100;
  cfg.hint_reserve = 0.5;
  Guest g(src.data(), src.size(), cfg, dev);
  g.start();
  dev->host_request_next();
  wait_for([&] { return dev->counters().stops == 1 && g.stats().pages_written > 300; }, 30, "a round and writes");
  g.pause();
  const auto state = g.export_state();
  const auto held_states = g.page_states();
  const std::uint64_t held = g.stats().pages_held;
  CHECK(held > 0);

  livemig::Userfaultfd uffd;
  try {
    uffd = livemig::Userfaultfd::open(0, 0, /*nonblock=*/true);
  } catch (const livemig::UnsupportedError& e) {
    livemig::test::skip(std::string("userfaultfd unavailable: ") + e.what());
  }
  auto dst = livemig::Mapping::anonymous(kPages * kPage);
  uffd.register_range(dst.data(), dst.size(), UFFDIO_REGISTER_MODE_MISSING);

  // The fault handler: places each faulting page once, from the source copy or as a zero page for
  // pages the guest held (hinted) at switchover.
  std::vector<std::atomic<int>> placed(kPages);
  std::atomic<bool> run{true};
  std::atomic<std::uint64_t> faults{0}, zero_fills{0};
  std::thread handler([&] {
    while (run.load()) {
      pollfd pfd{uffd.fd(), POLLIN, 0};
      if (::poll(&pfd, 1, 10) <= 0) continue;
      uffd_msg msg{};
      const ssize_t n = ::read(uffd.fd(), &msg, sizeof msg);
      if (n != static_cast<ssize_t>(sizeof msg)) continue;  // EAGAIN: another wakeup took it
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      const std::uint64_t addr = msg.arg.pagefault.address & ~std::uint64_t{kPage - 1};
      const std::uint64_t p = (addr - reinterpret_cast<std::uint64_t>(dst.data())) / kPage;
      faults.fetch_add(1);
      if (held_states[p] == static_cast<std::uint8_t>(PageState::Held)) {
        uffdio_zeropage z{};
        z.range.start = addr;
        z.range.len = kPage;
        // UFFDIO_ZEROPAGE: map the zero page; a later write faults in a private copy, no round trip.
        if (::ioctl(uffd.fd(), UFFDIO_ZEROPAGE, &z) == 0) {
          placed[p].fetch_add(1);
          zero_fills.fetch_add(1);
        } else {
          CHECK(errno == EEXIST);
          uffd.wake(reinterpret_cast<void*>(addr), kPage);
        }
      } else {
        uffdio_copy c{};
        c.dst = addr;
        c.src = reinterpret_cast<std::uint64_t>(src.data() + p * kPage);
        c.len = kPage;
        // UFFDIO_COPY: place the source's page and wake the faulting thread.
        if (::ioctl(uffd.fd(), UFFDIO_COPY, &c) == 0) {
          placed[p].fetch_add(1);
        } else {
          CHECK(errno == EEXIST);
          uffd.wake(reinterpret_cast<void*>(addr), kPage);
        }
      }
    }
  });

  // The destination guest: its threads fault on missing pages as they go.
  auto dev2 = std::make_shared<livemig::balloon::LocalDevice>(kPages);
  Guest g2(dst.data(), dst.size(), state, dev2);
  dev2->host_done();  // the device state says DONE: the driver frees its held pages
  g2.start();
  wait_for([&] { return g2.stats().pages_held == 0 && g2.stats().done_seen > g.stats().done_seen; }, 30, "DONE");
  const auto w = g2.stats().pages_written;
  wait_for([&] { return g2.stats().pages_written > w + 1000 && g2.stats().allocations > g.stats().allocations + 200; },
           30, "writes and allocations on the destination");
  g2.pause();  // returns once every thread is parked, faults resolved
  const auto v = g2.verify();  // faults in the rest from the main thread
  CHECK(v.mismatches == 0);
  CHECK(v.pages_checked + v.pages_excepted == kPages);
  run.store(false);
  handler.join();
  for (std::size_t p = 0; p < kPages; ++p) CHECK(placed[p].load() <= 1);
  std::printf("test_guest_uffd: ok (%llu faults, %llu zero fills of %llu held pages)\n",
              static_cast<unsigned long long>(faults.load()), static_cast<unsigned long long>(zero_fills.load()),
              static_cast<unsigned long long>(held));
  g2.stop();
  g.stop();
}

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv, {{"migrate_with_faults", migrate_with_faults}});
}
