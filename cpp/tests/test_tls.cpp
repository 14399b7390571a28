// TLS 1.3 channels (wire/tls.hpp): frames both ways over PSK and x509 channels, livemig's record
// layer against OpenSSL's (each reads what the other writes, KeyUpdates included), every refusal
// with its error class and a bounded wait (wrong key, expired or unknown certificate, wrong name,
// a plaintext peer, a peer that goes silent or stops mid-handshake), a flipped byte after the
// handshake (detected, nothing unverified left in the buffers), a replayed session (refused), and
// a writer shared by two threads with a reader on a third (run under ThreadSanitizer by CI), and the
// plaintext handshake's transcript bound to the session (a one-byte difference refused).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/bench/tls.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"
#include "livemig/wire/tls.hpp"
#include "check.hpp"

using namespace livemig;
using namespace livemig::wire;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint64_t kPages = 512;
constexpr int kTimeout = 10000;
const std::vector<std::uint8_t> kSecret(32, 0x3c);
const std::uint8_t kHello[] = "source HELLO body | destination HELLO body";  // stands in for both HELLO bodies

using test::Pair;

std::shared_ptr<const TlsContext> psk_context(TlsRole role, TlsRecordLayer layer = TlsRecordLayer::kDirect,
                                              std::vector<std::uint8_t> secret = kSecret,
                                              std::uint64_t key_update_records = std::uint64_t{1} << 24,
                                              const char* suites = kDefaultCiphersuites) {
  TlsOptions o;
  o.ciphersuites = suites;
  o.keying = TlsKeying::kPsk;
  o.secret = std::move(secret);
  o.record_layer = layer;
  o.key_update_records = key_update_records;
  return std::make_shared<const TlsContext>(std::move(o), role);
}

std::shared_ptr<const TlsContext> x509_context(TlsRole role, const std::string& dir, const std::string& peer,
                                               const std::string& cert = "", const std::string& key = "") {
  TlsOptions o = TlsOptions::x509_dir(dir, role, peer);
  if (!cert.empty()) o.cert_file = dir + "/" + cert;
  if (!key.empty()) o.key_file = dir + "/" + key;
  return std::make_shared<const TlsContext>(std::move(o), role);
}

// How a call ended: "ok", "auth", "protocol", "lost" or "other", and the message.
struct Outcome {
  std::string kind;
  std::string what;
};

Outcome outcome(const std::function<void()>& fn) {
  try {
    fn();
    return {"ok", ""};
  } catch (const AuthenticationError& e) {
    return {"auth", e.what()};
  } catch (const ProtocolError& e) {
    return {"protocol", e.what()};
  } catch (const ConnectionLost& e) {
    return {"lost", e.what()};
  } catch (const std::exception& e) {
    return {"other", e.what()};
  }
}

bool has(const Outcome& o, const char* kind, const char* text) {
  const bool ok = o.kind == kind && o.what.find(text) != std::string::npos;
  if (!ok) std::fprintf(stderr, "expected %s containing '%s', got %s: %s\n", kind, text, o.kind.c_str(), o.what.c_str());
  return ok;
}

// Both handshakes at once (the server's on a thread); each side's outcome.
std::pair<Outcome, Outcome> handshake_pair(TlsChannel& client, TlsChannel& server, int timeout_ms = kTimeout) {
  Outcome s;
  std::thread t([&] { s = outcome([&] { server.handshake(timeout_ms); }); });
  const Outcome c = outcome([&] { client.handshake(timeout_ms); });
  t.join();
  std::printf("  client: %s %s\n  server: %s %s\n", c.kind.c_str(), c.what.c_str(), s.kind.c_str(), s.what.c_str());
  return {c, s};
}

std::vector<std::uint8_t> pattern(std::uint64_t seed) {
  std::vector<std::uint8_t> r(kPages * kPage);
  // Bytes 0x10..0x7f only, so a byte flipped by 0x80 can be told from any of them, from the
  // destination's fill (0x05) and from a wiped byte (0).
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = static_cast<std::uint8_t>(0x10 + ((i * 131 + seed * 7 + i / 4096) % 0x70));
  return r;
}

WireConfig config(std::uint32_t frame_pages = 64) {
  WireConfig c;
  c.page_size = kPage;
  c.region_pages = kPages;
  c.frame_pages = frame_pages;
  c.batch_bytes = 256 * 1024;
  c.timeout_ms = kTimeout;
  return c;
}

