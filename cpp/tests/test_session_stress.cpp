// The source and destination sessions in one process over socketpairs: precopy on three channels
// with pages dirtied between rounds, then postcopy with a discard set, a guest thread faulting on
// the discarded pages, requests on the return path (or, with urgent requests, on the urgent
// socket's other direction, read by a source thread of their own) and pages on the urgent channel.
// Every page must end up holding the source's bytes. Run under ThreadSanitizer by CI.
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "livemig/dest/region.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/session/session.hpp"
#include "livemig/source/source.hpp"
#include "check.hpp"
#include "livemig/base/page_size.hpp"

using namespace livemig;

namespace {

using test::Pair;

SessionEvent expect_event(DestSession& d, SessionEvent::Kind kind) {
  for (;;) {
    auto e = d.wait_event(20.0);
    CHECK(e.has_value());
    if (e->kind == SessionEvent::Kind::Failed || e->kind == SessionEvent::Kind::PeerError) {
      std::fprintf(stderr, "destination failed: %s\n", e->text.c_str());
      std::exit(1);
    }
    if (e->kind == kind) return *e;
  }
}

void fill(std::uint8_t* p, std::size_t page, std::uint64_t gen, std::size_t ps) {
  for (std::size_t off = 0; off < ps; off += 8) {
    const std::uint64_t v = (page << 20) ^ (gen << 8) ^ off;
    std::memcpy(p + off, &v, 8);
  }
}

}  // namespace

void migrate(bool urgent_requests) {
  constexpr std::size_t kPages = 4096;
  const std::size_t ps = system_page_size();
  auto source = std::make_shared<Source>(kPages, TrackMode::Explicit, Backing::Anonymous, ps);
  for (std::size_t p = 0; p < kPages; ++p) fill(source->data() + p * ps, p, 0, ps);
  // Every tenth page stays zero: it travels as a ZERO frame.
  for (std::size_t p = 0; p < kPages; p += 10) std::memset(source->data() + p * ps, 0, ps);

  Pair main_ch, urgent_ch, extra1, extra2;
  wire::WireConfig cfg;
  cfg.page_size = ps;
  cfg.region_pages = kPages;
  cfg.timeout_ms = 20000;

  auto region = std::make_shared<DestRegion>(kPages * ps, false, ps);
  wire::FrameWriter src_main(main_ch.a.get(), cfg), src_urgent(urgent_ch.a.get(), cfg);
  wire::FrameWriter src_x1(extra1.a.get(), cfg), src_x2(extra2.a.get(), cfg);
  wire::FrameWriter dst_return(main_ch.b.get(), cfg), dst_requests(urgent_ch.b.get(), cfg);

  SourceSession ss(source, src_main, {&src_x1, &src_x2}, &src_urgent, main_ch.a.get(), cfg);
  DestSession ds(region, main_ch.b.get(), {extra1.b.get(), extra2.b.get()}, urgent_ch.b.get(), dst_return, cfg);
  if (urgent_requests) {
    ds.send_requests_on(&dst_requests);
    ss.read_requests_on(urgent_ch.a.get());
  }
  ds.start();
  ss.start_return_path();

  // Precopy rounds, the "guest" dirtying pages between them (writes concurrent with the send are
  // a by-design race that ThreadSanitizer cannot tell from a bug; the Python tests cover them).
  std::mt19937_64 rng(5);
  std::uint64_t gen = 1;
  for (int round = 0; round < 3; ++round) {
    source->sync();
    const SendStats st = ss.precopy_pass(30.0, source->dirty()->count());
    CHECK(st.pages + st.zero_pages > 0);
    for (int k = 0; k < 300; ++k) {
      const std::size_t p = 1 + rng() % (kPages - 1);
      if (p % 10 == 0) continue;
      fill(source->data() + p * ps, p, gen++, ps);
      source->mark_written(p, 1);
    }
  }

  // Switchover: final sync; pages dirty and sent are discarded on the destination (rule 3) and
  // then reach it again in postcopy, on request or by the background push.
  source->sync();
  const SwitchoverSets sets = source->switchover_sets();
  src_x1.send_end();
  src_x2.send_end();
  src_main.send_discard(sets.discard);
  src_main.send_command(wire::Command::kPostcopyStart);
  expect_event(ds, SessionEvent::Kind::Command);
  CHECK(region->state() == DestRegion::State::postcopy);

  // A guest thread reads every page: discarded ones fault and are requested.
  std::atomic<std::uint64_t> checksum{0};
  std::thread guest([&] {
    std::uint64_t sum = 0;
    for (std::size_t p = kPages; p-- > 0;) sum += region->data()[p * ps + 8];
    checksum.store(sum, std::memory_order_relaxed);
  });
  std::uint64_t urgent_pages = 0;
  for (;;) {
    const SendStats st = ss.postcopy_push(10.0);
    urgent_pages += st.urgent_pages;
    if (st.drained) break;
  }
  guest.join();
  ss.end_urgent();
  // Requests were served on the thread that read them or queued for the push, each page once.
  CHECK(urgent_pages == source->scanner().counters().request_pages_served);
  // With urgent requests every request went on the urgent socket; without, none did.
  const std::uint64_t requests = region->counters().requests, on_urgent = dst_requests.sent().bytes;
  CHECK(urgent_requests ? (requests == 0 || on_urgent > 0) : on_urgent == 0);
  src_main.send_command(wire::Command::kComplete);
  expect_event(ds, SessionEvent::Kind::Command);

  CHECK(region->received()->count() == kPages);
  CHECK(std::memcmp(region->data(), source->data(), kPages * ps) == 0);
  CHECK(region->requested()->count() == 0);

  src_main.send_end();
  region->stop();
  ::shutdown(main_ch.a.get(), SHUT_RDWR);
  ::shutdown(main_ch.b.get(), SHUT_RDWR);
  ::shutdown(urgent_ch.a.get(), SHUT_RDWR);
  ::shutdown(urgent_ch.b.get(), SHUT_RDWR);
  ds.join();
  ss.join_return_path();
  std::printf("test_session_stress: ok (%llu requests %s, %llu discarded ranges, checksum %llu)\n",
              static_cast<unsigned long long>(requests), urgent_requests ? "on the urgent socket" : "on the return path",
              static_cast<unsigned long long>(sets.discard.size()),
              static_cast<unsigned long long>(checksum.load()));
}

void precopy_then_postcopy() { migrate(false); }
void precopy_then_postcopy_urgent_requests() { migrate(true); }

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv, {{"precopy_then_postcopy", precopy_then_postcopy},
                                         {"precopy_then_postcopy_urgent_requests", precopy_then_postcopy_urgent_requests}});
}
