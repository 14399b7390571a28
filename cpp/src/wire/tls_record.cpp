#include "tls_record.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <cstring>
#include <memory>
#include <stdexcept>

#include "livemig/base/errors.hpp"

namespace livemig::wire::tls13 {
namespace {

std::string openssl_error() {
  char buf[256];
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no OpenSSL error recorded";
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

}  // namespace

void expand_label(const EVP_MD* md, std::span<const std::uint8_t> secret, std::string_view label,
                  std::span<std::uint8_t> out) {
  // HkdfLabel: uint16 length, opaque label<7..255> = "tls13 " + label, opaque context<0..255> = "".
  std::uint8_t info[2 + 1 + 255 + 1];
  const std::size_t llen = 6 + label.size();
  if (llen > 255 || out.size() > 0xffff) throw std::invalid_argument("HKDF-Expand-Label: label or length too long");
  info[0] = static_cast<std::uint8_t>(out.size() >> 8);
  info[1] = static_cast<std::uint8_t>(out.size());
  info[2] = static_cast<std::uint8_t>(llen);
  std::memcpy(info + 3, "tls13 ", 6);
  std::memcpy(info + 9, label.data(), label.size());
  info[3 + llen] = 0;
  const std::size_t info_len = 3 + llen + 1;

  const std::unique_ptr<EVP_KDF, decltype(&EVP_KDF_free)> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr), &EVP_KDF_free);
  const std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> ctx(kdf ? EVP_KDF_CTX_new(kdf.get()) : nullptr,
                                                                      &EVP_KDF_CTX_free);
  if (!ctx) throw Error("TLS record layer: HKDF unavailable: " + openssl_error());
  int mode = EVP_KDF_HKDF_MODE_EXPAND_ONLY;
  // OSSL_PARAM holds non-const pointers; HKDF only reads its inputs.
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, const_cast<char*>(EVP_MD_get0_name(md)), 0),
      OSSL_PARAM_construct_int(OSSL_KDF_PARAM_MODE, &mode),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::uint8_t*>(secret.data()), secret.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, info_len),
      OSSL_PARAM_construct_end()};
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1)
    throw Error("TLS record layer: HKDF-Expand-Label failed: " + openssl_error());
}

const char* aead_for_suite(std::uint16_t suite_id) noexcept {
  switch (suite_id) {
    case 0x1301:
      return "AES-128-GCM";
    case 0x1302:
      return "AES-256-GCM";
    case 0x1303:
      return "ChaCha20-Poly1305";
    default:
      return nullptr;
  }
}

Protection::Protection(const char* aead, const EVP_MD* md, std::span<const std::uint8_t> secret, bool seal)
    : md_(md), secret_len_(secret.size()), seal_(seal) {
  if (secret.size() != static_cast<std::size_t>(EVP_MD_get_size(md)) || secret.size() > secret_.size())
    throw Error("TLS record layer: a traffic secret of " + std::to_string(secret.size()) + " bytes for " +
                EVP_MD_get0_name(md));
  cipher_ = EVP_CIPHER_fetch(nullptr, aead, nullptr);
  ctx_ = EVP_CIPHER_CTX_new();
  if (cipher_ == nullptr || ctx_ == nullptr) {
    EVP_CIPHER_free(cipher_);
    EVP_CIPHER_CTX_free(ctx_);
    throw Error(std::string("TLS record layer: ") + aead + " unavailable: " + openssl_error());
  }
  std::memcpy(secret_.data(), secret.data(), secret.size());
  derive();
}

Protection::~Protection() {
  EVP_CIPHER_CTX_free(ctx_);
  EVP_CIPHER_free(cipher_);
  OPENSSL_cleanse(secret_.data(), secret_.size());
  OPENSSL_cleanse(iv_.data(), iv_.size());
}

void Protection::derive() {
  std::array<std::uint8_t, 32> key{};
  const auto key_len = static_cast<std::size_t>(EVP_CIPHER_get_key_length(cipher_));
  const std::span<const std::uint8_t> secret(secret_.data(), secret_len_);
  expand_label(md_, secret, "key", {key.data(), key_len});
  expand_label(md_, secret, "iv", iv_);
  // The context keeps the expanded key; each record then only sets its nonce.
  const int ok = EVP_CipherInit_ex2(ctx_, cipher_, key.data(), nullptr, seal_ ? 1 : 0, nullptr);
  OPENSSL_cleanse(key.data(), key.size());
  if (ok != 1) throw Error("TLS record layer: cannot key " + std::string(EVP_CIPHER_get0_name(cipher_)) + ": " +
                           openssl_error());
  seq_ = 0;
}