// Control frames the tests expect: commands and END, requests counted.
class Control : public FrameHandler {
 public:
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override {}
  void end() override { ended = true; }
  void command(Command c, std::span<const std::uint8_t>) override { commands.push_back(c); }
  void request(std::uint64_t first, std::uint32_t) override { requests.push_back(first); }
  bool ended = false;
  std::vector<Command> commands;
  std::vector<std::uint64_t> requests;
};

// A connected loopback TCP pair (TCP_NODELAY, as the wire's sockets).
std::pair<UniqueFd, UniqueFd> tcp_pair() {
  UniqueFd lst(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  CHECK(::bind(lst.get(), reinterpret_cast<sockaddr*>(&addr), len) == 0);
  CHECK(::listen(lst.get(), 1) == 0);
  CHECK(::getsockname(lst.get(), reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  UniqueFd a(::socket(AF_INET, SOCK_STREAM, 0));
  CHECK(::connect(a.get(), reinterpret_cast<sockaddr*>(&addr), len) == 0);
  UniqueFd b(::accept(lst.get(), nullptr, nullptr));
  CHECK(b.get() >= 0);
  const int one = 1;
  ::setsockopt(a.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(b.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return {std::move(a), std::move(b)};
}

void send_all(int fd, const std::uint8_t* p, std::size_t n) {
  while (n > 0) {
    const ssize_t r = ::send(fd, p, n, MSG_NOSIGNAL);
    if (r <= 0) return;  // the peer went away: the test looks at the other side's outcome
    p += r;
    n -= static_cast<std::size_t>(r);
  }
}

// A man in the middle between a client socket and a server socket: forwards whole TLS records
// (5-byte header and body) each way, through `filter(to_server, record)`, which may change the
// record, and returns false to drop it and everything after it in that direction (the relay
// then reads on without forwarding: a silent, half-open peer).
class Relay {
 public:
  using Filter = std::function<bool(bool to_server, std::vector<std::uint8_t>& record)>;
  Relay(int client_side, int server_side, Filter filter) : filter_(std::move(filter)) {
    threads_.emplace_back([=, this] { pump(client_side, server_side, true); });
    threads_.emplace_back([=, this] { pump(server_side, client_side, false); });
  }
  Relay(const Relay&) = delete;
  Relay& operator=(const Relay&) = delete;
  ~Relay() { stop(); }
  void stop() {
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }
  void watch(int fd) { fds_.push_back(fd); }

 private:
  void pump(int from, int to, bool to_server) {
    std::vector<std::uint8_t> buf;
    std::uint8_t chunk[65536];
    bool forwarding = true;
    for (;;) {
      const ssize_t r = ::recv(from, chunk, sizeof chunk, 0);
      if (r <= 0) break;
      buf.insert(buf.end(), chunk, chunk + r);
      while (buf.size() >= 5) {
        const std::size_t len = 5 + (static_cast<std::size_t>(buf[3]) << 8 | buf[4]);
        if (buf.size() < len) break;
        std::vector<std::uint8_t> rec(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(len));
        buf.erase(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(len));
        {
          std::lock_guard lock(mu_);
          if (forwarding) forwarding = filter_(to_server, rec);
        }
        if (forwarding) send_all(to, rec.data(), rec.size());
      }
    }
    if (forwarding) ::shutdown(to, SHUT_WR);
  }
  Filter filter_;
  std::mutex mu_;  // the filter runs for both directions
  std::vector<int> fds_;
  std::vector<std::thread> threads_;
};

// A client and a server channel connected through a Relay (socket pairs on both sides).
struct Relayed {
  Pair client_pair, server_pair;
  std::unique_ptr<Relay> relay;
  explicit Relayed(Relay::Filter f) {
    relay = std::make_unique<Relay>(client_pair.b.get(), server_pair.a.get(), std::move(f));
    relay->watch(client_pair.b.get());
    relay->watch(server_pair.a.get());
  }
  int client_fd() const { return client_pair.a.get(); }
  int server_fd() const { return server_pair.b.get(); }
};

// Pages one way (into a region) and requests the other way on one channel pair; checks both.
void frames_both_ways(TlsChannel& client, TlsChannel& server, std::uint32_t frame_pages = 64) {
  const WireConfig cfg = config(frame_pages);
  const auto src = pattern(1);
  std::vector<std::uint8_t> dst(src.size(), 0x05);
  std::thread source([&] {
    FrameWriter out(client, cfg);
    out.send_pages(0, kPages, src.data());
    out.send_command(Command::kComplete);
    out.send_end();
    TlsInput in(client, cfg.timeout_ms);
    FrameReader back(in, cfg, Direction::kToSource);
    Control c;
    CHECK(back.run(c));
    CHECK(c.requests.size() == 3 && c.requests[2] == 42);
  });
  PageBitmap received(kPages);
  Control control;
  RegionReceiver receiver(dst.data(), kPage, received, &control);
  TlsInput in(server, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  CHECK(reader.run(receiver));
  FrameWriter ret(server, cfg);
  for (std::uint64_t p : {7u, 9u, 42u}) ret.send_request(p, 1);
  ret.send_end();
  source.join();
  CHECK(received.count() == kPages);
  CHECK(control.commands.size() == 1 && control.commands[0] == Command::kComplete);
  CHECK(std::memcmp(src.data(), dst.data(), src.size()) == 0);
}

}  // namespace

// ---- cases ----

void psk_frames_both_ways() {
  Pair p;
  TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), kHello);
  const auto [c, s] = handshake_pair(client, server);
  CHECK(c.kind == "ok" && s.kind == "ok");
  CHECK(client.path() == "userspace" && server.path() == "userspace");  // socket pairs never get kTLS
  CHECK(client.cipher() == "TLS_AES_128_GCM_SHA256");
  CHECK(client.peer_identity() == "psk:livemig-v1");
  frames_both_ways(client, server);
  // A one-page frame size: every header shares a record with its page.
  Pair q;
  TlsChannel c2(psk_context(TlsRole::kClient), q.a.get(), kHello);
  TlsChannel s2(psk_context(TlsRole::kServer), q.b.get(), kHello);
  CHECK(handshake_pair(c2, s2).first.kind == "ok");
  frames_both_ways(c2, s2, 1);
  // Batches bounded to one record (postcopy's main channel): the same frames, in more sends.
  Pair r;
  TlsChannel c3(psk_context(TlsRole::kClient), r.a.get(), kHello);
  TlsChannel s3(psk_context(TlsRole::kServer), r.b.get(), kHello);
  CHECK(handshake_pair(c3, s3).first.kind == "ok");
  c3.bound_batches(0);  // clamped to one record
  s3.bound_batches(1 << 30);  // clamped to the default
  frames_both_ways(c3, s3);
  // At least a send per two records. No bound on the default channel's sends: partial sends and
  // EAGAIN retries against a slow reader count too, so under load it can make as many (CI saw it).
  CHECK(c3.send_calls() >= kPages * kPage / (2 * 16384));
}

// Postcopy's receiver: payloads land in the staging buffer, then go to placement.
void psk_staging_receiver() {
  Pair p;
  TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  const WireConfig cfg = config();
  const auto src = pattern(2);
  std::thread source([&] {
    FrameWriter out(client, cfg);
    out.send_pages(0, kPages, src.data(), true);
    out.send_end();
  });
  std::vector<std::uint8_t> dst(src.size(), 0x05);
  std::uint64_t placed = 0;
  StagingReceiver receiver(
      cfg,
      [&](std::uint64_t first, std::uint32_t n, const std::uint8_t* data) {
        std::memcpy(dst.data() + first * kPage, data, std::size_t{n} * kPage);
        placed += n;
      },
      [&](std::uint64_t, std::uint32_t) { CHECK(false); });
  Control control;
  TlsInput in(server, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  StagingReceiver* r = &receiver;
  struct Forward : ControlForwarder {
    StagingReceiver* r;
    explicit Forward(StagingReceiver* s, FrameHandler* c) : ControlForwarder(c), r(s) {}
    std::uint8_t* page_buffer(std::uint64_t f, std::uint32_t n) override { return r->page_buffer(f, n); }
    void pages(std::uint64_t f, std::uint32_t n, const std::uint8_t* d) override { r->pages(f, n, d); }
    void zero(std::uint64_t f, std::uint32_t n) override { r->zero(f, n); }
  } handler(r, &control);
  CHECK(reader.run(handler));
  source.join();
  CHECK(placed == kPages);
  CHECK(std::memcmp(src.data(), dst.data(), src.size()) == 0);
}

// livemig's record layer against OpenSSL's, both ways round, with KeyUpdates every 3 records
// from the direct side: OpenSSL follows them, so the records and the rekeying are standard.
void record_layer_interop() {
  for (const char* suite : {"TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"})
  for (const bool direct_client : {true, false}) {
    Pair p;
    const auto direct = TlsRecordLayer::kDirect;
    const auto openssl = TlsRecordLayer::kOpenSsl;
    TlsChannel client(psk_context(TlsRole::kClient, direct_client ? direct : openssl, kSecret, 3, suite), p.a.get(),
                      kHello);
    TlsChannel server(psk_context(TlsRole::kServer, direct_client ? openssl : direct, kSecret, 3, suite), p.b.get(),
                      kHello);
    CHECK(handshake_pair(client, server).first.kind == "ok");
    CHECK(client.cipher() == suite);
    CHECK(client.path() == (direct_client ? "userspace" : "openssl"));
    CHECK(server.path() == (direct_client ? "openssl" : "userspace"));
    frames_both_ways(client, server);
    // The client sends 2 MiB of pages (128 records), the server a few requests.
    CHECK(direct_client ? client.key_updates_sent() > 10 : server.key_updates_sent() >= 1);
  }
  // Both direct: each side follows the other's KeyUpdates.
  Pair p;
  TlsChannel client(psk_context(TlsRole::kClient, TlsRecordLayer::kDirect, kSecret, 2), p.a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer, TlsRecordLayer::kDirect, kSecret, 2), p.b.get(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  frames_both_ways(client, server);
  CHECK(client.key_updates_sent() == server.key_updates_received() && server.key_updates_received() > 10);
  CHECK(server.key_updates_sent() == client.key_updates_received() && client.key_updates_received() >= 1);
}

// Loopback TCP, where the kernel may take the records (kTLS); here it has no `tls` ULP, so the
// userspace layer runs. Either way frames flow and the socket's blocking flag is as it was.
void tcp_ktls_or_userspace() {
  auto [a, b] = tcp_pair();
  TlsChannel client(psk_context(TlsRole::kClient), a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer), b.get(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  std::printf("  record layer on loopback TCP: %s (handshake %.3f ms)\n", client.path().c_str(),
              client.handshake_seconds() * 1e3);
  CHECK((::fcntl(a.get(), F_GETFL) & O_NONBLOCK) == 0);
  CHECK((::fcntl(b.get(), F_GETFL) & O_NONBLOCK) == 0);
  frames_both_ways(client, server);
}

void psk_wrong_secret() {
  {
    Pair p;
    TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
    TlsChannel server(psk_context(TlsRole::kServer, TlsRecordLayer::kDirect, std::vector<std::uint8_t>(32, 0x3d)),
                      p.b.get(), kHello);
    const auto [c, s] = handshake_pair(client, server);
    CHECK(has(c, "auth", "refused our key"));
    CHECK(has(s, "auth", "PSK binder does not verify"));
  }
  {
    // Same secret, but the HELLO messages differ (altered in transit): a different key too.
    Pair p;
    const std::uint8_t other[] = "source HELLO body | destination HELLO bodY";
    TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
    TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), other);
    const auto [c, s] = handshake_pair(client, server);
    CHECK(c.kind == "auth" && s.kind == "auth");
    // The channel stays refused.
    std::uint8_t byte = 0;
    CHECK(has(outcome([&] { client.handshake(kTimeout); }), "other", "called twice"));
    CHECK(has(outcome([&] { (void)client.read_some(&byte, 1, 100); }), "other", "before the handshake"));
  }
}

void psk_derivation() {
  // The documented formula (docs/protocol.md): HKDF-SHA256, salt "livemig-v1 tls13 psk", the
  // secret as keying material, the context as info, 32 bytes; computed here from HMAC.
  const std::vector<std::uint8_t> secret = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  const std::string salt = "livemig-v1 tls13 psk";
  std::uint8_t prk[32];
  std::size_t len = 0;
  CHECK(EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, salt.data(), salt.size(), secret.data(), secret.size(),
                  prk, sizeof prk, &len) != nullptr);
  std::vector<std::uint8_t> info(kHello, kHello + sizeof kHello);
  info.push_back(1);
  std::uint8_t okm[32];
  CHECK(EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, prk, sizeof prk, info.data(), info.size(), okm,
                  sizeof okm, &len) != nullptr);
  const auto psk = derive_tls_psk(secret, kHello);
  CHECK(std::memcmp(psk.data(), okm, 32) == 0);
  const std::uint8_t other[] = "another context";
  CHECK(derive_tls_psk(secret, other) != psk);
  CHECK(has(outcome([&] { (void)derive_tls_psk(secret, {}); }), "other", "context"));
  CHECK(has(outcome([&] { (void)psk_context(TlsRole::kClient, TlsRecordLayer::kDirect, {1, 2, 3}); }), "other",
            "at least 16 bytes"));
}

void x509_mutual() {
  const bench::tls::TempPki pki("localhost");
  for (const char* name : {"localhost", "127.0.0.1"}) {
    Pair p;
    TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), name), p.a.get());
    TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), ""), p.b.get());
    const auto [c, s] = handshake_pair(client, server);
    CHECK(c.kind == "ok" && s.kind == "ok");
    CHECK(client.peer_identity().find("CN=localhost") != std::string::npos);
    CHECK(server.peer_identity().find("CN=livemig source") != std::string::npos);
    frames_both_ways(client, server);
  }
  // The server may require a name of its client too.
  Pair p;
  TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost"), p.a.get());
  TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), "client.livemig.test"), p.b.get());
  CHECK(handshake_pair(client, server).second.kind == "ok");
}

