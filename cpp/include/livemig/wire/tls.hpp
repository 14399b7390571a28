// TLS 1.3 on a channel's socket (docs/protocol.md, "Encryption"), with OpenSSL: a TlsContext holds
// one side's credentials (the shared secret, or x509 certificates) for every channel of a
// migration; a TlsChannel runs OpenSSL's handshake on one connected socket and then carries frames
// both ways: it is a FrameOutput for a FrameWriter and, through TlsInput, a FrameInput for a
// FrameReader. After the handshake the records (standard TLS 1.3, RFC 8446 section 5) are sealed
// and opened, per direction, by the kernel when it can take them (kTLS: sends stay sendmsg from
// the caller's memory), else by livemig's own record layer with OpenSSL's AEADs, straight from the
// caller's memory and straight into the reader's buffers (OpenSSL's SSL_write / SSL_read copy
// once more on each side; they remain as TlsRecordLayer::kOpenSsl, the reference). No OpenSSL type
// appears here.
#pragma once

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "livemig/wire/stream.hpp"

struct ssl_ctx_st;

namespace livemig::wire {

/// Which end of the TLS handshake a side plays: the side that connected (the source) is the client.
enum class TlsRole : std::uint8_t {
  kClient = 0,
  kServer = 1,
};

/// How a TLS context proves who it is and checks its peer.
enum class TlsKeying : std::uint8_t {
  kPsk = 0,   ///< TLS 1.3 external PSK derived from the shared secret, per channel (derive_tls_psk)
  kX509 = 1,  ///< certificates, verified both ways against a CA, with the peer's name checked
};

/// Who seals and opens the records after the handshake when the kernel (kTLS) does not.
enum class TlsRecordLayer : std::uint8_t {
  kDirect = 0,   ///< livemig's record layer on OpenSSL's AEADs: no copy beyond the AEAD's, both directions lock-free
  kOpenSsl = 1,  ///< SSL_write / SSL_read: a copy more per side, one lock for both directions (the reference)
};

/// The TLS 1.3 suites offered by default, in the server's order of preference. Both hash with
/// SHA-256, which an external PSK requires; AES-GCM runs on AES-NI, ChaCha20 wins without it.
inline constexpr const char* kDefaultCiphersuites = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
/// Bytes of the PSK each channel derives from the shared secret (an HKDF-SHA256 output).
inline constexpr std::size_t kTlsPskBytes = 32;
/// Largest PSK context (HKDF info) accepted.
inline constexpr std::size_t kMaxPskContext = 1024;
/// Bytes of the handshake transcript's digest each side sends inside the tunnel (SHA-256).
inline constexpr std::size_t kTranscriptDigestBytes = 32;

/// One side's TLS settings.
struct TlsOptions {
  TlsKeying keying = TlsKeying::kPsk;
  /// PSK: the shared secret (at least 16 bytes); never used as a key itself.
  std::vector<std::uint8_t> secret;
  /// x509: this side's certificate chain (PEM), its private key (PEM) and the CA certificates
  /// (PEM) the peer's certificate must chain to.
  std::string cert_file;
  std::string key_file;
  std::string ca_file;
  /// x509: the DNS name or IP address the peer's certificate must carry. Required on the client
  /// (the destination's address or name); optional on the server (then any certificate the CA
  /// signed is accepted).
  std::string peer_name;
  /// TLS 1.3 suites, OpenSSL names separated by ':' (with PSK keying, SHA-256 suites only).
  std::string ciphersuites = kDefaultCiphersuites;
  /// Hand the record layer to the kernel after the handshake when it can take it.
  bool ktls = true;
  /// The record layer when the kernel does not take a direction.
  TlsRecordLayer record_layer = TlsRecordLayer::kDirect;
  /// Direct record layer: records sealed under one key before it sends a KeyUpdate and moves to
  /// the next (RFC 8446 section 5.5 bounds AES-GCM at 2^24.5 full records per key); 0: never.
  std::uint64_t key_update_records = std::uint64_t{1} << 24;

