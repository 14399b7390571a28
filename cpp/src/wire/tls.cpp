// TLS 1.3 channels on OpenSSL 3 (tls.hpp; docs/protocol.md, "Encryption").
//
// OpenSSL runs the handshake. Afterwards each direction has one engine:
// - kernel (kTLS): OpenSSL handed the keys to the kernel; plaintext goes out with sendmsg and
//   comes in with recvmsg, control records (alerts) flagged by a cmsg;
// - direct: livemig's TLS 1.3 record layer (tls_record.hpp), keyed with the application traffic
//   secrets OpenSSL reports through its key log callback: records are sealed from the caller's
//   memory into a 256 KiB buffer sent in one call, and opened from a 256 KiB read-ahead buffer
//   straight into the reader's destination;
// - openssl: SSL_write / SSL_read through a BIO of ours; both directions then share the SSL
//   object under a FIFO lock held for one record at a time.
// Every socket call is non-blocking by flag (MSG_DONTWAIT) and sends never raise SIGPIPE
// (MSG_NOSIGNAL); waits are poll()s with no lock held.
#include "livemig/wire/tls.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/tls.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>

#include "livemig/base/errors.hpp"
#include "tls_record.hpp"

namespace livemig::wire {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kRecord = tls13::kMaxPlain;  // content bytes per record
constexpr std::size_t kReadAhead = 256 * 1024;      // bytes a recv may take in (up to 16 records)
constexpr std::size_t kOutFlush = 256 * 1024;       // sealed bytes per send (16 records)
constexpr std::size_t kMaxPieces = 64;              // iovec pieces in one record
constexpr std::size_t kKernelSlice = 256 * 1024;    // kTLS: bytes per sendmsg
constexpr std::uint8_t kAccepted = 0x01;            // the server's confirmation: its first byte
constexpr char kPskIdentity[] = "livemig-v1";
constexpr char kPskSalt[] = "livemig-v1 tls13 psk";
constexpr unsigned char kAes128GcmSha256[] = {0x13, 0x01};
constexpr char kTranscriptLabel[] = "livemig-v1 handshake transcript";  // hashed with its NUL

enum class Engine : std::uint8_t { kNone, kKernel, kDirect, kOpenSsl };

std::string seconds(int ms) { return std::to_string(ms / 1000.0).substr(0, 6) + " s"; }

bool lost_errno(int err) {
  return err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNABORTED || err == ETIMEDOUT;
}

// Every error in this thread's OpenSSL queue, "; "-joined (and the queue emptied).
std::string drain_errors() {
  std::string out;
  char buf[256];
  while (const unsigned long e = ERR_get_error()) {
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "no OpenSSL error recorded" : out;
}

// A ticket lock: FIFO, so the thread that wants OpenSSL's object next is never starved by one
// that keeps taking it (a writer sealing record after record while a request waits to be read).
class FairLock {
 public:
  void lock() noexcept {
    const std::uint32_t ticket = next_.fetch_add(1, std::memory_order_relaxed);
    for (int spin = 0;; ++spin) {
      const std::uint32_t now = serving_.load(std::memory_order_acquire);
      if (now == ticket) return;
      // A turn lasts one record (microseconds): spin a little before sleeping.
      if (spin < 256) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        continue;
      }
      serving_.wait(now, std::memory_order_acquire);
    }
  }
  void unlock() noexcept {
    serving_.fetch_add(1, std::memory_order_release);
    serving_.notify_all();
  }

 private:
  std::atomic<std::uint32_t> next_{0};
  std::atomic<std::uint32_t> serving_{0};
};

}  // namespace

/// The openssl engine's socket under OpenSSL (and the handshake's when kTLS is off): every call
/// non-blocking by flag, never SIGPIPE. Used only under the channel's lock or by the handshake.
struct TlsSocketIo {
  int fd = -1;
  int last_errno = 0;  // errno of the last failed send / recv (0: none, or end of stream)
  bool eof = false;    // recv returned 0
  std::atomic<std::uint64_t>* sends = nullptr;
  std::atomic<std::uint64_t>* recvs = nullptr;
};

struct TlsChannel::State {
  std::shared_ptr<const TlsContext> context;
  int fd = -1;
  SSL* ssl = nullptr;
  std::unique_ptr<TlsSocketIo> io;
  bool socket_bio = false;  // OpenSSL's own socket BIO ran the handshake (kTLS possible)
  std::array<std::uint8_t, kTlsPskBytes> psk{};
  std::size_t psk_len = 0;
  // The application traffic secrets, from the key log callback; wiped once the engines are keyed.
  std::array<std::uint8_t, 64> client_secret{};
  std::array<std::uint8_t, 64> server_secret{};
  std::size_t client_secret_len = 0;
  std::size_t server_secret_len = 0;

  bool attempted = false;
  bool established = false;  // set by handshake() before any other thread may use the channel
  Engine tx = Engine::kNone;
  Engine rx = Engine::kNone;
  double handshake_seconds = 0;
  std::string cipher;
  std::string peer_identity;
  std::uint64_t key_update_records = 0;
  std::atomic<std::uint64_t> sends{0};
  std::atomic<std::uint64_t> recvs{0};
  std::atomic<std::uint64_t> updates_sent{0};
  std::atomic<std::uint64_t> updates_received{0};

  // The first fatal error, rethrown to every later call (both directions).
  std::mutex fail_mu;
  std::atomic<bool> failed{false};
  std::exception_ptr failure;  // guarded by fail_mu

  // openssl engine: OpenSSL's object is shared by both directions under `lock`.
  FairLock lock;
  bool sigpipe_guard = false;  // OpenSSL's socket BIO still writes (kTLS send): no MSG_NOSIGNAL there
  std::unique_ptr<std::uint8_t[]> stage;  // gathers small pieces into one record
  std::size_t stage_len = 0;

  // Sending: one batch at a time (write_mu, every engine), close_notify ordered against it.
  std::mutex write_mu;
  std::unique_ptr<tls13::Protection> seal;
  std::unique_ptr<std::uint8_t[]> out;
  std::size_t out_len = 0;
  std::uint64_t since_update = 0;
  // Sealed bytes gathered before a send, and bytes a recv may take in (bound_batches; relaxed: a
  // bound that lands a call late only moves one batch's size).
  std::atomic<std::size_t> out_flush{kOutFlush};
  std::atomic<std::size_t> read_ahead{kReadAhead};
  std::atomic<bool> update_requested{false};  // the peer asked for a KeyUpdate back

  // direct / kernel receive: one reader at a time.
  std::unique_ptr<tls13::Protection> open;
  std::unique_ptr<std::uint8_t[]> in;  // read-ahead: whole records and a partial one
  std::size_t in_pos = 0;
  std::size_t in_len = 0;
  std::unique_ptr<std::uint8_t[]> plain;  // a record's plaintext that straddles two reads
  std::size_t plain_pos = 0;
  std::size_t plain_len = 0;
  bool rx_eof = false;

  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  ~State() {
    SSL_free(ssl);
    wipe_secrets();
    OPENSSL_cleanse(psk.data(), psk.size());
  }
  void wipe_secrets() noexcept {
    OPENSSL_cleanse(client_secret.data(), client_secret.size());
    OPENSSL_cleanse(server_secret.data(), server_secret.size());
  }
  // Records the first failure (kept for every later call) and throws it.
  [[noreturn]] void fail(std::exception_ptr e) {
    std::exception_ptr first;
    {
      std::lock_guard g(fail_mu);
      if (!failure) failure = std::move(e);
      first = failure;
    }
    failed.store(true, std::memory_order_release);
    std::rethrow_exception(first);
  }
  // Throws the recorded failure, if any.
  void check() {
    if (!failed.load(std::memory_order_acquire)) return;
    std::exception_ptr f;
    {
      std::lock_guard g(fail_mu);
      f = failure;
    }
    std::rethrow_exception(f);
  }
};