// Both sides pass what they saw of the plaintext handshake: equal transcripts pass and the
// channel carries frames; a transcript that differs by one byte (a HELLO altered in transit, which
// x509 keying does not otherwise notice) is refused on both sides, whichever record layer runs.
void transcript_binding() {
  const bench::tls::TempPki pki("localhost");
  const std::uint8_t altered[] = "source HELLO body | destination HELLO bodY";
  for (const bool psk : {false, true}) {
    Pair p;
    auto cctx = psk ? psk_context(TlsRole::kClient) : x509_context(TlsRole::kClient, pki.dir(), "localhost");
    auto sctx = psk ? psk_context(TlsRole::kServer, TlsRecordLayer::kOpenSsl) : x509_context(TlsRole::kServer, pki.dir(), "");
    TlsChannel client(cctx, p.a.get(), kHello);
    TlsChannel server(sctx, p.b.get(), kHello);
    Outcome s;
    std::thread t([&] { s = outcome([&] { server.handshake(kTimeout, kHello); }); });
    const Outcome c = outcome([&] { client.handshake(kTimeout, kHello); });
    t.join();
    CHECK(c.kind == "ok" && s.kind == "ok");
    frames_both_ways(client, server);
  }
  for (const TlsRecordLayer layer : {TlsRecordLayer::kDirect, TlsRecordLayer::kOpenSsl}) {
    Pair p;
    TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost"), p.a.get());
    TlsOptions so = TlsOptions::x509_dir(pki.dir(), TlsRole::kServer, "");
    so.record_layer = layer;
    TlsChannel server(std::make_shared<const TlsContext>(std::move(so), TlsRole::kServer), p.b.get());
    Outcome s;
    const auto t0 = Clock::now();
    std::thread t([&] { s = outcome([&] { server.handshake(kTimeout, altered); }); });
    const Outcome c = outcome([&] { client.handshake(kTimeout, kHello); });
    t.join();
    CHECK(has(c, "protocol", "the server saw other handshake messages than we did"));
    CHECK(has(s, "protocol", "the client saw other handshake messages than we did"));
    CHECK(Clock::now() - t0 < std::chrono::seconds(5));  // refused at once, not at the timeout
    std::uint8_t byte = 0;
    CHECK(has(outcome([&] { (void)client.read_some(&byte, 1, 100); }), "other", "before the handshake"));
  }
}