  /// x509 options from a directory laid out like QEMU's tls-creds-x509 `dir`: ca-cert.pem, and
  /// server-cert.pem / server-key.pem (server) or client-cert.pem / client-key.pem (client).
  /// std::invalid_argument naming a file that is missing.
  static TlsOptions x509_dir(const std::string& dir, TlsRole role, std::string peer_name);
};

/// Derives a channel's TLS 1.3 external PSK from the shared secret (docs/protocol.md,
/// "Encryption"): HKDF-SHA256 with salt "livemig-v1 tls13 psk", the secret as input keying
/// material, and `context` (both HELLO bodies: the session id and both nonces) as info.
/// std::invalid_argument for an empty context or one past kMaxPskContext bytes.
std::array<std::uint8_t, kTlsPskBytes> derive_tls_psk(std::span<const std::uint8_t> secret,
                                                      std::span<const std::uint8_t> context);

/// One side's loaded TLS credentials and settings (an SSL_CTX), shared by all its channels.
/// Immutable once made; thread-safe.
class TlsContext {
 public:
  /// Loads and checks everything (files, key against certificate, suites). std::invalid_argument
  /// naming what is wrong (a file that cannot be read, a key that does not match, a bad suite).
  TlsContext(TlsOptions options, TlsRole role);
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;
  ~TlsContext();

  /// Client (the source) or server (the destination).
  TlsRole role() const noexcept { return role_; }
  /// The settings it was made with (the secret is wiped when the context goes).
  const TlsOptions& options() const noexcept { return options_; }
  /// The OpenSSL SSL_CTX (for tls.cpp; no caller may change it).
  ssl_ctx_st* native() const noexcept { return ctx_; }

 private:
  TlsOptions options_;
  TlsRole role_;
  ssl_ctx_st* ctx_ = nullptr;
};

/// TLS 1.3 on one connected stream socket (not owned: it must stay open while the channel
/// lives). Make it, call handshake() once, then write through it (as a FrameWriter's output: one
/// writer per channel) and read through it (TlsInput: one reader per channel), each from its own
/// thread at the same time: the two directions share no lock (with TlsRecordLayer::kOpenSsl they
/// share OpenSSL's object under a FIFO lock held for one record, never while waiting for the
/// socket). The socket is used with MSG_DONTWAIT per call and never raises SIGPIPE; its own flags
/// stay as they were. Destroy the channel only once no thread uses it.
///
/// Errors, from the handshake and from every read and write: AuthenticationError when the peer's
/// key or certificate is wrong (or it refused ours), ProtocolError when it does not speak TLS 1.3
/// (a plaintext peer) or a record fails authentication (altered in transit), ConnectionLost when
/// the peer closes, resets or stays silent past the timeout. After an error the channel refuses
/// every call with the same error.
class TlsChannel final : public FrameOutput {
 public:
  /// A channel on `fd` (a connected, blocking stream socket; not owned). `psk_context`: for PSK
  /// keying, the bytes both sides derive this channel's key from (both HELLO bodies); required
  /// then, ignored with x509. std::invalid_argument for a bad fd or context.
  TlsChannel(std::shared_ptr<const TlsContext> context, int fd, std::span<const std::uint8_t> psk_context = {});
  TlsChannel(const TlsChannel&) = delete;
  TlsChannel& operator=(const TlsChannel&) = delete;
  ~TlsChannel() override;

  /// Runs the TLS handshake within `timeout_ms` (> 0) in all, then (client) waits for the
  /// server's confirmation that it accepted us, so both sides learn a refusal here. With a
  /// `transcript` (what this side sent and received of the plaintext handshake before TLS), both
  /// sides then exchange its SHA-256 inside the tunnel and refuse (ProtocolError, on both sides) a
  /// peer that saw other bytes, so nothing of the plaintext handshake can be changed in transit;
  /// both sides must pass one or neither. Once only (std::logic_error otherwise). The socket is
  /// non-blocking meanwhile (OpenSSL's socket BIO, which kTLS needs, has no per-call flag); its
  /// flags are restored before this returns.
  void handshake(int timeout_ms, std::span<const std::uint8_t> transcript = {});

