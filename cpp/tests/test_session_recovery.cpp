// Postcopy recovery in one process over socketpairs: a guest thread faults on every page while the
// source pushes; the connection is cut in the middle (both sides shut their sockets down, so frames
// in flight are lost); the destination detaches (the guest keeps waiting), the source session is
// dropped; over new sockets the destination reattaches (received bitmap, requests again), a new
// source session resyncs on the bitmap, and the push completes. Every page must end up holding
// the source's bytes, received once. Run under ThreadSanitizer by CI.
#include <sys/socket.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "check.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/dest/region.hpp"
#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/session/session.hpp"
#include "livemig/source/source.hpp"

using namespace livemig;

namespace {

using test::Pair;

// One connection: main (pages + return path) and urgent, with the source's writers.
struct Conn {
  Pair main_ch, urgent_ch;
  wire::FrameWriter src_main, src_urgent, dst_return;
  explicit Conn(const wire::WireConfig& cfg)
      : src_main(main_ch.a.get(), cfg), src_urgent(urgent_ch.a.get(), cfg), dst_return(main_ch.b.get(), cfg) {}
  void cut() {
    for (int fd : {main_ch.a.get(), main_ch.b.get(), urgent_ch.a.get(), urgent_ch.b.get()}) ::shutdown(fd, SHUT_RDWR);
  }
};

std::optional<SessionEvent> next_of(std::function<std::optional<SessionEvent>(double)> wait, SessionEvent::Kind kind) {
  for (;;) {
    auto e = wait(20.0);
    if (!e) return std::nullopt;
    if (e->kind == kind) return e;
  }
}

void fill(std::uint8_t* p, std::size_t page, std::size_t ps) {
  for (std::size_t off = 0; off < ps; off += 8) {
    const std::uint64_t v = (page << 20) ^ 0x5a5a ^ off;
    std::memcpy(p + off, &v, 8);
  }
}

}  // namespace

void cut_and_resume() {
  constexpr std::size_t kPages = 8192;
  const std::size_t ps = system_page_size();
  auto source = std::make_shared<Source>(kPages, TrackMode::Explicit, Backing::Anonymous, ps);
  for (std::size_t p = 0; p < kPages; ++p) fill(source->data() + p * ps, p, ps);
  wire::WireConfig cfg;
  cfg.page_size = ps;
  cfg.region_pages = kPages;
  cfg.timeout_ms = 20000;

  auto region = std::make_shared<DestRegion>(kPages * ps, false, ps);
  auto conn1 = std::make_unique<Conn>(cfg);
  auto ss = std::make_unique<SourceSession>(source, conn1->src_main, std::vector<wire::FrameWriter*>{},
                                            &conn1->src_urgent, conn1->main_ch.a.get(), cfg);
  DestSession ds(region, conn1->main_ch.b.get(), {}, conn1->urgent_ch.b.get(), conn1->dst_return, cfg);
  ds.start();
  ss->start_return_path();

  // Straight to postcopy: nothing was sent in precopy, every page is dirty.
  source->sync();
  try {
    conn1->src_main.send_command(wire::Command::kPostcopyStart);
  } catch (const UnsupportedError& e) {
    test::skip(e.what());
  }
  CHECK(next_of([&](double t) { return ds.wait_event(t); }, SessionEvent::Kind::Command).has_value());
  if (region->state() != DestRegion::State::postcopy) {
    test::skip("userfaultfd unavailable: " + region->last_error());
  }

  // The guest touches every page from the top down (against the push's direction): many faults.
  std::atomic<std::uint64_t> checksum{0};
  std::thread guest([&] {
    std::uint64_t sum = 0;
    for (std::size_t p = kPages; p-- > 0;) sum += region->data()[p * ps + 8];
    checksum.store(sum, std::memory_order_relaxed);
  });
  std::atomic<bool> push_failed{false};
  std::thread pusher([&] {
    try {
      for (;;)
        if (ss->postcopy_push(10.0).drained) break;
    } catch (const std::exception&) {
      push_failed.store(true);
    }
  });

  // Cut once some pages are in; frames in flight are lost.
  test::wait_for([&] { return region->received()->count() >= kPages / 4; }, 20, "a quarter of the pages");
  conn1->cut();
  ds.detach();
  ds.join();
  ss->interrupt();
  pusher.join();
  ss->join_return_path();
  ss.reset();
  const std::size_t before = region->received()->count();
  CHECK(before < kPages);  // the guest still waits for some

  // Resume over new sockets.
  auto conn2 = std::make_unique<Conn>(cfg);
  ss = std::make_unique<SourceSession>(source, conn2->src_main, std::vector<wire::FrameWriter*>{},
                                       &conn2->src_urgent, conn2->main_ch.a.get(), cfg);
  ss->resync_on_received_bitmap(false);
  ss->start_return_path();
  ds.reattach(conn2->main_ch.b.get(), {}, conn2->urgent_ch.b.get(), conn2->dst_return);
  auto bm = next_of([&](double t) { return ss->wait_event(t); }, SessionEvent::Kind::ReceivedBitmap);
  CHECK(bm.has_value() && bm->b == 1);
  CHECK(bm->a >= kPages - before);  // everything not received is queued again (in-flight pages too)
  for (;;)
    if (ss->postcopy_push(10.0).drained) break;
  guest.join();
  conn2->src_urgent.send_end();
  conn2->src_main.send_command(wire::Command::kComplete);
  CHECK(next_of([&](double t) { return ds.wait_event(t); }, SessionEvent::Kind::Command).has_value());

  CHECK(region->received()->count() == kPages);
  CHECK(std::memcmp(region->data(), source->data(), kPages * ps) == 0);
  CHECK(region->requested()->count() == 0);
  const DestCounters c = region->counters();
  CHECK(c.placed + c.zero + c.eexist == kPages);  // each page placed once; resends were dropped

  conn2->src_main.send_end();
  region->stop();
  conn2->cut();
  ds.join();
  ss->join_return_path();
  std::printf("test_session_recovery: ok (%zu received before the cut, %llu requeued, %llu dropped, push %s)\n",
              before, static_cast<unsigned long long>(bm->a), static_cast<unsigned long long>(c.duplicates),
              push_failed.load() ? "failed at the cut" : "ended before the cut");
}

int main(int argc, char** argv) { return test::run(argc, argv, {{"cut_and_resume", cut_and_resume}}); }