namespace {

// ---- the openssl engine's socket BIO ----

int io_write(BIO* b, const char* data, std::size_t len, std::size_t* written) {
  auto* io = static_cast<TlsSocketIo*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  for (;;) {
    io->sends->fetch_add(1, std::memory_order_relaxed);
    const ssize_t r = ::send(io->fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) {
      *written = static_cast<std::size_t>(r);
      return 1;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      BIO_set_retry_write(b);
      return 0;
    }
    io->last_errno = errno;
    return 0;
  }
}

int io_read(BIO* b, char* data, std::size_t len, std::size_t* got) {
  auto* io = static_cast<TlsSocketIo*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  for (;;) {
    io->recvs->fetch_add(1, std::memory_order_relaxed);
    const ssize_t r = ::recv(io->fd, data, len, MSG_DONTWAIT);
    if (r > 0) {
      *got = static_cast<std::size_t>(r);
      return 1;
    }
    if (r == 0) {
      io->eof = true;
      *got = 0;
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      BIO_set_retry_read(b);
      return 0;
    }
    io->last_errno = errno;
    return 0;
  }
}

long io_ctrl(BIO* b, int cmd, long, void*) {
  const auto* io = static_cast<const TlsSocketIo*>(BIO_get_data(b));
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;  // nothing is buffered here
    case BIO_CTRL_EOF:
      // OpenSSL asks after a read returned nothing: an end of stream, not a failure.
      return io != nullptr && io->eof ? 1 : 0;
    default:
      return 0;  // notably BIO_CTRL_GET_KTLS_*: this BIO never does kTLS
  }
}

int io_create(BIO* b) {
  BIO_set_init(b, 1);
  return 1;
}

BIO_METHOD* io_method() {
  // One method table for the process: every BIO made from it points at it.
  static const std::unique_ptr<BIO_METHOD, decltype(&BIO_meth_free)> method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "livemig socket");
    if (m == nullptr || BIO_meth_set_write_ex(m, io_write) != 1 || BIO_meth_set_read_ex(m, io_read) != 1 ||
        BIO_meth_set_ctrl(m, io_ctrl) != 1 || BIO_meth_set_create(m, io_create) != 1)
      throw Error("TLS: cannot make the socket BIO method: " + drain_errors());
    return std::unique_ptr<BIO_METHOD, decltype(&BIO_meth_free)>(m, &BIO_meth_free);
  }();
  return method.get();
}

BIO* new_io_bio(TlsSocketIo* io) {
  BIO* b = BIO_new(io_method());
  if (b == nullptr) throw Error("TLS: BIO_new failed: " + drain_errors());
  BIO_set_data(b, io);
  return b;
}

// ---- waiting, signals, flags ----

// Waits until fd is ready for `events` (or has an error or hangup the next call reports); false
// when `timeout_ms` (<= 0: no limit) passed first.
bool wait_fd(int fd, short events, int timeout_ms) {
  const auto end = Clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int left = -1;
    if (timeout_ms > 0) {
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(end - Clock::now()).count();
      if (us <= 0) return false;
      left = static_cast<int>((us + 999) / 1000);
    }
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, left);
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) throw_errno("poll", "TLS socket fd " + std::to_string(fd));
  }
}

int ms_until(Clock::time_point deadline) {
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now()).count();
  return us <= 0 ? 0 : static_cast<int>((us + 999) / 1000);
}

// Waits for the socket; past the timeout, ConnectionLost naming the step.
void wait_or_lost(int fd, short events, int timeout_ms, const std::string& where) {
  if (wait_fd(fd, events, timeout_ms)) return;
  throw ConnectionLost(where + (events == POLLOUT ? ": the peer read nothing for " : ": the peer was silent for ") +
                       seconds(timeout_ms) + " (timeout)");
}