// Keying material exported from a session: the same on both ends, another for another label or
// context, another in another session; refused before the handshake.
void exporter() {
  const bench::tls::TempPki pki("localhost");
  std::vector<std::uint8_t> first;
  for (int session = 0; session < 2; ++session) {
    Pair p;
    TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost"), p.a.get());
    TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), ""), p.b.get());
    CHECK(has(outcome([&] { (void)client.export_keying_material("EXPORTER-x", kHello, 32); }), "other",
              "before the handshake"));
    const auto [c, s] = handshake_pair(client, server);
    CHECK(c.kind == "ok" && s.kind == "ok");
    const auto a = client.export_keying_material("EXPORTER-livemig test", kHello, 32);
    CHECK(a.size() == 32 && a == server.export_keying_material("EXPORTER-livemig test", kHello, 32));
    CHECK(a != client.export_keying_material("EXPORTER-livemig other", kHello, 32));
    const std::uint8_t other[] = "another context";
    CHECK(a != client.export_keying_material("EXPORTER-livemig test", other, 32));
    if (session == 0) first = a;
    else CHECK(a != first);
    frames_both_ways(client, server);  // exporting leaves the channel as it was
  }
}

void x509_expired() {
  const bench::tls::TempPki pki("localhost");
  {
    // The server's certificate expired: the client refuses it.
    Pair p;
    TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost"), p.a.get());
    TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), "", "expired-cert.pem", "expired-key.pem"), p.b.get());
    const auto [c, s] = handshake_pair(client, server);
    CHECK(has(c, "auth", "certificate has expired"));
    CHECK(has(s, "auth", "refused our certificate"));
  }
  {
    // The client's expired: the server refuses it, and the client learns it in its handshake.
    Pair p;
    TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost", "expired-cert.pem", "expired-key.pem"),
                      p.a.get());
    TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), ""), p.b.get());
    const auto [c, s] = handshake_pair(client, server);
    CHECK(has(s, "auth", "certificate has expired"));
    CHECK(has(c, "auth", "certificate_expired"));
  }
}

