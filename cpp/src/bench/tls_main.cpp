// livemig_tls_bench: encryption's cost on this machine, each figure beside its same-run baseline
// (docs/performance.md, "Encryption"). Plaintext and TLS alternate within every round; medians.
//   1. the bare EVP AEAD rate over 16 KiB records (AES-128-GCM, ChaCha20-Poly1305);
//   2. the sending channel's encryption cost: the sender's CPU per byte against a receiver that
//      only drains the socket, TLS minus plaintext, beside the bare EVP seal of the same bytes
//      (a 64 MiB source, as the sender's region). Sections 1 and 2 run on one CPU: on a shared
//      2-vCPU guest a thread's CPU time stretches with whatever runs beside it, so the sender,
//      its receiver and the EVP loop take turns instead;
//   3. end to end, 1 MiB page batches through FrameWriter and FrameReader into a region, both
//      ends in this process: rate and each end's CPU per byte;
//   4. postcopy's fault path on the wire: REQUEST out, one PAGES frame back on the urgent
//      socket, plaintext and TLS alternated, loopback TCP: p50 and p90;
//   5. TLS handshake times, PSK and x509, on loopback TCP.
// Record layers: "userspace" is livemig's (the default), "openssl" SSL_write / SSL_read.
//
//   livemig_tls_bench [--rounds N] [--gib G] [--handshakes N] [--suite S]
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "livemig/bench/tls.hpp"