  /// Writes the iovecs' `total` bytes as TLS records of up to 16 KiB (FrameOutput), sealed
  /// straight from the caller's memory into a 256 KiB buffer sent per 16 records; kTLS: sendmsg
  /// straight from the caller's memory. Concurrent calls go out one whole batch after the other.
  /// Returns the send calls.
  std::uint64_t write_all(struct iovec* iov, std::size_t iovcnt, std::size_t total, int timeout_ms) override;
  /// Reads up to `n` bytes into `p`: at least one byte, or 0 when the stream ended (close_notify,
  /// or the peer closed the socket). One caller at a time. A record that fits in [p, p + n) is
  /// opened straight into it; a record that fails authentication is wiped from it before the
  /// ProtocolError, so only verified bytes are ever left there.
  std::size_t read_some(std::uint8_t* p, std::size_t n, int timeout_ms);
  /// Bounds what livemig's record layer gathers before a send and takes in per recv to about
  /// `bytes` (one record at least, 256 KiB, the default, at most), so that little queues in the
  /// channel ahead of what follows (postcopy: a page the background push already took, which a
  /// fault waits for). The kernel's and OpenSSL's record layers keep their own. Any thread.
  void bound_batches(std::size_t bytes) noexcept;
  /// `n` bytes of keying material exported from this session (RFC 8446 section 7.5) for `label`
  /// and `context`: the same on both ends, computable by nobody else. After the handshake; any
  /// thread. std::logic_error before the handshake.
  std::vector<std::uint8_t> export_keying_material(const std::string& label, std::span<const std::uint8_t> context,
                                                   std::size_t n) const;
  /// Sends TLS close_notify (best effort: after a write in progress, waiting at most 1 s for room
  /// in the socket): the peer's reads then end cleanly. Any thread.
  void close_notify() noexcept;
  /// Shuts the socket down both ways (any thread): a thread waiting in read or write wakes.
  void shutdown() noexcept;

  int fd() const noexcept;
  /// True once handshake() succeeded.
  bool established() const noexcept;
  /// Whether the kernel took the record layer, per direction (after the handshake).
  bool ktls_send() const noexcept;
  bool ktls_recv() const noexcept;
  /// Which record layer runs: "ktls" (the kernel, both directions), "userspace" (livemig's
  /// direct record layer), "openssl" (SSL_write / SSL_read), or "<send>+<recv>" when the
  /// directions differ ("ktls+userspace"); "none" before the handshake.
  std::string path() const;
  /// The negotiated suite ("TLS_AES_128_GCM_SHA256"), after the handshake.
  const std::string& cipher() const noexcept;
  /// The peer certificate's subject (x509), or "psk:livemig-v1" (PSK keying), after the handshake.
  const std::string& peer_identity() const noexcept;
  /// How long handshake() took, in seconds (0 before).
  double handshake_seconds() const noexcept;
  /// Send and receive system calls on the socket after the handshake.
  std::uint64_t send_calls() const noexcept;
  std::uint64_t recv_calls() const noexcept;
  /// KeyUpdates this side sent and received (direct record layer).
  std::uint64_t key_updates_sent() const noexcept;
  std::uint64_t key_updates_received() const noexcept;

  struct State;  // tls.cpp

 private:
  std::unique_ptr<State> st_;
};

/// A FrameReader's input from a TLS channel (one per reading thread). A peer silent for
/// timeout_ms (<= 0: no limit) is ConnectionLost.
class TlsInput final : public FrameInput {
 public:
  /// Reads `channel` (which must outlive this input).
  TlsInput(TlsChannel& channel, int timeout_ms) : channel_(channel), timeout_ms_(timeout_ms) {}
  std::size_t read_full(struct iovec* iov, int iovcnt) override;
  [[noreturn]] void truncated(const std::string& what, std::size_t got, std::size_t want) override;

 private:
  TlsChannel& channel_;
  int timeout_ms_;
};

/// An InputOpener for sessions: each of these channels' sockets is read through its channel; an
/// fd that is none of theirs is refused (ProtocolError), never read in clear.
InputOpener tls_input_opener(std::vector<std::shared_ptr<TlsChannel>> channels);

}  // namespace livemig::wire