void x509_wrong_name() {
  const bench::tls::TempPki pki("localhost");
  Pair p;
  TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "dest.example"), p.a.get());
  TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), ""), p.b.get());
  const auto [c, s] = handshake_pair(client, server);
  CHECK(has(c, "auth", "does not name 'dest.example'"));
  CHECK(s.kind == "auth");
}

void x509_unknown_ca() {
  const bench::tls::TempPki pki("localhost");
  Pair p;
  TlsChannel client(x509_context(TlsRole::kClient, pki.dir(), "localhost", "rogue-cert.pem", "rogue-key.pem"),
                    p.a.get());
  TlsChannel server(x509_context(TlsRole::kServer, pki.dir(), ""), p.b.get());
  const auto [c, s] = handshake_pair(client, server);
  CHECK(has(s, "auth", "failed verification"));
  CHECK(has(c, "auth", "refused our certificate"));
  // A source with a shared secret against a destination with certificates: no common key.
  Pair q;
  TlsChannel c2(psk_context(TlsRole::kClient), q.a.get(), kHello);
  TlsChannel s2(x509_context(TlsRole::kServer, pki.dir(), ""), q.b.get());
  const auto [c2o, s2o] = handshake_pair(c2, s2);
  CHECK(c2o.kind == "auth" && s2o.kind == "auth");
}