using namespace livemig::bench::tls;
using livemig::wire::TlsKeying;
using livemig::wire::TlsRecordLayer;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double pct(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

// Pins this thread (and the threads it starts from now on) to its current CPU; returns the
// previous mask.
cpu_set_t pin_here() {
  cpu_set_t old;
  CPU_ZERO(&old);
  sched_getaffinity(0, sizeof old, &old);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(sched_getcpu(), &one);
  sched_setaffinity(0, sizeof one, &one);
  return old;
}

double ns_per_byte(double seconds, std::uint64_t bytes) { return seconds / static_cast<double>(bytes) * 1e9; }

// One configuration's samples over the rounds.
struct Samples {
  std::vector<double> rate, sender, receiver;
  std::string path, cipher;
  void add(const StreamResult& r) {
    rate.push_back(r.moved.bytes_per_second() / 1e9);
    sender.push_back(ns_per_byte(r.sender_cpu, r.moved.bytes));
    receiver.push_back(ns_per_byte(r.receiver_cpu, r.moved.bytes));
    path = r.path;
    cipher = r.cipher;
  }
};

StreamOptions options(const char* transport, std::uint64_t total, bool tls, TlsRecordLayer layer,
                      const std::string& suite, bool drain) {
  StreamOptions o;
  o.transport = transport;
  o.total_bytes = total;
  o.tls = tls;
  o.record_layer = layer;
  o.ciphersuites = suite;
  o.drain_only = drain;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 5;
  double gib = 1;
  int handshakes = 50;
  std::string suite = "TLS_AES_128_GCM_SHA256";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--gib") == 0) gib = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--handshakes") == 0) handshakes = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--suite") == 0) suite = argv[i + 1];
  }
  const auto total = static_cast<std::uint64_t>(gib * static_cast<double>(std::uint64_t{1} << 30));
  const std::string aead = evp_cipher_of_suite(suite);
  std::printf("%s, %.2f GiB per sample, median of %d rounds\n", suite.c_str(), gib, rounds);
  const cpu_set_t all = pin_here();

  std::printf("\n1. bare EVP seal, 16 KiB records, 64 MiB source, one CPU:\n");
  for (const char* c : {"aes-128-gcm", "chacha20-poly1305"}) {
    std::vector<double> r;
    for (int i = 0; i < rounds; ++i) r.push_back(evp_seal_loop(c, 16384, total).bytes_per_second() / 1e9);
    std::printf("   %-18s %6.2f GB/s  (%.3f ns/B)\n", c, median(r), 1 / median(r));
  }

  const TlsRecordLayer layers[] = {TlsRecordLayer::kDirect, TlsRecordLayer::kOpenSsl};
  for (const char* transport : {"unix", "tcp"}) {
    std::printf("\n2. %s, one CPU: the sender's CPU against a draining receiver (ns/B)\n", transport);
    std::printf("   %-10s %8s %10s %12s %8s\n", "", "sender", "extra", "EVP, same B", "ratio");
    Samples plain, tls[2];
    std::vector<double> evp, extra[2];
    for (int i = 0; i < rounds; ++i) {
      const StreamResult p = stream_throughput(options(transport, total, false, layers[0], suite, true));
      plain.add(p);
      for (int l = 0; l < 2; ++l) {
        const StreamResult t = stream_throughput(options(transport, total, true, layers[l], suite, true));
        tls[l].add(t);
        extra[l].push_back(ns_per_byte(t.sender_cpu, t.moved.bytes) - ns_per_byte(p.sender_cpu, p.moved.bytes));
      }
      const Throughput e = evp_seal_loop(aead, 16384, total);
      evp.push_back(ns_per_byte(e.seconds, e.bytes));
    }
    std::printf("   %-10s %8.3f\n", "plaintext", median(plain.sender));
    for (int l = 0; l < 2; ++l)
      std::printf("   %-10s %8.3f %10.3f %12.3f %7.2fx\n", tls[l].path.c_str(), median(tls[l].sender), median(extra[l]),
                  median(evp), median(extra[l]) / median(evp));
  }
  sched_setaffinity(0, sizeof all, &all);

  for (const char* transport : {"unix", "tcp"}) {
    std::printf("\n3. %s, both CPUs: 1 MiB page batches into a region, both ends in this process\n", transport);
    std::printf("   %-10s %8s %10s %10s %8s\n", "", "GB/s", "sender", "receiver", "of plain");
    Samples e2e_plain, e2e[2];
    for (int i = 0; i < rounds; ++i) {
      e2e_plain.add(stream_throughput(options(transport, total, false, layers[0], suite, false)));
      for (int l = 0; l < 2; ++l) e2e[l].add(stream_throughput(options(transport, total, true, layers[l], suite, false)));
    }
    std::printf("   %-10s %8.2f %10.3f %10.3f\n", "plaintext", median(e2e_plain.rate), median(e2e_plain.sender),
                median(e2e_plain.receiver));
    for (int l = 0; l < 2; ++l)
      std::printf("   %-10s %8.2f %10.3f %10.3f %7.0f%%\n", e2e[l].path.c_str(), median(e2e[l].rate),
                  median(e2e[l].sender), median(e2e[l].receiver), 100 * median(e2e[l].rate) / median(e2e_plain.rate));
  }

  std::printf("\n4. a page request and its page back, loopback TCP, 2000 round trips per round (us):\n");
  {
    std::vector<double> p50[3], p90[3];
    const char* names[3] = {"plaintext", "userspace", "openssl"};
    for (int i = 0; i < rounds; ++i)
      for (int k = 0; k < 3; ++k) {
        const auto ns = request_round_trips(k > 0, 2000, k == 2 ? TlsRecordLayer::kOpenSsl : TlsRecordLayer::kDirect);
        std::vector<double> us(ns.begin(), ns.end());
        for (double& u : us) u /= 1000;
        p50[k].push_back(median(us));
        p90[k].push_back(pct(us, 0.9));
      }
    for (int k = 0; k < 3; ++k)
      std::printf("   %-10s p50 %6.1f   p90 %6.1f   (p50 %+.1f against plaintext)\n", names[k], median(p50[k]),
                  median(p90[k]), median(p50[k]) - median(p50[0]));
  }

  std::printf("\n5. TLS handshake on loopback TCP (client side, with the server's acceptance), %d each:\n",
              handshakes);
  for (const auto keying : {TlsKeying::kPsk, TlsKeying::kX509}) {
    const auto t = handshake_times(keying, static_cast<std::size_t>(handshakes), "tcp");
    std::printf("   %-4s  p50 %.3f ms  p90 %.3f ms\n", keying == TlsKeying::kPsk ? "psk" : "x509", median(t) * 1e3,
                pct(t, 0.9) * 1e3);
  }
  return 0;
}
