// The source and destination sessions over TLS channels (PSK), in one process over socket pairs:
// precopy on three channels, then postcopy with a guest thread faulting on discarded pages,
// requests on the return path (the main channel's other direction: one TLS channel read and
// written by different threads) and answers on the urgent channel. Every page must end up
// holding the source's bytes. Run under ThreadSanitizer by CI.
#include <sys/socket.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "livemig/base/fd.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/dest/region.hpp"
#include "livemig/session/session.hpp"
#include "livemig/source/source.hpp"
#include "livemig/wire/tls.hpp"
#include "check.hpp"

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

// A PSK channel pair on `p` (client on a, server on b), handshakes done.
std::pair<std::shared_ptr<wire::TlsChannel>, std::shared_ptr<wire::TlsChannel>> tls_pair(Pair& p, int index) {
  wire::TlsOptions o;
  o.secret.assign(32, 0x77);
  static const auto client_ctx = std::make_shared<const wire::TlsContext>(o, wire::TlsRole::kClient);
  static const auto server_ctx = std::make_shared<const wire::TlsContext>(o, wire::TlsRole::kServer);
  const std::uint8_t hello[] = {'H', 'E', 'L', 'L', 'O', static_cast<std::uint8_t>(index)};
  auto c = std::make_shared<wire::TlsChannel>(client_ctx, p.a.get(), hello);
  auto s = std::make_shared<wire::TlsChannel>(server_ctx, p.b.get(), hello);
  std::thread t([&] { s->handshake(10000); });
  c->handshake(10000);
  t.join();
  return {c, s};
}

}  // namespace

void precopy_then_postcopy() {
  constexpr std::size_t kPages = 4096;
  const std::size_t ps = system_page_size();
  auto source = std::make_shared<Source>(kPages, TrackMode::Explicit, Backing::Anonymous, ps);
  for (std::size_t p = 0; p < kPages; ++p) fill(source->data() + p * ps, p, 0, ps);
  for (std::size_t p = 0; p < kPages; p += 10) std::memset(source->data() + p * ps, 0, ps);

  Pair main_ch, urgent_ch, extra1, extra2;
  auto [main_c, main_s] = tls_pair(main_ch, 0);
  auto [urgent_c, urgent_s] = tls_pair(urgent_ch, 1);
  auto [x1_c, x1_s] = tls_pair(extra1, 2);
  auto [x2_c, x2_s] = tls_pair(extra2, 3);
  CHECK(main_c->path() == "userspace");

  wire::WireConfig cfg;
  cfg.page_size = ps;
  cfg.region_pages = kPages;
  cfg.timeout_ms = 20000;

  auto region = std::make_shared<DestRegion>(kPages * ps, false, ps);
  wire::FrameWriter src_main(*main_c, cfg), src_urgent(*urgent_c, cfg);
  wire::FrameWriter src_x1(*x1_c, cfg), src_x2(*x2_c, cfg);
  wire::FrameWriter dst_return(*main_s, cfg);

  SourceSession ss(source, src_main, {&src_x1, &src_x2}, &src_urgent, main_ch.a.get(), cfg);
  ss.read_through(wire::tls_input_opener({main_c}));
  DestSession ds(region, main_ch.b.get(), {extra1.b.get(), extra2.b.get()}, urgent_ch.b.get(), dst_return, cfg);
  ds.read_through(wire::tls_input_opener({main_s, urgent_s, x1_s, x2_s}));
  ds.start();
  ss.start_return_path();

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

  source->sync();
  const SwitchoverSets sets = source->switchover_sets();
  src_x1.send_end();
  src_x2.send_end();
  src_main.send_discard(sets.discard);
  src_main.send_command(wire::Command::kPostcopyStart);
  expect_event(ds, SessionEvent::Kind::Command);
  CHECK(region->state() == DestRegion::State::postcopy);

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
  CHECK(urgent_pages == source->scanner().counters().request_pages_served);
  src_main.send_command(wire::Command::kComplete);
  expect_event(ds, SessionEvent::Kind::Command);

  CHECK(region->received()->count() == kPages);
  CHECK(std::memcmp(region->data(), source->data(), kPages * ps) == 0);
  CHECK(region->requested()->count() == 0);

  src_main.send_end();
  region->stop();
  main_c->shutdown();
  main_s->shutdown();
  urgent_s->shutdown();
  ds.join();
  ss.join_return_path();
  std::printf("test_tls_session: ok (%llu discarded ranges, %llu pages requested)\n",
              static_cast<unsigned long long>(sets.discard.size()), static_cast<unsigned long long>(urgent_pages));
}

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv, {{"precopy_then_postcopy", precopy_then_postcopy}});
}