// OpenSSL's own socket BIO (the one that can hand keys to the kernel) writes with write(): a
// peer that vanished would raise SIGPIPE. While a guard lives, SIGPIPE is blocked in this thread
// and one it caused is discarded (as libpq does).
class SigpipeGuard {
 public:
  explicit SigpipeGuard(bool on) : on_(on) {
    if (!on_) return;
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;
  ~SigpipeGuard() {
    if (!on_) return;
    if (!was_pending_) {
      const timespec zero{};
      while (sigtimedwait(&pipe_, nullptr, &zero) > 0) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  bool on_;
  bool was_pending_ = false;
  sigset_t pipe_{};
  sigset_t old_{};
};

// Makes a socket non-blocking for a scope, then restores its flags.
class NonBlocking {
 public:
  explicit NonBlocking(int fd) : fd_(fd), flags_(::fcntl(fd, F_GETFL)) {
    if (flags_ < 0) throw_errno("fcntl", "F_GETFL on TLS socket fd " + std::to_string(fd));
    if ((flags_ & O_NONBLOCK) == 0 && ::fcntl(fd, F_SETFL, flags_ | O_NONBLOCK) != 0)
      throw_errno("fcntl", "O_NONBLOCK on TLS socket fd " + std::to_string(fd));
  }
  NonBlocking(const NonBlocking&) = delete;
  NonBlocking& operator=(const NonBlocking&) = delete;
  ~NonBlocking() { ::fcntl(fd_, F_SETFL, flags_); }

 private:
  int fd_;
  int flags_;
};

// ---- errors ----

enum class Fault { kAuth, kProtocol, kLost };

std::exception_ptr fault(Fault f, const std::string& msg) {
  switch (f) {
    case Fault::kAuth:
      return std::make_exception_ptr(AuthenticationError(msg));
    case Fault::kLost:
      return std::make_exception_ptr(ConnectionLost(msg));
    case Fault::kProtocol:
      break;
  }
  return std::make_exception_ptr(ProtocolError(msg));
}

// The SSL library's error in the queue (where OpenSSL records the reason), else the newest of
// any library; 0 when the queue is empty. Leaves the queue as it is.
unsigned long first_ssl_error() {
  const unsigned long first = ERR_peek_error();
  const unsigned long last = ERR_peek_last_error();
  if (first != 0 && ERR_GET_LIB(first) == ERR_LIB_SSL) return first;
  return last;
}

bool ended_without_close_notify(int ssl_err, int sys_err) {
  if (ssl_err == SSL_ERROR_SYSCALL) return sys_err == 0;
  if (ssl_err != SSL_ERROR_SSL) return false;
  const unsigned long e = first_ssl_error();
  return ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING;
}

// What a failed SSL call means, as the livemig error to raise: `where` names the step ("TLS
// handshake", "TLS recv", "TLS send"). Consumes the thread's OpenSSL error queue.
std::exception_ptr tls_failure(SSL* ssl, int ssl_err, int sys_err, const std::string& where, bool in_handshake,
                               const TlsOptions& options) {
  const std::string& peer_name = options.peer_name;
  const bool psk = options.keying == TlsKeying::kPsk;
  if (ssl_err == SSL_ERROR_ZERO_RETURN) {
    ERR_clear_error();
    return fault(Fault::kLost, where + ": the peer closed the TLS session");
  }
  if (ssl_err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
    if (sys_err == 0) return fault(Fault::kLost, where + ": the peer closed the connection");
    if (lost_errno(sys_err))
      return fault(Fault::kLost, where + ": connection lost (" + std::string(std::strerror(sys_err)) + ")");
    return std::make_exception_ptr(KernelError(sys_err, where, std::strerror(sys_err)));
  }
  const unsigned long e = first_ssl_error();
  const int reason = ERR_GET_LIB(e) == ERR_LIB_SSL ? ERR_GET_REASON(e) : 0;
  const char* r = e != 0 ? ERR_reason_error_string(e) : nullptr;
  const std::string text = r != nullptr ? r : drain_errors();
  ERR_clear_error();
  switch (reason) {
    case SSL_R_UNEXPECTED_EOF_WHILE_READING:
      return fault(Fault::kLost, where + ": the peer closed the connection");
    case SSL_R_PROTOCOL_IS_SHUTDOWN:
      return fault(Fault::kLost, where + ": the TLS session is closed");
    case SSL_R_BINDER_DOES_NOT_VERIFY:
      return fault(Fault::kAuth, where + ": the peer's key is not ours (PSK binder does not verify): a different "
                                         "shared secret, or HELLO messages altered in transit");
    case SSL_R_SSLV3_ALERT_ILLEGAL_PARAMETER:
      // OpenSSL's answer to a PSK binder that does not verify; otherwise a malformed handshake.
      if (!(in_handshake && psk)) return fault(Fault::kProtocol, where + ": " + text);
      [[fallthrough]];
    case SSL_R_TLSV1_ALERT_DECRYPT_ERROR:
      return fault(Fault::kAuth, where + ": the peer refused our key (" + text +
                                     "): a different shared secret, or HELLO messages altered in transit");
    case SSL_R_CERTIFICATE_VERIFY_FAILED: {
      const long v = SSL_get_verify_result(ssl);
      std::string msg = where + ": the peer's certificate failed verification: " + X509_verify_cert_error_string(v);
      if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH)
        msg += " (it does not name '" + peer_name + "')";
      return fault(Fault::kAuth, msg);
    }
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
      return fault(Fault::kAuth, where + ": the peer refused our certificate (" + text + ")");
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
      return fault(Fault::kAuth, where + ": the peer sent no certificate");
    case SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE:
    case SSL_R_NO_SHARED_CIPHER:
    case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
      return fault(Fault::kAuth, where + ": no common key with the peer (" + text +
                                     "): do both sides use the same keying, shared secret or certificates?");
    case SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC:
    case SSL_R_DECRYPTION_FAILED:
    case SSL_R_SSLV3_ALERT_BAD_RECORD_MAC:
      if (in_handshake)
        return fault(Fault::kAuth, where + ": a handshake record failed authentication (" + text +
                                       "): a replayed or altered stream, or a peer with another key");
      return fault(Fault::kProtocol, where + ": a TLS record failed authentication (" + text +
                                         "): the stream was altered in transit; nothing of that record was delivered");
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_HTTP_REQUEST:
    case SSL_R_HTTPS_PROXY_REQUEST:
    case SSL_R_UNEXPECTED_RECORD:
    case SSL_R_RECORD_LENGTH_MISMATCH:
    case SSL_R_UNKNOWN_PROTOCOL:
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
    case SSL_R_ENCRYPTED_LENGTH_TOO_LONG:
    case SSL_R_UNEXPECTED_MESSAGE:
    case SSL_R_WRONG_SSL_VERSION:
    case SSL_R_BAD_RECORD_TYPE:
      if (in_handshake)
        return fault(Fault::kProtocol, where + ": the peer does not speak TLS 1.3 (" + text +
                                           "): a plaintext or older livemig peer, or not livemig at all");
      return fault(Fault::kProtocol, where + ": malformed TLS record (" + text + ")");
    default:
      return fault(Fault::kProtocol, where + ": " + text);
  }
}

// The error for an alert the peer sent us (direct or kernel receive).
std::exception_ptr alert_error(std::uint8_t desc, const std::string& where) {
  const std::string name = tls13::alert_name(desc);
  if (desc == 51)
    return fault(Fault::kAuth, where + ": the peer refused our key (alert " + name +
                                   "): a different shared secret, or HELLO messages altered in transit");
  if (desc == 40)
    return fault(Fault::kAuth, where + ": no common key with the peer (alert " + name +
                                   "): do both sides use the same keying, shared secret or certificates?");
  if (tls13::alert_is_authentication(desc))
    return fault(Fault::kAuth, where + ": the peer refused our certificate (alert " + name + ")");
  if (desc == 20)
    return fault(Fault::kProtocol, where + ": the peer found a record of ours altered in transit (alert " + name + ")");
  return fault(Fault::kProtocol, where + ": the peer sent TLS alert " + name);
}

// ---- OpenSSL callbacks ----

TlsChannel::State* state_of(const SSL* ssl) { return static_cast<TlsChannel::State*>(SSL_get_ex_data(ssl, 0)); }

// A session carrying `psk` for a SHA-256 suite: what OpenSSL takes as an external PSK.
SSL_SESSION* psk_session(SSL* ssl, std::span<const std::uint8_t> psk) {
  const SSL_CIPHER* cipher = SSL_CIPHER_find(ssl, kAes128GcmSha256);
  if (cipher == nullptr || psk.empty()) return nullptr;
  SSL_SESSION* s = SSL_SESSION_new();
  if (s == nullptr) return nullptr;
  if (SSL_SESSION_set1_master_key(s, psk.data(), psk.size()) != 1 || SSL_SESSION_set_cipher(s, cipher) != 1 ||
      SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION) != 1) {
    SSL_SESSION_free(s);
    return nullptr;
  }
  return s;
}

// Client: offers this channel's PSK under livemig's identity.
int psk_use_session(SSL* ssl, const EVP_MD* md, const unsigned char** id, std::size_t* idlen, SSL_SESSION** sess) {
  *sess = nullptr;
  *id = nullptr;
  *idlen = 0;
  // After a HelloRetryRequest OpenSSL asks again with the suite's hash: ours is SHA-256 only.
  if (md != nullptr && EVP_MD_get_type(md) != NID_sha256) return 1;
  const TlsChannel::State* st = state_of(ssl);
  SSL_SESSION* s = psk_session(ssl, {st->psk.data(), st->psk_len});
  if (s == nullptr) return 0;
  *sess = s;  // OpenSSL takes this reference
  *id = reinterpret_cast<const unsigned char*>(kPskIdentity);
  *idlen = sizeof kPskIdentity - 1;
  return 1;
}

// Server: the PSK for livemig's identity; another identity gets none (and, as the server has no
// certificate, the handshake fails).
int psk_find_session(SSL* ssl, const unsigned char* id, std::size_t idlen, SSL_SESSION** sess) {
  *sess = nullptr;
  if (idlen != sizeof kPskIdentity - 1 || std::memcmp(id, kPskIdentity, idlen) != 0) return 1;
  const TlsChannel::State* st = state_of(ssl);
  *sess = psk_session(ssl, {st->psk.data(), st->psk_len});
  return *sess != nullptr ? 1 : 0;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// OpenSSL reports each secret it derives as an NSS key log line ("LABEL <client random hex>
// <secret hex>"): the only public way to the application traffic secrets, which the direct
// record layer needs (kTLS gets the same keys from OpenSSL internally). Kept in memory only.
void keylog(const SSL* ssl, const char* line) {
  TlsChannel::State* st = state_of(ssl);
  if (st == nullptr) return;
  const char* sp1 = std::strchr(line, ' ');
  const char* sp2 = sp1 != nullptr ? std::strchr(sp1 + 1, ' ') : nullptr;
  if (sp2 == nullptr) return;
  const std::string_view label(line, static_cast<std::size_t>(sp1 - line));
  std::array<std::uint8_t, 64>* dst = nullptr;
  std::size_t* len = nullptr;
  if (label == "CLIENT_TRAFFIC_SECRET_0") {
    dst = &st->client_secret;
    len = &st->client_secret_len;
  } else if (label == "SERVER_TRAFFIC_SECRET_0") {
    dst = &st->server_secret;
    len = &st->server_secret_len;
  } else {
    return;
  }
  const char* hex = sp2 + 1;
  std::size_t n = 0;
  while (n < dst->size() && hex[2 * n] != '\0' && hex[2 * n + 1] != '\0') {
    const int hi = hex_value(hex[2 * n]);
    const int lo = hex_value(hex[2 * n + 1]);
    if (hi < 0 || lo < 0) break;
    (*dst)[n++] = static_cast<std::uint8_t>(hi * 16 + lo);
  }
  *len = n;
}

void check_suites(const std::string& suites, TlsKeying keying) {
  if (suites.empty()) throw std::invalid_argument("TLS: no TLS 1.3 suite configured");
  if (keying != TlsKeying::kPsk) return;
  std::size_t at = 0;
  while (at <= suites.size()) {
    const std::size_t end = std::min(suites.find(':', at), suites.size());
    const std::string name = suites.substr(at, end - at);
    if (name.size() < 7 || name.compare(name.size() - 7, 7, "_SHA256") != 0)
      throw std::invalid_argument("TLS: suite '" + name +
                                  "' cannot carry a shared-secret PSK (it is derived for SHA-256 suites only)");
    at = end + 1;
  }
}

bool readable(const std::string& path) { return ::access(path.c_str(), R_OK) == 0; }

// ---- the openssl engine ----

// Runs one SSL call (one record at most) under the lock; on WANT_* waits for the socket without
// it and retries. Returns the call's result once it succeeded, or 0 at a clean end of stream.
template <class Op>
int openssl_call(TlsChannel::State& st, Op op, int timeout_ms, const std::string& where, bool reading) {
  for (;;) {
    int err = 0;
    {
      std::lock_guard lock(st.lock);
      st.check();
      ERR_clear_error();
      st.io->last_errno = 0;
      SigpipeGuard guard(st.sigpipe_guard);
      const int r = op();
      const int saved_errno = errno;
      if (r == 1) return 1;
      err = SSL_get_error(st.ssl, r);
      if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
        const int sys = st.io->last_errno != 0 ? st.io->last_errno : saved_errno;
        if (reading && (err == SSL_ERROR_ZERO_RETURN || ended_without_close_notify(err, sys))) {
          ERR_clear_error();
          return 0;
        }
        st.fail(tls_failure(st.ssl, err, sys, where, false, st.context->options()));
      }
    }
    // A write retry must repeat the same buffer and length: OpenSSL holds the sealed record.
    try {
      wait_or_lost(st.fd, err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, timeout_ms, where);
    } catch (const ConnectionLost&) {
      if (!reading) st.fail(std::current_exception());  // a record may sit half-sent: no more writes
      throw;
    }
  }
}

void openssl_write_record(TlsChannel::State& st, const std::uint8_t* p, std::size_t n, int timeout_ms,
                          const std::string& where) {
  std::size_t written = 0;
  openssl_call(st, [&] { return SSL_write_ex(st.ssl, p, n, &written); }, timeout_ms, where, false);
}

std::uint64_t openssl_write(TlsChannel::State& st, const struct iovec* iov, std::size_t iovcnt, int timeout_ms,
                            const std::string& where) {
  // The whole batch under write_mu, as the other engines: its frames go out whole even when two
  // writers share the channel (the FIFO lock is taken per record, for the reader's sake).
  std::lock_guard batch(st.write_mu);
  const std::uint64_t before = st.sends.load(std::memory_order_relaxed);
  st.stage_len = 0;
  for (std::size_t i = 0; i < iovcnt; ++i) {
    const auto* p = static_cast<const std::uint8_t*>(iov[i].iov_base);
    std::size_t len = iov[i].iov_len;
    while (len > 0) {
      if (st.stage_len == 0 && len >= kRecord) {
        // Whole records from the caller's memory (SSL_write copies each into its buffer).
        const std::size_t whole = len - len % kRecord;
        for (std::size_t off = 0; off < whole; off += kRecord) openssl_write_record(st, p + off, kRecord, timeout_ms, where);
        p += whole;
        len -= whole;
        continue;
      }
      // Small pieces (a frame header, the tail of a page run) share a record with what follows.
      const std::size_t k = std::min(len, kRecord - st.stage_len);
      std::memcpy(st.stage.get() + st.stage_len, p, k);
      st.stage_len += k;
      p += k;
      len -= k;
      if (st.stage_len == kRecord) {
        openssl_write_record(st, st.stage.get(), kRecord, timeout_ms, where);
        st.stage_len = 0;
      }
    }
  }
  if (st.stage_len > 0) {
    openssl_write_record(st, st.stage.get(), st.stage_len, timeout_ms, where);
    st.stage_len = 0;
  }
  return st.sends.load(std::memory_order_relaxed) - before;
}

std::size_t openssl_read(TlsChannel::State& st, std::uint8_t* p, std::size_t n, int timeout_ms,
                         const std::string& where) {
  std::size_t got = 0;
  // OpenSSL opens the record in its own buffer and copies out only what its tag vouched for.
  const int r = openssl_call(st, [&] { return SSL_read_ex(st.ssl, p, n, &got); }, timeout_ms, where, true);
  return r == 1 ? got : 0;
}

// ---- the direct engine: sending ----

// Sends the sealed records buffered in st.out.
void direct_flush(TlsChannel::State& st, int timeout_ms, const std::string& where) {
  std::size_t off = 0;
  while (off < st.out_len) {
    st.sends.fetch_add(1, std::memory_order_relaxed);
    const ssize_t r = ::send(st.fd, st.out.get() + off, st.out_len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) {
      off += static_cast<std::size_t>(r);
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    try {
      if (err == EAGAIN || err == EWOULDBLOCK) {
        wait_or_lost(st.fd, POLLOUT, timeout_ms, where);
        continue;
      }
      if (lost_errno(err)) throw ConnectionLost(where + ": connection lost (" + std::string(std::strerror(err)) + ")");
      throw KernelError(err, "send", "TLS socket fd " + std::to_string(st.fd));
    } catch (...) {
      // Part of a record may be out: the stream cannot go on.
      st.fail(std::current_exception());
    }
  }
  st.out_len = 0;
}

// Seals one record into st.out (sending what is buffered first when it would not fit).
void direct_seal(TlsChannel::State& st, const struct iovec* pieces, std::size_t n, std::size_t len,
                 std::uint8_t type, int timeout_ms, const std::string& where) {
  // st.out holds kOutFlush + one record; out_flush never exceeds kOutFlush.
  if (st.out_len > st.out_flush.load(std::memory_order_relaxed)) direct_flush(st, timeout_ms, where);
  st.out_len += st.seal->seal(pieces, n, len, type, st.out.get() + st.out_len);
}

// KeyUpdate (RFC 8446 4.6.3): sent under the old key, then this side moves to the next one.
void direct_key_update(TlsChannel::State& st, int timeout_ms, const std::string& where) {
  static const std::uint8_t msg[4] = {tls13::kKeyUpdate, 0, 0, 1};
  std::uint8_t body[5];
  std::memcpy(body, msg, 4);
  body[4] = 0;  // update_not_requested
  const struct iovec piece{body, sizeof body};
  direct_seal(st, &piece, 1, sizeof body, tls13::kHandshake, timeout_ms, where);
  st.seal->update();
  st.since_update = 0;
  st.updates_sent.fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t direct_write(TlsChannel::State& st, const struct iovec* iov, std::size_t iovcnt, int timeout_ms,
                           const std::string& where) {
  std::lock_guard lock(st.write_mu);
  st.check();
  const std::uint64_t before = st.sends.load(std::memory_order_relaxed);
  if (st.update_requested.exchange(false, std::memory_order_acq_rel)) direct_key_update(st, timeout_ms, where);
  struct iovec pieces[kMaxPieces];
  std::size_t np = 0;
  std::size_t plen = 0;
  const auto seal_pending = [&] {
    if (plen == 0) return;
    // Rekey before the record that would pass the limit, never after the last one sent.
    if (st.key_update_records > 0 && st.since_update >= st.key_update_records) direct_key_update(st, timeout_ms, where);
    direct_seal(st, pieces, np, plen, tls13::kApplicationData, timeout_ms, where);
    ++st.since_update;
    np = 0;
    plen = 0;
  };
  // Records of 16 KiB cut across the iovecs: a frame header and the pages after it share one,
  // each piece sealed from where it lies (the region for page data).
  for (std::size_t i = 0; i < iovcnt; ++i) {
    auto* p = static_cast<std::uint8_t*>(iov[i].iov_base);
    std::size_t len = iov[i].iov_len;
    while (len > 0) {
      const std::size_t k = std::min(len, kRecord - plen);
      pieces[np++] = {p, k};
      plen += k;
      p += k;
      len -= k;
      if (plen == kRecord || np == kMaxPieces) seal_pending();
    }
  }
  seal_pending();
  direct_flush(st, timeout_ms, where);
  return st.sends.load(std::memory_order_relaxed) - before;
}

// ---- the direct engine: receiving ----

std::size_t be16(const std::uint8_t* p) { return static_cast<std::size_t>(p[0]) << 8 | p[1]; }

// Acts on a non-data record's plaintext (content at q, `len` bytes): 0 for close_notify (end of
// stream), 1 when reading goes on (a KeyUpdate); throws for anything else.
int direct_control(TlsChannel::State& st, std::uint8_t type, const std::uint8_t* q, std::size_t len,
                   const std::string& where) {
  if (type == tls13::kAlert) {
    if (len != 2) st.fail(fault(Fault::kProtocol, where + ": a malformed TLS alert"));
    if (q[1] == 0) return 0;  // close_notify
    st.fail(alert_error(q[1], where));
  }
  if (type == tls13::kHandshake && len == 5 && q[0] == tls13::kKeyUpdate && q[1] == 0 && q[2] == 0 && q[3] == 1 &&
      q[4] <= 1) {
    st.open->update();
    st.updates_received.fetch_add(1, std::memory_order_relaxed);
    if (q[4] == 1) st.update_requested.store(true, std::memory_order_release);  // answered by the next write
    return 1;
  }
  if (type == tls13::kHandshake)
    st.fail(fault(Fault::kProtocol, where + ": an unexpected post-handshake message (type " + std::to_string(q[0]) +
                                        "): livemig peers send none but KeyUpdate"));
  st.fail(fault(Fault::kProtocol, where + ": a TLS record of unknown content type " + std::to_string(type)));
}

std::size_t direct_read(TlsChannel::State& st, std::uint8_t* p, std::size_t n, int timeout_ms,
                        const std::string& where) {
  for (;;) {
    st.check();
    if (st.plain_pos < st.plain_len) {
      const std::size_t k = std::min(n, st.plain_len - st.plain_pos);
      std::memcpy(p, st.plain.get() + st.plain_pos, k);
      st.plain_pos += k;
      return k;
    }
    if (st.rx_eof) return 0;
    const std::size_t avail = st.in_len - st.in_pos;
    if (avail >= tls13::kHeader) {
      const std::uint8_t* rec = st.in.get() + st.in_pos;
      const std::size_t body = be16(rec + 3);
      if (rec[0] != tls13::kApplicationData || rec[1] != 0x03 || rec[2] != 0x03)
        st.fail(fault(Fault::kProtocol, where + ": not a protected TLS 1.3 record (type " + std::to_string(rec[0]) +
                                            ", version 0x" + std::to_string(rec[1]) + std::to_string(rec[2]) + ")"));
      if (body <= tls13::kTag || body > tls13::kMaxCiphertext)
        st.fail(fault(Fault::kProtocol, where + ": a TLS record of " + std::to_string(body) + " bytes (record_overflow)"));
      if (avail >= tls13::kHeader + body) {
        st.in_pos += tls13::kHeader + body;
        const std::size_t inner = body - tls13::kTag;
        // A record that fits in the caller's buffer is opened straight into it (the region, a
        // staging buffer); one that straddles two reads goes through `plain`.
        std::uint8_t* dst = n >= inner ? p : st.plain.get();
        if (!st.open->open(rec, body, dst)) {
          OPENSSL_cleanse(dst, inner);  // unverified bytes never stay behind
          st.fail(fault(Fault::kProtocol, where + ": a TLS record failed authentication (bad record MAC): the "
                                              "stream was altered in transit; nothing of that record was delivered"));
        }
        std::size_t k = inner;
        while (k > 0 && dst[k - 1] == 0) --k;  // strip the padding
        if (k == 0) st.fail(fault(Fault::kProtocol, where + ": a TLS record without a content type"));
        const std::uint8_t type = dst[k - 1];
        const std::size_t content = k - 1;
        if (type == tls13::kApplicationData) {
          if (content == 0) continue;
          if (dst == p) {
            // The type byte (and any padding) landed past the content, where the next record's
            // content goes; zero it, so a stream that fails there leaves zeros, not a stray byte.
            std::memset(p + content, 0, inner - content);
            return content;
          }
          st.plain_pos = 0;
          st.plain_len = content;
          continue;
        }
        if (direct_control(st, type, dst, content, where) == 0) {
          st.rx_eof = true;
          return 0;
        }
        continue;
      }
    }
    // Need more bytes: keep the partial record at the front, then take in what has arrived.
    if (st.in_pos > 0) {
      std::memmove(st.in.get(), st.in.get() + st.in_pos, avail);
      st.in_len = avail;
      st.in_pos = 0;
    }
    st.recvs.fetch_add(1, std::memory_order_relaxed);
    // st.in holds kReadAhead + one record and keeps less than a record here: room is never 0.
    const std::size_t room = st.read_ahead.load(std::memory_order_relaxed) + tls13::kMaxRecord - st.in_len;
    const ssize_t r = ::recv(st.fd, st.in.get() + st.in_len, room, MSG_DONTWAIT);
    if (r > 0) {
      st.in_len += static_cast<std::size_t>(r);
      continue;
    }
    if (r == 0) {
      if (avail > 0)
        st.fail(fault(Fault::kLost, where + ": the peer closed the connection in the middle of a TLS record"));
      return 0;  // closed without close_notify: an end of stream, as on a bare socket
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      wait_or_lost(st.fd, POLLIN, timeout_ms, where);
      continue;
    }
    if (lost_errno(err))
      st.fail(fault(Fault::kLost, where + ": connection lost (" + std::string(std::strerror(err)) + ")"));
    st.fail(std::make_exception_ptr(KernelError(err, "recv", "TLS socket fd " + std::to_string(st.fd))));
  }
}

// ---- the kernel engine (kTLS) ----

std::uint64_t kernel_write(TlsChannel::State& st, struct iovec* iov, std::size_t iovcnt, int timeout_ms,
                           const std::string& where) {
  std::lock_guard lock(st.write_mu);
  st.check();
  // The kernel seals: plain sendmsg straight from the caller's memory, as without TLS, in slices
  // so that a close_notify never waits long behind it.
  std::uint64_t calls = 0;
  std::size_t idx = 0;
  while (idx < iovcnt) {
    std::size_t cnt = 0;
    std::size_t bytes = 0;
    while (idx + cnt < iovcnt && cnt < 1024 && (cnt == 0 || bytes + iov[idx + cnt].iov_len <= kKernelSlice))
      bytes += iov[idx + cnt++].iov_len;
    msghdr msg{};
    msg.msg_iov = iov + idx;
    msg.msg_iovlen = cnt;
    ++calls;
    st.sends.fetch_add(1, std::memory_order_relaxed);
    const ssize_t r = ::sendmsg(st.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      try {
        if (err == EAGAIN || err == EWOULDBLOCK) {
          wait_or_lost(st.fd, POLLOUT, timeout_ms, where);
          continue;
        }
        if (lost_errno(err)) throw ConnectionLost(where + ": connection lost (" + std::string(std::strerror(err)) + ")");
        throw KernelError(err, "send", "kTLS socket fd " + std::to_string(st.fd));
      } catch (...) {
        st.fail(std::current_exception());
      }
    }
    auto left = static_cast<std::size_t>(r);
    while (idx < iovcnt && left >= iov[idx].iov_len) {
      left -= iov[idx].iov_len;
      ++idx;
    }
    if (left > 0) {
      iov[idx].iov_base = static_cast<std::uint8_t*>(iov[idx].iov_base) + left;
      iov[idx].iov_len -= left;
    }
  }
  return calls;
}

std::size_t kernel_read(TlsChannel::State& st, std::uint8_t* p, std::size_t n, int timeout_ms,
                        const std::string& where) {
  for (;;) {
    st.check();
    if (st.rx_eof) return 0;
    // The kernel opens records straight into p; a control record says so in a cmsg.
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(unsigned char))];
    struct iovec v{p, n};
    msghdr m{};
    m.msg_iov = &v;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    st.recvs.fetch_add(1, std::memory_order_relaxed);
    const ssize_t r = ::recvmsg(st.fd, &m, MSG_DONTWAIT);
    if (r > 0) {
      std::uint8_t type = tls13::kApplicationData;
      for (cmsghdr* c = CMSG_FIRSTHDR(&m); c != nullptr; c = CMSG_NXTHDR(&m, c))
        if (c->cmsg_level == SOL_TLS && c->cmsg_type == TLS_GET_RECORD_TYPE) type = *CMSG_DATA(c);
      if (type == tls13::kApplicationData) return static_cast<std::size_t>(r);
      if (type == tls13::kAlert && r == 2 && p[1] == 0) {
        st.rx_eof = true;
        return 0;
      }
      if (type == tls13::kAlert && r == 2) st.fail(alert_error(p[1], where));
      st.fail(fault(Fault::kProtocol, where + ": a TLS record of type " + std::to_string(type) +
                                          " the kernel's record layer cannot follow (a KeyUpdate?)"));
    }
    if (r == 0) return 0;
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      wait_or_lost(st.fd, POLLIN, timeout_ms, where);
      continue;
    }
    if (err == EBADMSG)
      st.fail(fault(Fault::kProtocol, where + ": a TLS record failed authentication (the kernel reports a bad "
                                          "record MAC): the stream was altered in transit"));
    if (lost_errno(err))
      st.fail(fault(Fault::kLost, where + ": connection lost (" + std::string(std::strerror(err)) + ")"));
    st.fail(std::make_exception_ptr(KernelError(err, "recv", "kTLS socket fd " + std::to_string(st.fd))));
  }
}

