// The TLS 1.3 record layer (RFC 8446 section 5) for one direction, with OpenSSL's EVP AEADs:
// what the kernel does with kTLS, done in userspace after OpenSSL's handshake so that records are
// sealed straight from the caller's memory and opened straight into the reader's buffers. The
// wire stays standard TLS 1.3: any TLS 1.3 peer (OpenSSL's SSL_read included) reads it. Internal
// to cpp/src/wire.
#pragma once

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

struct evp_cipher_st;
struct evp_cipher_ctx_st;
struct evp_md_st;

namespace livemig::wire::tls13 {

inline constexpr std::size_t kMaxPlain = 16384;                 // content bytes per record (2^14)
inline constexpr std::size_t kHeader = 5;                       // type, legacy version, length
inline constexpr std::size_t kTag = 16;                         // AEAD tag
inline constexpr std::size_t kMaxCiphertext = kMaxPlain + 256;  // the largest TLSCiphertext.length
inline constexpr std::size_t kMaxRecord = kHeader + kMaxCiphertext;
inline constexpr std::uint8_t kAlert = 21;
inline constexpr std::uint8_t kHandshake = 22;
inline constexpr std::uint8_t kApplicationData = 23;
inline constexpr std::uint8_t kKeyUpdate = 24;  // handshake message type

/// HKDF-Expand-Label(secret, label, "", out.size()) of RFC 8446 section 7.1, hash `md`.
void expand_label(const evp_md_st* md, std::span<const std::uint8_t> secret, std::string_view label,
                  std::span<std::uint8_t> out);

/// The EVP AEAD name for a TLS 1.3 suite id (0x1301 ... 0x1303), or nullptr for a suite the
/// direct record layer does not run (CCM).
const char* aead_for_suite(std::uint16_t suite_id) noexcept;

/// One direction's record protection: the traffic secret, the AEAD key and IV derived from it,
/// and the record sequence number. Not thread-safe: one sealing or one opening thread.
class Protection {
 public:
  /// `aead`: an EVP AEAD name (aead_for_suite); `md`: the suite's hash; `secret`: this
  /// direction's application traffic secret; `seal`: this side sends (else it receives). Throws
  /// livemig::Error when OpenSSL cannot.
  Protection(const char* aead, const evp_md_st* md, std::span<const std::uint8_t> secret, bool seal);
  Protection(const Protection&) = delete;
  Protection& operator=(const Protection&) = delete;
  ~Protection();

  /// Seals one record of content type `type` whose content is the iovecs' `len` bytes (at most
  /// kMaxPlain) into `out` (room for kHeader + len + 1 + kTag bytes); returns the record's size.
  std::size_t seal(const struct iovec* pieces, std::size_t npieces, std::size_t len, std::uint8_t type,
                   std::uint8_t* out);
  /// Opens the record whose header is at `rec` and whose `body` bytes follow it, writing the
  /// inner plaintext (body - kTag bytes: content, type, padding) to `out`. False when the tag does
  /// not verify; `out` then holds unverified bytes, which the caller must wipe.
  bool open(const std::uint8_t* rec, std::size_t body, std::uint8_t* out);
  /// KeyUpdate: moves to the next traffic secret (RFC 8446 section 7.2), sequence number 0.
  void update();
  std::uint64_t seq() const noexcept { return seq_; }

 private:
  void derive();
  void nonce(std::uint8_t out[12]) const noexcept;

  evp_cipher_st* cipher_ = nullptr;
  evp_cipher_ctx_st* ctx_ = nullptr;
  const evp_md_st* md_;
  std::array<std::uint8_t, 64> secret_{};
  std::size_t secret_len_;
  std::array<std::uint8_t, 12> iv_{};
  std::uint64_t seq_ = 0;
  bool seal_;
};

/// An alert description's name ("bad_certificate"), or its number.
std::string alert_name(std::uint8_t description);
/// True for alerts that mean the peer refused our key or certificate.
bool alert_is_authentication(std::uint8_t description) noexcept;

}  // namespace livemig::wire::tls13