void Protection::nonce(std::uint8_t out[12]) const noexcept {
  // The per-record nonce: the IV XOR the 64-bit sequence number, big-endian, right-aligned.
  std::memcpy(out, iv_.data(), 12);
  for (int i = 0; i < 8; ++i) out[11 - i] ^= static_cast<std::uint8_t>(seq_ >> (8 * i));
}

std::size_t Protection::seal(const struct iovec* pieces, std::size_t npieces, std::size_t len, std::uint8_t type,
                             std::uint8_t* out) {
  if (len > kMaxPlain) throw std::invalid_argument("TLS record layer: record content past 2^14 bytes");
  const std::size_t body = len + 1 + kTag;
  out[0] = kApplicationData;  // the outer type of every protected record
  out[1] = 0x03;
  out[2] = 0x03;
  out[3] = static_cast<std::uint8_t>(body >> 8);
  out[4] = static_cast<std::uint8_t>(body);
  std::uint8_t n[12];
  nonce(n);
  int olen = 0;
  std::uint8_t* c = out + kHeader;
  bool ok = EVP_EncryptInit_ex2(ctx_, nullptr, nullptr, n, nullptr) == 1 &&
            EVP_EncryptUpdate(ctx_, nullptr, &olen, out, static_cast<int>(kHeader)) == 1;
  // Straight from the caller's memory (the region) into the record: the AEAD is the only copy.
  for (std::size_t i = 0; ok && i < npieces; ++i) {
    if (pieces[i].iov_len == 0) continue;
    ok = EVP_EncryptUpdate(ctx_, c, &olen, static_cast<const std::uint8_t*>(pieces[i].iov_base),
                           static_cast<int>(pieces[i].iov_len)) == 1;
    c += olen;
  }
  if (ok) {
    ok = EVP_EncryptUpdate(ctx_, c, &olen, &type, 1) == 1;
    c += olen;
  }
  if (ok) {
    ok = EVP_EncryptFinal_ex(ctx_, c, &olen) == 1;
    c += olen;
  }
  if (ok) ok = EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_GET_TAG, static_cast<int>(kTag), c) == 1;
  if (!ok || c != out + kHeader + len + 1) throw Error("TLS record layer: sealing failed: " + openssl_error());
  ++seq_;
  return kHeader + body;
}

bool Protection::open(const std::uint8_t* rec, std::size_t body, std::uint8_t* out) {
  const std::size_t clen = body - kTag;
  std::uint8_t n[12];
  nonce(n);
  int olen = 0;
  int done = 0;
  const bool ok = EVP_DecryptInit_ex2(ctx_, nullptr, nullptr, n, nullptr) == 1 &&
                  EVP_DecryptUpdate(ctx_, nullptr, &olen, rec, static_cast<int>(kHeader)) == 1 &&
                  EVP_DecryptUpdate(ctx_, out, &olen, rec + kHeader, static_cast<int>(clen)) == 1 &&
                  EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_SET_TAG, static_cast<int>(kTag),
                                      const_cast<std::uint8_t*>(rec + kHeader + clen)) == 1 &&
                  EVP_DecryptFinal_ex(ctx_, out + olen, &done) == 1;
  ERR_clear_error();
  if (!ok) return false;
  ++seq_;
  return true;
}

void Protection::update() {
  std::array<std::uint8_t, 64> next{};
  const std::span<std::uint8_t> out(next.data(), secret_len_);
  expand_label(md_, {secret_.data(), secret_len_}, "traffic upd", out);
  std::memcpy(secret_.data(), next.data(), secret_len_);
  OPENSSL_cleanse(next.data(), next.size());
  derive();
}

std::string alert_name(std::uint8_t d) {
  switch (d) {
    case 0: return "close_notify";
    case 10: return "unexpected_message";
    case 20: return "bad_record_mac";
    case 22: return "record_overflow";
    case 40: return "handshake_failure";
    case 42: return "bad_certificate";
    case 43: return "unsupported_certificate";
    case 44: return "certificate_revoked";
    case 45: return "certificate_expired";
    case 46: return "certificate_unknown";
    case 47: return "illegal_parameter";
    case 48: return "unknown_ca";
    case 49: return "access_denied";
    case 50: return "decode_error";
    case 51: return "decrypt_error";
    case 70: return "protocol_version";
    case 80: return "internal_error";
    case 90: return "user_canceled";
    case 109: return "missing_extension";
    case 116: return "certificate_required";
    default: return "alert " + std::to_string(d);
  }
}

bool alert_is_authentication(std::uint8_t d) noexcept {
  return d == 40 || (d >= 42 && d <= 46) || d == 48 || d == 49 || d == 51 || d == 116;
}

}  // namespace livemig::wire::tls13