// ---- dispatch ----

std::uint64_t engine_write(TlsChannel::State& st, struct iovec* iov, std::size_t iovcnt, int timeout_ms,
                           const std::string& where) {
  switch (st.tx) {
    case Engine::kKernel:
      return kernel_write(st, iov, iovcnt, timeout_ms, where);
    case Engine::kDirect:
      return direct_write(st, iov, iovcnt, timeout_ms, where);
    case Engine::kOpenSsl:
      return openssl_write(st, iov, iovcnt, timeout_ms, where);
    case Engine::kNone:
      break;
  }
  throw std::logic_error("TLS: write before the handshake");
}

std::size_t engine_read(TlsChannel::State& st, std::uint8_t* p, std::size_t n, int timeout_ms,
                        const std::string& where) {
  switch (st.rx) {
    case Engine::kKernel:
      return kernel_read(st, p, n, timeout_ms, where);
    case Engine::kDirect:
      return direct_read(st, p, n, timeout_ms, where);
    case Engine::kOpenSsl:
      return openssl_read(st, p, n, timeout_ms, where);
    case Engine::kNone:
      break;
  }
  throw std::logic_error("TLS: read before the handshake");
}

const char* engine_name(Engine e) {
  switch (e) {
    case Engine::kKernel:
      return "ktls";
    case Engine::kDirect:
      return "userspace";
    case Engine::kOpenSsl:
      return "openssl";
    case Engine::kNone:
      break;
  }
  return "none";
}

