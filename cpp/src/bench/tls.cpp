#include "livemig/bench/tls.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"

namespace livemig::bench::tls {

using livemig::wire::TlsChannel;
using livemig::wire::TlsContext;
using livemig::wire::TlsKeying;
using livemig::wire::TlsOptions;
using livemig::wire::TlsRole;

namespace {

using Clock = std::chrono::steady_clock;

std::string openssl_errors() {
  std::string out;
  char buf[256];
  while (const unsigned long e = ERR_get_error()) {
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

// ---- PKI ----

struct KeyFree {
  void operator()(EVP_PKEY* k) const noexcept { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* c) const noexcept { X509_free(c); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

Key new_key() {
  Key k(EVP_EC_gen("P-256"));
  if (!k) throw Error("test PKI: EC key generation failed: " + openssl_errors());
  return k;
}

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (ext == nullptr) throw Error(std::string("test PKI: bad extension ") + value + ": " + openssl_errors());
  const int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (ok != 1) throw Error("test PKI: X509_add_ext failed");
}

// A certificate for `key` named `cn` (and `san` when not empty), valid from now + `from_s` to now
// + `to_s`, signed by `issuer` with `issuer_key` (self-signed when issuer is null).
Cert make_cert(EVP_PKEY* key, const std::string& cn, const std::string& san, long from_s, long to_s, bool ca,
               X509* issuer, EVP_PKEY* issuer_key, long serial) {
  Cert c(X509_new());
  if (!c) throw Error("test PKI: X509_new failed");
  X509* x = c.get();
  X509_set_version(x, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x), serial);
  X509_gmtime_adj(X509_getm_notBefore(x), from_s);
  X509_gmtime_adj(X509_getm_notAfter(x), to_s);
  X509_set_pubkey(x, key);
  X509_NAME* name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("livemig test"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509* signer = issuer != nullptr ? issuer : x;
  X509_set_issuer_name(x, X509_get_subject_name(signer));
  if (ca) {
    add_ext(x, signer, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(x, signer, NID_key_usage, "critical,keyCertSign,cRLSign");
    add_ext(x, signer, NID_subject_key_identifier, "hash");
  } else {
    add_ext(x, signer, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(x, signer, NID_key_usage, "critical,digitalSignature");
    add_ext(x, signer, NID_ext_key_usage, "serverAuth,clientAuth");
    add_ext(x, signer, NID_authority_key_identifier, "keyid:always");
    if (!san.empty()) add_ext(x, signer, NID_subject_alt_name, san.c_str());
  }
  if (X509_sign(x, issuer_key != nullptr ? issuer_key : key, EVP_sha256()) == 0)
    throw Error("test PKI: X509_sign failed: " + openssl_errors());
  return c;
}

void write_pem(const std::string& path, X509* cert, EVP_PKEY* key) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) throw_errno("open", path);
  const int ok = cert != nullptr ? PEM_write_X509(f, cert)
                                 : PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
  const int closed = std::fclose(f);
  if (ok != 1 || closed != 0) throw Error("test PKI: cannot write " + path);
}

// ---- sockets ----

std::pair<UniqueFd, UniqueFd> connected_pair(const std::string& transport) {
  if (transport == "unix") {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("socketpair", "bench pair");
    return {UniqueFd(sv[0]), UniqueFd(sv[1])};
  }
  if (transport != "tcp") throw std::invalid_argument("transport must be 'unix' or 'tcp', got '" + transport + "'");
  UniqueFd lst(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!lst) throw_errno("socket", "bench listener");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(lst.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(lst.get(), 1) != 0 ||
      ::getsockname(lst.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw_errno("listen", "bench listener on 127.0.0.1");
  UniqueFd a(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!a || ::connect(a.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0) throw_errno("connect", "bench pair");
  UniqueFd b(::accept4(lst.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!b) throw_errno("accept", "bench pair");
  const int one = 1;
  // As the wire's sockets: no Nagle delay on small writes.
  ::setsockopt(a.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(b.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return {std::move(a), std::move(b)};
}

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// The PSK settings the stream benchmark and the handshake timings use.
TlsOptions psk_options(const std::string& suites, bool ktls,
                       livemig::wire::TlsRecordLayer layer = livemig::wire::TlsRecordLayer::kDirect) {
  TlsOptions o;
  o.record_layer = layer;
  o.keying = TlsKeying::kPsk;
  o.secret.assign(32, 0x5a);
  o.ciphersuites = suites;
  o.ktls = ktls;
  return o;
}

const std::uint8_t kBenchContext[] = {'l', 'i', 'v', 'e', 'm', 'i', 'g', '-', 'b', 'e', 'n', 'c', 'h'};

// Runs both handshakes (the server's on another thread); rethrows the first failure.
void handshake_both(TlsChannel& client, TlsChannel& server, int timeout_ms) {
  std::exception_ptr server_error;
  std::thread t([&] {
    try {
      server.handshake(timeout_ms);
    } catch (...) {
      server_error = std::current_exception();
    }
  });
  std::exception_ptr client_error;
  try {
    client.handshake(timeout_ms);
  } catch (...) {
    client_error = std::current_exception();
    server.shutdown();
  }
  t.join();
  if (server_error) std::rethrow_exception(server_error);
  if (client_error) std::rethrow_exception(client_error);
}

// The destination's control frames: only END is expected.
class EndOnly : public livemig::wire::FrameHandler {
 public:
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { throw ProtocolError("no pages here"); }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override {}
  void end() override {}
};

}  // namespace

void write_test_pki(const std::string& dir, const std::string& server_name) {
  constexpr long kDay = 24 * 3600;
  const Key ca_key = new_key();
  const Cert ca = make_cert(ca_key.get(), "livemig test CA", "", -kDay, 30 * kDay, true, nullptr, nullptr, 1);
  const std::string server_san = "DNS:" + server_name + ",IP:127.0.0.1";
  const Key server_key = new_key();
  const Cert server =
      make_cert(server_key.get(), server_name, server_san, -kDay, 30 * kDay, false, ca.get(), ca_key.get(), 2);
  const Key client_key = new_key();
  const Cert client = make_cert(client_key.get(), "livemig source", "DNS:client.livemig.test", -kDay, 30 * kDay, false,
                                ca.get(), ca_key.get(), 3);
  const Key expired_key = new_key();
  const Cert expired =
      make_cert(expired_key.get(), server_name, server_san, -10 * kDay, -kDay, false, ca.get(), ca_key.get(), 4);
  const Key rogue_ca_key = new_key();
  const Cert rogue_ca =
      make_cert(rogue_ca_key.get(), "livemig test CA", "", -kDay, 30 * kDay, true, nullptr, nullptr, 1);
  const Key rogue_key = new_key();
  const Cert rogue = make_cert(rogue_key.get(), "livemig source", "DNS:client.livemig.test", -kDay, 30 * kDay, false,
                               rogue_ca.get(), rogue_ca_key.get(), 5);
  write_pem(dir + "/ca-cert.pem", ca.get(), nullptr);
  write_pem(dir + "/ca-key.pem", nullptr, ca_key.get());
  write_pem(dir + "/server-cert.pem", server.get(), nullptr);
  write_pem(dir + "/server-key.pem", nullptr, server_key.get());
  write_pem(dir + "/client-cert.pem", client.get(), nullptr);
  write_pem(dir + "/client-key.pem", nullptr, client_key.get());
  write_pem(dir + "/expired-cert.pem", expired.get(), nullptr);
  write_pem(dir + "/expired-key.pem", nullptr, expired_key.get());
  write_pem(dir + "/rogue-cert.pem", rogue.get(), nullptr);
  write_pem(dir + "/rogue-key.pem", nullptr, rogue_key.get());
}

TempPki::TempPki(const std::string& server_name) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/livemig-pki-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) throw_errno("mkdtemp", templ);
  dir_ = templ;
  try {
    write_test_pki(dir_, server_name);
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    throw;
  }
}

TempPki::~TempPki() {
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string evp_cipher_of_suite(const std::string& suite) {
  if (suite == "TLS_AES_128_GCM_SHA256") return "aes-128-gcm";
  if (suite == "TLS_AES_256_GCM_SHA384") return "aes-256-gcm";
  if (suite == "TLS_CHACHA20_POLY1305_SHA256") return "chacha20-poly1305";
  throw std::invalid_argument("no EVP baseline for suite '" + suite + "'");
}

Throughput evp_seal_loop(const std::string& cipher, std::size_t record_bytes, std::uint64_t total_bytes,
                         std::size_t source_bytes) {
  const char* name = cipher == "aes-128-gcm"         ? "AES-128-GCM"
                     : cipher == "aes-256-gcm"       ? "AES-256-GCM"
                     : cipher == "chacha20-poly1305" ? "ChaCha20-Poly1305"
                                                     : nullptr;
  if (name == nullptr)
    throw std::invalid_argument("cipher must be aes-128-gcm, aes-256-gcm or chacha20-poly1305, got '" + cipher + "'");
  if (record_bytes == 0 || record_bytes > (1u << 20)) throw std::invalid_argument("record_bytes must be 1 to 1 MiB");
  const std::unique_ptr<EVP_CIPHER, decltype(&EVP_CIPHER_free)> c(EVP_CIPHER_fetch(nullptr, name, nullptr),
                                                                  &EVP_CIPHER_free);
  const std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(EVP_CIPHER_CTX_new(), &EVP_CIPHER_CTX_free);
  if (!c || !ctx) throw Error("EVP " + std::string(name) + " unavailable: " + openssl_errors());
  const std::size_t key_len = static_cast<std::size_t>(EVP_CIPHER_get_key_length(c.get()));
  std::vector<std::uint8_t> key(key_len, 0x42);
  std::uint8_t iv[12] = {};
  std::uint8_t aad[5] = {23, 3, 3, 0, 0};
  std::uint8_t tag[16];
  // The source: written before it is timed; the output: one record buffer reused, as a TLS
  // sender's is.
  std::vector<std::uint8_t> src(std::max(record_bytes, source_bytes), 0xa5);
  std::vector<std::uint8_t> out(record_bytes + 16);
  if (EVP_EncryptInit_ex2(ctx.get(), c.get(), key.data(), nullptr, nullptr) != 1)
    throw Error("EVP init failed: " + openssl_errors());
  const auto t0 = Clock::now();
  std::uint64_t done = 0;
  std::uint64_t seq = 0;
  std::size_t at = 0;
  while (done < total_bytes) {
    // TLS 1.3's per-record nonce: the IV with the record's sequence number folded in.
    std::memcpy(iv + 4, &seq, sizeof seq);
    ++seq;
    int len = 0;
    aad[3] = static_cast<std::uint8_t>((record_bytes + 17) >> 8);
    aad[4] = static_cast<std::uint8_t>(record_bytes + 17);
    if (EVP_EncryptInit_ex2(ctx.get(), nullptr, nullptr, iv, nullptr) != 1 ||
        EVP_EncryptUpdate(ctx.get(), nullptr, &len, aad, sizeof aad) != 1 ||
        EVP_EncryptUpdate(ctx.get(), out.data(), &len, src.data() + at, static_cast<int>(record_bytes)) != 1 ||
        EVP_EncryptFinal_ex(ctx.get(), out.data() + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_GET_TAG, sizeof tag, tag) != 1)
      throw Error("EVP seal failed: " + openssl_errors());
    done += record_bytes;
    at += record_bytes;
    if (at + record_bytes > src.size()) at = 0;
  }
  Throughput r;
  r.bytes = done;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

StreamResult stream_throughput(const StreamOptions& o) {
  constexpr std::size_t kPage = 4096;
  if (o.region_bytes < kPage || o.region_bytes % kPage != 0)
    throw std::invalid_argument("region_bytes must be a positive multiple of 4096");
  if (o.total_bytes == 0) throw std::invalid_argument("total_bytes must be > 0");
  const std::uint64_t pages = o.region_bytes / kPage;
  const std::uint64_t passes = std::max<std::uint64_t>(1, o.total_bytes / o.region_bytes);
  auto [a, b] = connected_pair(o.transport);
  Mapping src = Mapping::anonymous(o.region_bytes);
  Mapping dst = Mapping::anonymous(o.region_bytes);
  for (std::size_t i = 0; i < o.region_bytes; i += 8) {
    const std::uint64_t v = (i * 0x9E3779B97F4A7C15ull) | 1;
    std::memcpy(src.data() + i, &v, 8);
  }
  std::memset(dst.data(), 0, o.region_bytes);  // populated: first-touch faults are not what is measured

  livemig::wire::WireConfig cfg;
  cfg.page_size = kPage;
  cfg.region_pages = pages;
  cfg.frame_pages = o.frame_pages;
  cfg.batch_bytes = o.batch_bytes;
  cfg.timeout_ms = 60000;

  std::shared_ptr<TlsChannel> client, server;
  StreamResult res;
  res.path = "plain";
  if (o.tls) {
    const auto cctx =
        std::make_shared<const TlsContext>(psk_options(o.ciphersuites, o.ktls, o.record_layer), TlsRole::kClient);
    const auto sctx =
        std::make_shared<const TlsContext>(psk_options(o.ciphersuites, o.ktls, o.record_layer), TlsRole::kServer);
    client = std::make_shared<TlsChannel>(cctx, a.get(), kBenchContext);
    server = std::make_shared<TlsChannel>(sctx, b.get(), kBenchContext);
    handshake_both(*client, *server, 10000);
    res.path = client->path();
    res.cipher = client->cipher();
  }

  std::exception_ptr send_error;
  double sender_cpu = 0;
  std::uint64_t send_calls = 0;
  const auto t0 = Clock::now();
  std::thread sender([&] {
    try {
      const double c0 = thread_cpu_seconds();
      std::unique_ptr<livemig::wire::FrameWriter> w =
          client ? std::make_unique<livemig::wire::FrameWriter>(*client, cfg)
                 : std::make_unique<livemig::wire::FrameWriter>(a.get(), cfg);
      for (std::uint64_t p = 0; p < passes; ++p) {
        w->send_pages(0, pages, src.data());
        w->flush();
      }
      w->send_end();
      sender_cpu = thread_cpu_seconds() - c0;
      send_calls = w->stats().syscalls;
      if (o.drain_only) ::shutdown(a.get(), SHUT_WR);
    } catch (...) {
      send_error = std::current_exception();
      ::shutdown(a.get(), SHUT_RDWR);
    }
  });
  std::exception_ptr recv_error;
  try {
    const double c0 = thread_cpu_seconds();
    if (o.drain_only) {
      // Takes whatever arrives into one cache-resident buffer until the sender closes.
      std::vector<std::uint8_t> sink(256 * 1024);
      for (;;) {
        res.recv_calls += 1;
        const ssize_t r = ::recv(b.get(), sink.data(), sink.size(), 0);
        if (r > 0) continue;
        if (r == 0) break;
        if (errno != EINTR) throw_errno("recv", "stream benchmark drain");
      }
    } else {
      std::unique_ptr<livemig::wire::FrameInput> in;
      if (server)
        in = std::make_unique<livemig::wire::TlsInput>(*server, cfg.timeout_ms);
      else
        in = std::make_unique<livemig::wire::FdInput>(b.get(), cfg.timeout_ms);
      livemig::wire::FrameReader reader(*in, cfg, livemig::wire::Direction::kToDestination);
      PageBitmap received(pages);
      EndOnly control;
      livemig::wire::RegionReceiver receiver(dst.data(), kPage, received, &control);
      if (!reader.run(receiver)) throw ProtocolError("stream benchmark: the stream ended without END");
      res.recv_calls = reader.stats().syscalls;
    }
    res.receiver_cpu = thread_cpu_seconds() - c0;
  } catch (...) {
    recv_error = std::current_exception();
    ::shutdown(b.get(), SHUT_RDWR);
  }
  const auto t1 = Clock::now();
  sender.join();
  if (send_error) std::rethrow_exception(send_error);
  if (recv_error) std::rethrow_exception(recv_error);
  if (!o.drain_only && std::memcmp(src.data(), dst.data(), o.region_bytes) != 0)
    throw Error("stream benchmark: the destination's bytes differ from the source's");
  res.moved.bytes = passes * o.region_bytes;
  res.moved.seconds = std::chrono::duration<double>(t1 - t0).count();
  res.sender_cpu = sender_cpu;
  res.send_calls = send_calls;
  return res;
}

std::vector<std::uint64_t> request_round_trips(bool tls, std::size_t iters, livemig::wire::TlsRecordLayer layer) {
  constexpr std::size_t kPage = 4096;
  constexpr std::uint64_t kPages = 1024;
  auto [main_src, main_dst] = connected_pair("tcp");
  auto [urgent_src, urgent_dst] = connected_pair("tcp");
  std::vector<std::uint8_t> src(kPages * kPage, 0x11);
  std::vector<std::uint8_t> dst(kPages * kPage);
  livemig::wire::WireConfig cfg;
  cfg.page_size = kPage;
  cfg.region_pages = kPages;
  cfg.timeout_ms = 30000;
  std::shared_ptr<TlsChannel> ms, md, us, ud;
  if (tls) {
    const auto cctx = std::make_shared<const TlsContext>(
        psk_options(livemig::wire::kDefaultCiphersuites, true, layer), TlsRole::kClient);
    const auto sctx = std::make_shared<const TlsContext>(
        psk_options(livemig::wire::kDefaultCiphersuites, true, layer), TlsRole::kServer);
    ms = std::make_shared<TlsChannel>(cctx, main_src.get(), kBenchContext);
    md = std::make_shared<TlsChannel>(sctx, main_dst.get(), kBenchContext);
    us = std::make_shared<TlsChannel>(cctx, urgent_src.get(), kBenchContext);
    ud = std::make_shared<TlsChannel>(sctx, urgent_dst.get(), kBenchContext);
    handshake_both(*ms, *md, 10000);
    handshake_both(*us, *ud, 10000);
  }
  using livemig::wire::FrameWriter;
  const auto writer = [&](const std::shared_ptr<TlsChannel>& c, int fd) {
    return c ? std::make_unique<FrameWriter>(*c, cfg) : std::make_unique<FrameWriter>(fd, cfg);
  };
  const auto input = [&](const std::shared_ptr<TlsChannel>& c, int fd) -> std::unique_ptr<livemig::wire::FrameInput> {
    if (c) return std::make_unique<livemig::wire::TlsInput>(*c, cfg.timeout_ms);
    return std::make_unique<livemig::wire::FdInput>(fd, cfg.timeout_ms);
  };
  // The source: answers each REQUEST on the return path with its page on the urgent socket.
  std::exception_ptr server_error;
  std::thread server([&] {
    try {
      const auto urgent = writer(us, urgent_src.get());
      const auto in = input(ms, main_src.get());
      livemig::wire::FrameReader reader(*in, cfg, livemig::wire::Direction::kToSource);
      struct Serve : livemig::wire::FrameHandler {
        FrameWriter* out = nullptr;
        const std::uint8_t* region = nullptr;
        std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { throw ProtocolError("no pages here"); }
        void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
        void zero(std::uint64_t, std::uint32_t) override {}
        void request(std::uint64_t first, std::uint32_t n) override {
          out->send_urgent_pages(first, n, region + first * kPage);
        }
        void end() override {}
      } serve;
      serve.out = urgent.get();
      serve.region = src.data();
      reader.run(serve);
    } catch (...) {
      server_error = std::current_exception();
    }
  });
  std::vector<std::uint64_t> out;
  out.reserve(iters);
  {
    const auto ret = writer(md, main_dst.get());
    const auto in = input(ud, urgent_dst.get());
    livemig::wire::FrameReader reader(*in, cfg, livemig::wire::Direction::kToDestination);
    PageBitmap received(kPages);
    EndOnly control;
    livemig::wire::RegionReceiver receiver(dst.data(), kPage, received, &control);
    for (std::size_t i = 0; i < iters; ++i) {
      const auto t0 = Clock::now();
      ret->send_request((i * 7919) % kPages, 1);
      if (reader.next(receiver) != livemig::wire::FrameType::kPages)
        throw ProtocolError("request benchmark: no PAGES frame answered");
      out.push_back(static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count()));
    }
    ret->send_end();
  }
  server.join();
  if (server_error) std::rethrow_exception(server_error);
  return out;
}

std::vector<double> handshake_times(TlsKeying keying, std::size_t n, const std::string& transport) {
  std::unique_ptr<TempPki> pki;
  std::shared_ptr<const TlsContext> cctx, sctx;
  if (keying == TlsKeying::kPsk) {
    cctx = std::make_shared<const TlsContext>(psk_options(livemig::wire::kDefaultCiphersuites, true), TlsRole::kClient);
    sctx = std::make_shared<const TlsContext>(psk_options(livemig::wire::kDefaultCiphersuites, true), TlsRole::kServer);
  } else {
    pki = std::make_unique<TempPki>("localhost");
    cctx = std::make_shared<const TlsContext>(TlsOptions::x509_dir(pki->dir(), TlsRole::kClient, "localhost"),
                                              TlsRole::kClient);
    sctx = std::make_shared<const TlsContext>(TlsOptions::x509_dir(pki->dir(), TlsRole::kServer, ""), TlsRole::kServer);
  }
  std::vector<double> out;
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    auto [a, b] = connected_pair(transport);
    TlsChannel client(cctx, a.get(), kBenchContext);
    TlsChannel server(sctx, b.get(), kBenchContext);
    handshake_both(client, server, 10000);
    out.push_back(client.handshake_seconds());
  }
  return out;
}

}  // namespace livemig::bench::tls
