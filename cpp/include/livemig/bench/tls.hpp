// Benchmark support for TLS on the wire: the raw AEAD baseline (OpenSSL EVP sealing 16 KiB
// records, as TLS does), frame streams through FrameWriter / FrameReader in plaintext and over
// TLS on a socket pair or loopback TCP, handshake timings, and a throwaway PKI for tests and
// benchmarks. Not used by migrations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "livemig/wire/tls.hpp"

namespace livemig::bench::tls {

/// Writes a throwaway PKI into the existing directory `dir` (EC P-256 keys, SHA-256 signatures),
/// laid out like QEMU's tls-creds-x509 directory plus variants for tests:
///   ca-cert.pem, ca-key.pem              a CA ("livemig test CA")
///   server-cert.pem, server-key.pem      names `server_name` and 127.0.0.1, signed by the CA
///   client-cert.pem, client-key.pem      names client.livemig.test, signed by the CA
///   expired-cert.pem, expired-key.pem    like the server's, but expired yesterday
///   rogue-cert.pem, rogue-key.pem        like the client's, signed by another CA nobody trusts
/// Throws Error naming the file it could not write.
void write_test_pki(const std::string& dir, const std::string& server_name = "localhost");

/// A fresh directory under $TMPDIR (or /tmp) holding write_test_pki's files; removed with them
/// when this goes away.
class TempPki {
 public:
  explicit TempPki(const std::string& server_name = "localhost");
  TempPki(const TempPki&) = delete;
  TempPki& operator=(const TempPki&) = delete;
  ~TempPki();
  const std::string& dir() const noexcept { return dir_; }

 private:
  std::string dir_;
};

/// What a timed loop moved.
struct Throughput {
  std::uint64_t bytes = 0;  ///< payload bytes processed
  double seconds = 0;       ///< wall time
  double bytes_per_second() const noexcept { return seconds > 0 ? static_cast<double>(bytes) / seconds : 0; }
};

/// The raw AEAD baseline: seals `total_bytes` in records of `record_bytes` with EVP
/// ("aes-128-gcm", "aes-256-gcm" or "chacha20-poly1305"), each record out of place (source to an
/// output buffer, as TLS does) with a fresh nonce, 5 bytes of AAD and a 16-byte tag, reading a
/// source of `source_bytes` round and round (64 MiB: the stream benchmarks' region, from memory
/// rather than cache). std::invalid_argument for an unknown cipher.
Throughput evp_seal_loop(const std::string& cipher, std::size_t record_bytes, std::uint64_t total_bytes,
                         std::size_t source_bytes = std::size_t{64} << 20);

/// The record-layer AEAD name for a TLS 1.3 suite: "TLS_AES_128_GCM_SHA256" -> "aes-128-gcm".
std::string evp_cipher_of_suite(const std::string& suite);

/// A frame stream benchmark's settings.
struct StreamOptions {
  bool tls = true;                      ///< TLS (PSK keying) or plaintext
  std::string transport = "unix";       ///< "unix" (socketpair) or "tcp" (loopback)
  std::string ciphersuites = livemig::wire::kDefaultCiphersuites;
  bool ktls = true;                     ///< offer the record layer to the kernel
  /// The record layer when the kernel does not take it (kDirect: livemig's; kOpenSsl: SSL_write / SSL_read).
  livemig::wire::TlsRecordLayer record_layer = livemig::wire::TlsRecordLayer::kDirect;
  std::size_t region_bytes = 64u << 20;  ///< source and destination regions (sent over and over)
  std::uint64_t total_bytes = 1u << 30;  ///< page payload bytes to move
  std::uint32_t frame_pages = 256;      ///< pages per PAGES frame (256: 1 MiB batches of 4 KiB pages)
  std::size_t batch_bytes = 4u << 20;   ///< the writer's flush size
  /// The receiver only drains the socket (no decryption, no frames): measures the sending
  /// channel's cost alone, the destination's bytes are not checked.
  bool drain_only = false;
};

/// What a frame stream benchmark measured.
struct StreamResult {
  Throughput moved;          ///< page payload bytes, and the wall time from first send to last page placed
  double sender_cpu = 0;     ///< CPU seconds of the sending thread
  double receiver_cpu = 0;   ///< CPU seconds of the receiving thread
  std::string path;          ///< "plain", or the TLS path ("userspace", "ktls", ...)
  std::string cipher;        ///< the negotiated suite (TLS)
  std::uint64_t send_calls = 0;
  std::uint64_t recv_calls = 0;
};

/// Pages from a source region through FrameWriter, a socket pair (or loopback TCP) and
/// FrameReader into a destination region (precopy's RegionReceiver), one thread each end; checks
/// the destination's bytes once at the end. Throws on any failure.
StreamResult stream_throughput(const StreamOptions& options);

/// Postcopy's fault path on the wire, `iters` times: the destination sends REQUEST for one page
/// on the return path (the main socket's other direction), the source answers with the PAGES
/// frame on the urgent socket, the destination reads it into a region. Loopback TCP, plaintext
/// or TLS (PSK, both sockets); returns each round trip in nanoseconds.
std::vector<std::uint64_t> request_round_trips(bool tls, std::size_t iters,
                                               livemig::wire::TlsRecordLayer layer = livemig::wire::TlsRecordLayer::kDirect);

/// Times `n` TLS handshakes (client side, including the server's acceptance) over fresh socket
/// pairs or loopback TCP connections; returns each in seconds. x509 uses a throwaway PKI.
std::vector<double> handshake_times(livemig::wire::TlsKeying keying, std::size_t n, const std::string& transport);

}  // namespace livemig::bench::tls