// Runs an SSL handshake call until it succeeds, waiting for the socket up to `deadline`.
void drive(TlsChannel::State& st, const std::function<int()>& op, Clock::time_point deadline, int timeout_ms) {
  for (;;) {
    ERR_clear_error();
    if (st.io) st.io->last_errno = 0;
    const int r = op();
    const int saved_errno = errno;
    if (r == 1) return;
    const int err = SSL_get_error(st.ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      const int left = ms_until(deadline);
      if (left <= 0 || !wait_fd(st.fd, err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, left))
        throw ConnectionLost("TLS handshake: no answer from the peer within " + seconds(timeout_ms) + " (timeout)");
      continue;
    }
    const int sys = st.io && st.io->last_errno != 0 ? st.io->last_errno : saved_errno;
    std::rethrow_exception(tls_failure(st.ssl, err, sys, "TLS handshake", true, st.context->options()));
  }
}

// After OpenSSL's handshake: picks each direction's engine and keys it.
void start_engines(TlsChannel::State& st) {
  const TlsOptions& o = st.context->options();
  bool kernel_tx = false;
  bool kernel_rx = false;
#ifndef OPENSSL_NO_KTLS
  if (st.socket_bio) {
    kernel_tx = BIO_get_ktls_send(SSL_get_wbio(st.ssl));
    kernel_rx = BIO_get_ktls_recv(SSL_get_rbio(st.ssl));
  }
#endif
  const SSL_CIPHER* cipher = SSL_get_current_cipher(st.ssl);
  const char* aead = o.record_layer == TlsRecordLayer::kDirect && cipher != nullptr
                         ? tls13::aead_for_suite(SSL_CIPHER_get_protocol_id(cipher))
                         : nullptr;
  const bool direct = aead != nullptr && st.client_secret_len > 0 && st.server_secret_len > 0;
  st.tx = kernel_tx ? Engine::kKernel : direct ? Engine::kDirect : Engine::kOpenSsl;
  st.rx = kernel_rx ? Engine::kKernel : direct ? Engine::kDirect : Engine::kOpenSsl;
  const bool client = st.context->role() == TlsRole::kClient;
  if (st.tx == Engine::kDirect || st.rx == Engine::kDirect) {
    // The direct layer starts at sequence number 0: OpenSSL must not have sent or taken in any
    // record under the application keys (no session tickets; exact reads during the handshake).
    if (SSL_has_pending(st.ssl) == 1)
      throw ProtocolError("TLS handshake: the peer sent data before the handshake ended");
    const EVP_MD* md = SSL_CIPHER_get_handshake_digest(cipher);
    const std::span<const std::uint8_t> cs(st.client_secret.data(), st.client_secret_len);
    const std::span<const std::uint8_t> ss(st.server_secret.data(), st.server_secret_len);
    if (st.tx == Engine::kDirect) {
      st.seal = std::make_unique<tls13::Protection>(aead, md, client ? cs : ss, true);
      st.out = std::make_unique<std::uint8_t[]>(kOutFlush + tls13::kMaxRecord);
      st.key_update_records = o.key_update_records;
    }
    if (st.rx == Engine::kDirect) {
      st.open = std::make_unique<tls13::Protection>(aead, md, client ? ss : cs, false);
      st.in = std::make_unique<std::uint8_t[]>(kReadAhead + tls13::kMaxRecord);
      st.plain = std::make_unique<std::uint8_t[]>(tls13::kMaxCiphertext);
    }
  }
  st.wipe_secrets();
  if (st.tx == Engine::kOpenSsl || st.rx == Engine::kOpenSsl) {
    if (!st.io) {
      st.io = std::make_unique<TlsSocketIo>();
      st.io->fd = st.fd;
      st.io->sends = &st.sends;
      st.io->recvs = &st.recvs;
    }
    if (st.socket_bio) {
      // Ours for each direction the kernel did not take: the socket BIO has nothing buffered
      // (OpenSSL's read-ahead lives in the SSL object), and each set call frees what it replaces.
      BIO* b = new_io_bio(st.io.get());
      if (!kernel_tx && !kernel_rx)
        SSL_set_bio(st.ssl, b, b);
      else if (!kernel_rx)
        SSL_set0_rbio(st.ssl, b);
      else
        SSL_set0_wbio(st.ssl, b);
      st.sigpipe_guard = kernel_tx;
    }
    if (st.tx == Engine::kOpenSsl) st.stage = std::make_unique<std::uint8_t[]>(kRecord);
    // Reads take in as many records as the read buffer holds per recv.
    if (st.rx == Engine::kOpenSsl) SSL_set_read_ahead(st.ssl, 1);
  }
}

