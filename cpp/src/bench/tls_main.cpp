// livemig_tls_bench: encryption's cost on this machine, each figure beside its same-run baseline
// (docs/performance.md, "Encryption"):
//   - the bare EVP AEAD rate over 16 KiB records (AES-128-GCM, ChaCha20-Poly1305);
//   - frame streams of 1 MiB page batches, plaintext and TLS alternated, on a socketpair and on
//     loopback TCP: wall rate and each end's CPU; the sender's extra CPU per byte against EVP's;
//   - TLS handshake times, PSK and x509.
//
//   livemig_tls_bench [--rounds N] [--gib G] [--handshakes N]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "livemig/bench/tls.hpp"

using namespace livemig::bench::tls;
using livemig::wire::TlsKeying;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double pct(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 5;
  double gib = 1;
  int handshakes = 50;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rounds") == 0) rounds = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--gib") == 0) gib = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--handshakes") == 0) handshakes = std::atoi(argv[i + 1]);
  }
  const auto total = static_cast<std::uint64_t>(gib * static_cast<double>(1u << 30));

  std::printf("bare EVP seal, 16 KiB records, %.1f GiB, median of %d:\n", gib, rounds);
  for (const char* c : {"aes-128-gcm", "chacha20-poly1305"}) {
    std::vector<double> r;
    for (int i = 0; i < rounds; ++i) r.push_back(evp_seal_loop(c, 16384, total).bytes_per_second());
    std::printf("  %-18s %6.2f GB/s\n", c, median(r) / 1e9);
  }

  for (const char* transport : {"unix", "tcp"}) {
    for (const char* suite : {"TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}) {
      std::vector<double> plain_rate, tls_rate, plain_scpu, tls_scpu, plain_rcpu, tls_rcpu, evp_s;
      std::string path, cipher;
      for (int i = 0; i < rounds; ++i) {
        StreamOptions o;
        o.transport = transport;
        o.total_bytes = total;
        o.tls = false;
        const StreamResult p = stream_throughput(o);
        o.tls = true;
        o.ciphersuites = suite;
        const StreamResult t = stream_throughput(o);
        // The bare AEAD over the same bytes, in the same round.
        const Throughput e = evp_seal_loop(evp_cipher_of_suite(t.cipher), 16384, t.moved.bytes);
        plain_rate.push_back(p.moved.bytes_per_second());
        tls_rate.push_back(t.moved.bytes_per_second());
        plain_scpu.push_back(p.sender_cpu / static_cast<double>(p.moved.bytes) * 1e9);
        tls_scpu.push_back(t.sender_cpu / static_cast<double>(t.moved.bytes) * 1e9);
        plain_rcpu.push_back(p.receiver_cpu / static_cast<double>(p.moved.bytes) * 1e9);
        tls_rcpu.push_back(t.receiver_cpu / static_cast<double>(t.moved.bytes) * 1e9);
        evp_s.push_back(e.seconds / static_cast<double>(e.bytes) * 1e9);
        path = t.path;
        cipher = t.cipher;
      }
      const double extra = median(tls_scpu) - median(plain_scpu);
      std::printf("\n%s, 1 MiB page batches, %.1f GiB, %s (%s record layer), median of %d:\n", transport, gib,
                  cipher.c_str(), path.c_str(), rounds);
      std::printf("  plaintext  %6.2f GB/s   sender %.3f ns/B  receiver %.3f ns/B\n", median(plain_rate) / 1e9,
                  median(plain_scpu), median(plain_rcpu));
      std::printf("  TLS        %6.2f GB/s   sender %.3f ns/B  receiver %.3f ns/B   (%.0f%% of plaintext)\n",
                  median(tls_rate) / 1e9, median(tls_scpu), median(tls_rcpu),
                  100.0 * median(tls_rate) / median(plain_rate));
      std::printf("  sender's encryption cost %.3f ns/B vs bare EVP seal %.3f ns/B: %.2fx\n", extra, median(evp_s),
                  extra / median(evp_s));
    }
  }

  std::printf("\nTLS handshake on loopback TCP (client side, with the server's acceptance), %d each:\n", handshakes);
  for (const auto keying : {TlsKeying::kPsk, TlsKeying::kX509}) {
    const auto t = handshake_times(keying, static_cast<std::size_t>(handshakes), "tcp");
    std::printf("  %-4s  p50 %.3f ms  p90 %.3f ms\n", keying == TlsKeying::kPsk ? "psk" : "x509", median(t) * 1e3,
                pct(t, 0.9) * 1e3);
  }
  return 0;
}