void plaintext_peer() {
  // A plaintext livemig peer: a HELLO prefix (magic, version 1, type HELLO) where TLS expects a
  // ClientHello, and the other way round.
  const std::uint8_t hello[16] = {0x89, 'L', 'V', 'M', 'I', 'G', '\r', '\n', 1, 0, 1, 0, 76, 0, 0, 0};
  {
    Pair p;
    TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), kHello);
    send_all(p.a.get(), hello, sizeof hello);
    const Outcome s = outcome([&] { server.handshake(2000); });
    std::printf("  server: %s\n", s.what.c_str());
    CHECK(has(s, "protocol", "does not speak TLS 1.3"));
  }
  {
    Pair p;
    TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
    std::thread plain([&] {
      std::uint8_t buf[4096];
      (void)::recv(p.b.get(), buf, sizeof buf, 0);  // the ClientHello
      send_all(p.b.get(), hello, sizeof hello);
    });
    const Outcome c = outcome([&] { client.handshake(2000); });
    plain.join();
    std::printf("  client: %s\n", c.what.c_str());
    CHECK(has(c, "protocol", "does not speak TLS 1.3"));
  }
}

void silent_peer() {
  // Nobody answers: the handshake gives up at its deadline, not later.
  Pair p;
  TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), kHello);
  const auto t0 = Clock::now();
  const Outcome s = outcome([&] { server.handshake(300); });
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("  server: %s (%.3f s)\n", s.what.c_str(), took);
  CHECK(has(s, "lost", "no answer from the peer"));
  CHECK(took >= 0.29 && took < 2.0);
}

void stops_mid_handshake() {
  // The ClientHello goes through, then the path goes silent both ways (a half-open peer).
  {
    Relayed r([](bool to_server, std::vector<std::uint8_t>& rec) { return to_server && rec[0] == 22; });
    TlsChannel client(psk_context(TlsRole::kClient), r.client_fd(), kHello);
    TlsChannel server(psk_context(TlsRole::kServer), r.server_fd(), kHello);
    const auto t0 = Clock::now();
    const auto [c, s] = handshake_pair(client, server, 400);
    const double took = std::chrono::duration<double>(Clock::now() - t0).count();
    CHECK(has(c, "lost", "no answer") && has(s, "lost", "no answer"));
    CHECK(took < 3.0);
  }
  // The ClientHello, then the peer closes: the server says so at once.
  {
    Relayed r([](bool to_server, std::vector<std::uint8_t>&) { return to_server; });
    TlsChannel server(psk_context(TlsRole::kServer), r.server_fd(), kHello);
    std::thread client_side([&] {
      TlsChannel client(psk_context(TlsRole::kClient), r.client_fd(), kHello);
      (void)outcome([&] { client.handshake(200); });
      ::shutdown(r.client_fd(), SHUT_RDWR);
    });
    const Outcome s = outcome([&] { server.handshake(5000); });
    client_side.join();
    std::printf("  server: %s\n", s.what.c_str());
    CHECK(has(s, "lost", "closed the connection") || has(s, "lost", "no answer"));
  }
}