// The transcript digest each side sends inside the tunnel (docs/protocol.md, "Encryption"):
// SHA-256 over a label and what this side saw of the plaintext handshake.
std::array<std::uint8_t, kTranscriptDigestBytes> transcript_digest(std::span<const std::uint8_t> transcript) {
  std::array<std::uint8_t, kTranscriptDigestBytes> out{};
  const std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  unsigned int len = 0;
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), kTranscriptLabel, sizeof kTranscriptLabel) != 1 ||
      EVP_DigestUpdate(ctx.get(), transcript.data(), transcript.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), out.data(), &len) != 1 || len != out.size())
    throw Error("TLS: SHA-256 of the handshake transcript failed: " + drain_errors());
  return out;
}

// Reads exactly `n` bytes through the channel before `deadline`; the peer closing first is
// ConnectionLost naming `where`.
void read_exact(TlsChannel::State& st, std::uint8_t* p, std::size_t n, Clock::time_point deadline,
                const std::string& where) {
  while (n > 0) {
    const std::size_t got = engine_read(st, p, n, std::max(1, ms_until(deadline)), where);
    if (got == 0) throw ConnectionLost(where + ": the peer closed the connection");
    p += got;
    n -= got;
  }
}

void check_transcript(const std::array<std::uint8_t, kTranscriptDigestBytes>& mine,
                      const std::array<std::uint8_t, kTranscriptDigestBytes>& theirs, const char* peer) {
  if (CRYPTO_memcmp(mine.data(), theirs.data(), mine.size()) != 0)
    throw ProtocolError(std::string("TLS handshake: the ") + peer +
                        " saw other handshake messages than we did: they were altered in transit");
}

}  // namespace

// ---- options, PSK derivation ----

TlsOptions TlsOptions::x509_dir(const std::string& dir, TlsRole role, std::string peer_name) {
  const std::string side = role == TlsRole::kClient ? "client" : "server";
  TlsOptions o;
  o.keying = TlsKeying::kX509;
  o.ca_file = dir + "/ca-cert.pem";
  o.cert_file = dir + "/" + side + "-cert.pem";
  o.key_file = dir + "/" + side + "-key.pem";
  o.peer_name = std::move(peer_name);
  for (const std::string* f : {&o.ca_file, &o.cert_file, &o.key_file})
    if (!readable(*f))
      throw std::invalid_argument("TLS: cannot read " + *f + " (an x509 directory holds ca-cert.pem, " + side +
                                  "-cert.pem and " + side + "-key.pem)");
  return o;
}

std::array<std::uint8_t, kTlsPskBytes> derive_tls_psk(std::span<const std::uint8_t> secret,
                                                      std::span<const std::uint8_t> context) {
  if (secret.empty()) throw std::invalid_argument("TLS PSK: empty shared secret");
  if (context.empty() || context.size() > kMaxPskContext)
    throw std::invalid_argument("TLS PSK: the context (both HELLO bodies) must hold 1 to " +
                                std::to_string(kMaxPskContext) + " bytes, got " + std::to_string(context.size()));
  const std::unique_ptr<EVP_KDF, decltype(&EVP_KDF_free)> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr), &EVP_KDF_free);
  if (!kdf) throw Error("TLS PSK: HKDF unavailable: " + drain_errors());
  const std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> kctx(EVP_KDF_CTX_new(kdf.get()), &EVP_KDF_CTX_free);
  if (!kctx) throw Error("TLS PSK: EVP_KDF_CTX_new failed: " + drain_errors());
  char digest[] = "SHA256";
  // OSSL_PARAM holds non-const pointers; HKDF only reads its inputs.
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::uint8_t*>(secret.data()), secret.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<char*>(kPskSalt), sizeof kPskSalt - 1),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<std::uint8_t*>(context.data()),
                                        context.size()),
      OSSL_PARAM_construct_end()};
  std::array<std::uint8_t, kTlsPskBytes> out{};
  if (EVP_KDF_derive(kctx.get(), out.data(), out.size(), params) != 1)
    throw Error("TLS PSK: HKDF-SHA256 failed: " + drain_errors());
  return out;
}

// ---- TlsContext ----

TlsContext::TlsContext(TlsOptions options, TlsRole role) : options_(std::move(options)), role_(role) {
  const TlsOptions& o = options_;
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(
      SSL_CTX_new(role == TlsRole::kClient ? TLS_client_method() : TLS_server_method()), &SSL_CTX_free);
  if (!ctx) throw Error("TLS: SSL_CTX_new failed: " + drain_errors());
  SSL_CTX* c = ctx.get();
  if (SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION) != 1 || SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION) != 1)
    throw Error("TLS: this OpenSSL cannot restrict itself to TLS 1.3: " + drain_errors());
  check_suites(o.ciphersuites, o.keying);
  if (SSL_CTX_set_ciphersuites(c, o.ciphersuites.c_str()) != 1)
    throw std::invalid_argument("TLS: unknown TLS 1.3 suites '" + o.ciphersuites + "': " + drain_errors());
  // No session tickets, no resumption, no 0-RTT: every connection (a recovery's too) runs a full
  // handshake with fresh randoms and key shares, so a replayed stream gets nothing; and no
  // post-handshake message precedes the first application record.
  SSL_CTX_set_num_tickets(c, 0);
  SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  std::uint64_t opts = SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET;
  if (o.ktls) opts |= SSL_OP_ENABLE_KTLS;
  SSL_CTX_set_options(c, opts);
  // The openssl engine's read buffer (allocated at a channel's first read): room for read-ahead.
  SSL_CTX_set_default_read_buffer_len(c, kReadAhead);
  SSL_CTX_set_keylog_callback(c, keylog);

  if (o.keying == TlsKeying::kPsk) {
    if (o.secret.size() < 16)
      throw std::invalid_argument("TLS: PSK keying needs a shared secret of at least 16 bytes, got " +
                                  std::to_string(o.secret.size()));
    SSL_CTX_set_psk_use_session_callback(c, psk_use_session);
    SSL_CTX_set_psk_find_session_callback(c, psk_find_session);
    // A PSK handshake carries no certificate; a client with an empty trust store can never be
    // talked into accepting one instead.
    SSL_CTX_set_verify(c, role == TlsRole::kClient ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, nullptr);
  } else {
    if (o.cert_file.empty() || o.key_file.empty() || o.ca_file.empty())
      throw std::invalid_argument("TLS: x509 keying needs a certificate, its key and a CA file");
    if (role == TlsRole::kClient && o.peer_name.empty())
      throw std::invalid_argument("TLS: an x509 client needs the server's name (peer_name) to check its certificate");
    if (SSL_CTX_use_certificate_chain_file(c, o.cert_file.c_str()) != 1)
      throw std::invalid_argument("TLS: cannot load the certificate " + o.cert_file + ": " + drain_errors());
    if (SSL_CTX_use_PrivateKey_file(c, o.key_file.c_str(), SSL_FILETYPE_PEM) != 1)
      throw std::invalid_argument("TLS: cannot load the private key " + o.key_file + ": " + drain_errors());
    if (SSL_CTX_check_private_key(c) != 1)
      throw std::invalid_argument("TLS: the key " + o.key_file + " does not match the certificate " + o.cert_file);
    if (SSL_CTX_load_verify_locations(c, o.ca_file.c_str(), nullptr) != 1)
      throw std::invalid_argument("TLS: cannot load the CA certificates " + o.ca_file + ": " + drain_errors());
    SSL_CTX_set_verify(c, role == TlsRole::kClient ? SSL_VERIFY_PEER : SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                       nullptr);
  }
  ctx_ = ctx.release();
}

TlsContext::~TlsContext() {
  SSL_CTX_free(ctx_);
  if (!options_.secret.empty()) OPENSSL_cleanse(options_.secret.data(), options_.secret.size());
}

// ---- TlsChannel ----

TlsChannel::TlsChannel(std::shared_ptr<const TlsContext> context, int fd, std::span<const std::uint8_t> psk_context)
    : st_(std::make_unique<State>()) {
  State& st = *st_;
  st.context = std::move(context);
  st.fd = fd;
  if (!st.context) throw std::invalid_argument("TlsChannel needs a TlsContext");
  int type = 0;
  socklen_t len = sizeof type;
  if (fd < 0 || ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
    throw std::invalid_argument("TlsChannel: fd " + std::to_string(fd) + " is not a stream socket");
  const TlsOptions& o = st.context->options();
  if (o.keying == TlsKeying::kPsk) {
    st.psk = derive_tls_psk(o.secret, psk_context);
    st.psk_len = st.psk.size();
  }
  st.ssl = SSL_new(st.context->native());
  if (st.ssl == nullptr) throw Error("TLS: SSL_new failed: " + drain_errors());
  SSL_set_ex_data(st.ssl, 0, &st);  // the callbacks' way back to this channel
  if (o.ktls) {
    // OpenSSL's socket BIO: only through it can OpenSSL hand the keys to the kernel at the end of
    // the handshake.
    if (SSL_set_fd(st.ssl, fd) != 1) throw Error("TLS: SSL_set_fd failed: " + drain_errors());
    st.socket_bio = true;
  } else {
    st.io = std::make_unique<TlsSocketIo>();
    st.io->fd = fd;
    st.io->sends = &st.sends;
    st.io->recvs = &st.recvs;
    BIO* b = new_io_bio(st.io.get());
    SSL_set_bio(st.ssl, b, b);
  }
  if (o.keying == TlsKeying::kX509 && !o.peer_name.empty()) {
    const std::string& name = o.peer_name;
    unsigned char addr[16];
    X509_VERIFY_PARAM* param = SSL_get0_param(st.ssl);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (::inet_pton(AF_INET, name.c_str(), addr) == 1 || ::inet_pton(AF_INET6, name.c_str(), addr) == 1) {
      if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1)
        throw std::invalid_argument("TLS: bad peer address '" + name + "'");
    } else {
      if (SSL_set1_host(st.ssl, name.c_str()) != 1) throw std::invalid_argument("TLS: bad peer name '" + name + "'");
      // SNI, for a server that holds several names (SSL_set_tlsext_host_name, without its C cast).
      if (st.context->role() == TlsRole::kClient &&
          SSL_ctrl(st.ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, const_cast<char*>(name.c_str())) != 1)
        throw std::invalid_argument("TLS: bad server name '" + name + "'");
    }
  }
  if (st.context->role() == TlsRole::kClient)
    SSL_set_connect_state(st.ssl);
  else
    SSL_set_accept_state(st.ssl);
}

TlsChannel::~TlsChannel() = default;

void TlsChannel::handshake(int timeout_ms, std::span<const std::uint8_t> transcript) {
  State& st = *st_;
  if (st.attempted) throw std::logic_error("TlsChannel::handshake: called twice");
  st.attempted = true;
  if (timeout_ms <= 0) throw std::invalid_argument("TLS handshake: the timeout must be > 0 ms");
  const auto t0 = Clock::now();
  const auto deadline = t0 + std::chrono::milliseconds(timeout_ms);
  const TlsOptions& o = st.context->options();
  try {
    {
      // OpenSSL's socket BIO has no per-call flag: the socket is non-blocking for the handshake
      // (poll enforces the deadline) and SIGPIPE is held off.
      std::optional<NonBlocking> nonblocking;
      if (st.socket_bio) nonblocking.emplace(st.fd);
      SigpipeGuard guard(st.socket_bio);
      drive(st, [&] { return SSL_do_handshake(st.ssl); }, deadline, timeout_ms);
      if (o.keying == TlsKeying::kPsk && SSL_session_reused(st.ssl) != 1)
        throw AuthenticationError("TLS handshake: the peer did not use the shared secret's key");
      start_engines(st);
    }
    // TLS 1.3 lets a client finish before the server has checked its certificate; the server's
    // first byte tells the client it was accepted, so a refusal surfaces here on both sides. With a
    // transcript, the digest of what this side saw of the plaintext handshake follows inside the
    // tunnel, both ways: a peer that saw other bytes (altered in transit) is refused on both sides.
    const bool bind = !transcript.empty();
    std::array<std::uint8_t, kTranscriptDigestBytes> mine{};
    if (bind) mine = transcript_digest(transcript);
    if (st.context->role() == TlsRole::kServer) {
      std::uint8_t yes = kAccepted;
      struct iovec v[2] = {{&yes, 1}, {mine.data(), bind ? mine.size() : 0}};
      engine_write(st, v, bind ? 2 : 1, std::max(1, ms_until(deadline)), "TLS handshake (sending the acceptance)");
      if (bind) {
        std::array<std::uint8_t, kTranscriptDigestBytes> theirs{};
        read_exact(st, theirs.data(), theirs.size(), deadline, "TLS handshake (waiting for the client's transcript)");
        check_transcript(mine, theirs, "client");
      }
    } else {
      std::uint8_t got = 0;
      const std::string where = "TLS handshake (waiting for the server to accept us)";
      read_exact(st, &got, 1, deadline, where);
      if (got != kAccepted)
        throw ProtocolError(where + ": the server's first byte is " + std::to_string(got) + ", not the acceptance (1)");
      if (bind) {
        std::array<std::uint8_t, kTranscriptDigestBytes> theirs{};
        read_exact(st, theirs.data(), theirs.size(), deadline, "TLS handshake (waiting for the server's transcript)");
        // Ours goes back whatever it holds, so the server judges for itself.
        struct iovec v{mine.data(), mine.size()};
        engine_write(st, &v, 1, std::max(1, ms_until(deadline)), "TLS handshake (sending our transcript)");
        check_transcript(mine, theirs, "server");
      }
    }
  } catch (...) {
    st.wipe_secrets();
    st.fail(std::current_exception());
  }
  if (const SSL_CIPHER* c = SSL_get_current_cipher(st.ssl)) st.cipher = SSL_CIPHER_get_name(c);
  if (o.keying == TlsKeying::kPsk) {
    st.peer_identity = std::string("psk:") + kPskIdentity;
  } else if (X509* cert = SSL_get0_peer_certificate(st.ssl)) {
    char buf[512];
    X509_NAME_oneline(X509_get_subject_name(cert), buf, sizeof buf);
    st.peer_identity = buf;
  }
  st.handshake_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  st.established = true;
}