// One byte flipped in the 8th protected record from the client, mid-stream: the reader fails
// with the record named, pages of earlier frames are in, and no unverified byte is left in the
// region (every byte is the source's, the fill, or wiped).
void flipped_byte_case(TlsRecordLayer server_layer) {
  std::atomic<int> protected_records{0};
  Relayed r([&](bool to_server, std::vector<std::uint8_t>& rec) {
    if (to_server && rec[0] == 23 && ++protected_records == 8) rec[rec.size() / 2] ^= 0x80;
    return true;
  });
  TlsChannel client(psk_context(TlsRole::kClient), r.client_fd(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer, server_layer), r.server_fd(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  const WireConfig cfg = config(8);  // 32 KiB frames: the 8th record lies in the 4th frame
  const auto src = pattern(3);
  std::vector<std::uint8_t> dst(src.size(), 0x05);
  std::thread source([&] {
    (void)outcome([&] {
      FrameWriter out(client, cfg);
      out.send_pages(0, kPages, src.data());
      out.send_end();
    });
  });
  PageBitmap received(kPages);
  RegionReceiver receiver(dst.data(), kPage, received);
  TlsInput in(server, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  const Outcome o = outcome([&] { reader.run(receiver); });
  std::printf("  reader: %s\n", o.what.c_str());
  CHECK(has(o, "protocol", "failed authentication"));
  server.shutdown();
  source.join();
  r.relay->stop();
  CHECK(received.count() > 0 && received.count() < kPages);
  CHECK(received.find_next_set(0) == 0);
  const std::uint64_t good = received.count();
  CHECK(good % 8 == 0);  // whole frames only
  for (std::size_t i = 0; i < dst.size(); ++i)
    if (!(dst[i] == src[i] || dst[i] == 0x05 || dst[i] == 0)) {
      std::fprintf(stderr, "byte %zu: %02x, source %02x\n", i, dst[i], src[i]);
      CHECK(false);
    }
  for (std::size_t i = 0; i < good * kPage; ++i) CHECK(dst[i] == src[i]);
  // The channel refuses any further read with the same error.
  std::uint8_t byte = 0;
  CHECK(has(outcome([&] { (void)server.read_some(&byte, 1, 100); }), "protocol", "failed authentication"));
}

void flipped_byte() {
  flipped_byte_case(TlsRecordLayer::kDirect);
  flipped_byte_case(TlsRecordLayer::kOpenSsl);
}

// A whole session's client-to-server bytes, captured and played again to a fresh server: the
// server's new random and key share make the replayed Finished fail (same HELLO context, the
// strongest replay) or the binder fail (a new context, as a new HELLO makes); nothing is read.
void replayed_session() {
  std::vector<std::uint8_t> capture;
  {
    Relayed r([&](bool to_server, std::vector<std::uint8_t>& rec) {
      if (to_server) capture.insert(capture.end(), rec.begin(), rec.end());
      return true;
    });
    TlsChannel client(psk_context(TlsRole::kClient), r.client_fd(), kHello);
    TlsChannel server(psk_context(TlsRole::kServer), r.server_fd(), kHello);
    CHECK(handshake_pair(client, server).first.kind == "ok");
    frames_both_ways(client, server);
    client.close_notify();
    r.relay->stop();
  }
  CHECK(capture.size() > kPages * kPage);
  const std::uint8_t new_hello[] = "source HELLO body | a fresh destination HELLO body";
  for (const auto* context : {kHello, new_hello}) {
    Pair p;
    const std::span<const std::uint8_t> ctx(context, context == kHello ? sizeof kHello : sizeof new_hello);
    TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), ctx);
    std::thread replay([&] {
      send_all(p.a.get(), capture.data(), capture.size());
      ::shutdown(p.a.get(), SHUT_WR);
    });
    const Outcome s = outcome([&] { server.handshake(2000); });
    ::shutdown(p.b.get(), SHUT_RDWR);
    replay.join();
    std::printf("  server: %s\n", s.what.c_str());
    CHECK(s.kind == "auth");
    CHECK(!server.established());
  }
}

// Two threads share the source's writer (bulk pages and urgent answers), a third reads requests
// on the same channel; the destination reads in place while a fourth thread sends requests.
void shared_writer_full_duplex_case(TlsRecordLayer layer) {
  Pair p;
  TlsChannel client(psk_context(TlsRole::kClient, layer), p.a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer, layer), p.b.get(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  const WireConfig cfg = config(16);
  const auto src = pattern(4);
  std::vector<std::uint8_t> dst(src.size(), 0x05);
  FrameWriter out(client, cfg);
  constexpr std::uint32_t kRequests = 100;
  std::atomic<std::uint32_t> answered{0};
  std::thread answerer([&] {
    TlsInput in(client, cfg.timeout_ms);
    FrameReader reader(in, cfg, Direction::kToSource);
    struct Server : FrameHandler {
      FrameWriter* w = nullptr;
      const std::uint8_t* region = nullptr;
      std::atomic<std::uint32_t>* answered = nullptr;
      std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { return nullptr; }
      void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
      void zero(std::uint64_t, std::uint32_t) override {}
      void request(std::uint64_t first, std::uint32_t n) override {
        w->send_urgent_pages(first, n, region + first * kPage);
        answered->fetch_add(1, std::memory_order_relaxed);
      }
      void end() override {}
    } handler;
    handler.w = &out;
    handler.region = src.data();
    handler.answered = &answered;
    CHECK(reader.run(handler));
  });
  std::vector<std::thread> senders;
  for (int t = 0; t < 2; ++t)
    senders.emplace_back([&, t] {
      const std::uint64_t lo = kPages * static_cast<std::uint64_t>(t) / 2;
      const std::uint64_t hi = kPages * static_cast<std::uint64_t>(t + 1) / 2;
      for (std::uint64_t q = lo; q < hi; q += 20) out.send_pages(q, std::min<std::uint64_t>(20, hi - q), src.data() + q * kPage);
      out.flush();
    });
  FrameWriter ret(server, cfg);
  std::thread requester([&] {
    for (std::uint32_t i = 0; i < kRequests; ++i) ret.send_request((i * 37u) % (kPages - 2), 1 + i % 2);
  });
  std::thread closer([&] {
    for (auto& s : senders) s.join();
    requester.join();
    while (answered.load(std::memory_order_relaxed) < kRequests) std::this_thread::yield();
    out.send_command(Command::kComplete);
    out.send_end();
  });
  PageBitmap received(kPages);
  Control control;
  RegionReceiver receiver(dst.data(), kPage, received, &control);
  TlsInput in(server, cfg.timeout_ms);
  FrameReader reader(in, cfg, Direction::kToDestination);
  CHECK(reader.run(receiver));
  ret.send_end();
  closer.join();
  answerer.join();
  CHECK(received.count() == kPages);
  CHECK(std::memcmp(src.data(), dst.data(), src.size()) == 0);
}

void shared_writer_full_duplex() { shared_writer_full_duplex_case(TlsRecordLayer::kDirect); }
void shared_writer_full_duplex_openssl() { shared_writer_full_duplex_case(TlsRecordLayer::kOpenSsl); }

// A session's reader refuses an fd that has no TLS channel instead of reading it in clear.
void opener_refuses_plain_fd() {
  Pair p, q;
  TlsChannel client(psk_context(TlsRole::kClient), p.a.get(), kHello);
  TlsChannel server(psk_context(TlsRole::kServer), p.b.get(), kHello);
  CHECK(handshake_pair(client, server).first.kind == "ok");
  auto shared = std::shared_ptr<TlsChannel>(&server, [](TlsChannel*) {});
  const InputOpener open = tls_input_opener({shared});
  CHECK(open(p.b.get(), 0) != nullptr);
  CHECK(has(outcome([&] { (void)open(q.b.get(), 0); }), "protocol", "refusing to read it in clear"));
  // close_notify ends the peer's reads cleanly.
  client.close_notify();
  std::uint8_t byte = 0;
  CHECK(server.read_some(&byte, 1, 1000) == 0);
}

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"psk_frames_both_ways", psk_frames_both_ways},
                             {"psk_staging_receiver", psk_staging_receiver},
                             {"record_layer_interop", record_layer_interop},
                             {"tcp_ktls_or_userspace", tcp_ktls_or_userspace},
                             {"psk_wrong_secret", psk_wrong_secret},
                             {"psk_derivation", psk_derivation},
                             {"x509_mutual", x509_mutual},
                             {"transcript_binding", transcript_binding},
                             {"exporter", exporter},
                             {"x509_expired", x509_expired},
                             {"x509_wrong_name", x509_wrong_name},
                             {"x509_unknown_ca", x509_unknown_ca},
                             {"plaintext_peer", plaintext_peer},
                             {"silent_peer", silent_peer},
                             {"stops_mid_handshake", stops_mid_handshake},
                             {"flipped_byte", flipped_byte},
                             {"replayed_session", replayed_session},
                             {"shared_writer_full_duplex", shared_writer_full_duplex},
                             {"shared_writer_full_duplex_openssl", shared_writer_full_duplex_openssl},
                             {"opener_refuses_plain_fd", opener_refuses_plain_fd}});
}