std::uint64_t TlsChannel::write_all(struct iovec* iov, std::size_t iovcnt, std::size_t, int timeout_ms) {
  if (!st_->established) throw std::logic_error("TlsChannel::write_all before the handshake");
  return engine_write(*st_, iov, iovcnt, timeout_ms, "TLS send");
}

std::size_t TlsChannel::read_some(std::uint8_t* p, std::size_t n, int timeout_ms) {
  if (!st_->established) throw std::logic_error("TlsChannel::read_some before the handshake");
  if (n == 0) throw std::invalid_argument("TlsChannel::read_some: zero bytes asked for");
  return engine_read(*st_, p, n, timeout_ms, "TLS recv");
}

void TlsChannel::bound_batches(std::size_t bytes) noexcept {
  const std::size_t b = std::clamp(bytes, kRecord, kOutFlush);
  st_->out_flush.store(b, std::memory_order_relaxed);
  st_->read_ahead.store(std::min(b, kReadAhead), std::memory_order_relaxed);
}

std::vector<std::uint8_t> TlsChannel::export_keying_material(const std::string& label,
                                                              std::span<const std::uint8_t> context,
                                                              std::size_t n) const {
  State& st = *st_;
  if (!st.established) throw std::logic_error("TlsChannel::export_keying_material before the handshake");
  if (n == 0 || n > 255 * 32) throw std::invalid_argument("TLS exporter: 1 to 8160 bytes, got " + std::to_string(n));
  std::vector<std::uint8_t> out(n);
  // OpenSSL's object is shared with the openssl record layer's reads and writes: take its turn.
  std::unique_lock<FairLock> turn(st.lock, std::defer_lock);
  if (st.tx == Engine::kOpenSsl || st.rx == Engine::kOpenSsl) turn.lock();
  if (SSL_export_keying_material(st.ssl, out.data(), n, label.data(), label.size(), context.data(), context.size(),
                                 1) != 1)
    throw Error("TLS exporter failed: " + drain_errors());
  return out;
}

void TlsChannel::close_notify() noexcept {
  State& st = *st_;
  if (!st.established || st.failed.load(std::memory_order_acquire)) return;
  static const std::uint8_t alert[2] = {1, 0};  // warning, close_notify
  try {
    switch (st.tx) {
      case Engine::kDirect: {
        std::lock_guard lock(st.write_mu);
        const struct iovec piece{const_cast<std::uint8_t*>(alert), 2};
        direct_seal(st, &piece, 1, 2, tls13::kAlert, 1000, "TLS close_notify");
        direct_flush(st, 1000, "TLS close_notify");
        break;
      }
      case Engine::kKernel: {
        std::lock_guard lock(st.write_mu);
        alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(unsigned char))] = {};
        struct iovec v{const_cast<std::uint8_t*>(alert), 2};
        msghdr m{};
        m.msg_iov = &v;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
        cmsghdr* c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_TLS;
        c->cmsg_type = TLS_SET_RECORD_TYPE;
        c->cmsg_len = CMSG_LEN(sizeof(unsigned char));
        *CMSG_DATA(c) = tls13::kAlert;
        ::sendmsg(st.fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        break;
      }
      case Engine::kOpenSsl: {
        std::lock_guard batch(st.write_mu);
        std::lock_guard lock(st.lock);
        SigpipeGuard guard(st.sigpipe_guard);
        ERR_clear_error();
        SSL_shutdown(st.ssl);  // non-blocking: sends close_notify if the socket takes it
        ERR_clear_error();
        break;
      }
      case Engine::kNone:
        break;
    }
  } catch (...) {
    // Best effort: the channel records the failure for its other calls.
  }
}

void TlsChannel::shutdown() noexcept { ::shutdown(st_->fd, SHUT_RDWR); }

int TlsChannel::fd() const noexcept { return st_->fd; }
bool TlsChannel::established() const noexcept { return st_->established; }
bool TlsChannel::ktls_send() const noexcept { return st_->tx == Engine::kKernel; }
bool TlsChannel::ktls_recv() const noexcept { return st_->rx == Engine::kKernel; }
const std::string& TlsChannel::cipher() const noexcept { return st_->cipher; }
const std::string& TlsChannel::peer_identity() const noexcept { return st_->peer_identity; }
double TlsChannel::handshake_seconds() const noexcept { return st_->handshake_seconds; }
std::uint64_t TlsChannel::send_calls() const noexcept { return st_->sends.load(std::memory_order_relaxed); }
std::uint64_t TlsChannel::recv_calls() const noexcept { return st_->recvs.load(std::memory_order_relaxed); }
std::uint64_t TlsChannel::key_updates_sent() const noexcept {
  return st_->updates_sent.load(std::memory_order_relaxed);
}
std::uint64_t TlsChannel::key_updates_received() const noexcept {
  return st_->updates_received.load(std::memory_order_relaxed);
}

std::string TlsChannel::path() const {
  if (!st_->established) return "none";
  if (st_->tx == st_->rx) return engine_name(st_->tx);
  return std::string(engine_name(st_->tx)) + "+" + engine_name(st_->rx);
}

// ---- TlsInput ----

std::size_t TlsInput::read_full(struct iovec* iov, int iovcnt) {
  std::size_t done = 0;
  const std::uint64_t before = channel_.recv_calls();
  for (int i = 0; i < iovcnt; ++i) {
    auto* p = static_cast<std::uint8_t*>(iov[i].iov_base);
    std::size_t left = iov[i].iov_len;
    while (left > 0) {
      // Straight into the destination (the region, a staging buffer).
      const std::size_t r = channel_.read_some(p, left, timeout_ms_);
      if (r == 0) {
        syscalls += channel_.recv_calls() - before;
        return done;
      }
      p += r;
      left -= r;
      done += r;
    }
  }
  syscalls += channel_.recv_calls() - before;
  return done;
}

void TlsInput::truncated(const std::string& what, std::size_t got, std::size_t want) {
  throw ConnectionLost("the peer closed the connection in the middle of " + what + " (" + std::to_string(got) +
                       " of " + std::to_string(want) + " bytes)");
}

InputOpener tls_input_opener(std::vector<std::shared_ptr<TlsChannel>> channels) {
  for (const auto& c : channels) {
    if (!c) throw std::invalid_argument("tls_input_opener: a null channel");
    if (!c->established())
      throw std::invalid_argument("tls_input_opener: the channel on fd " + std::to_string(c->fd()) +
                                  " has not completed its handshake");
  }
  return [channels = std::move(channels)](int fd, int timeout_ms) -> std::unique_ptr<FrameInput> {
    for (const auto& c : channels)
      if (c->fd() == fd) return std::make_unique<TlsInput>(*c, timeout_ms);
    throw ProtocolError("fd " + std::to_string(fd) + " has no TLS channel: refusing to read it in clear");
  };
}

}  // namespace livemig::wire
