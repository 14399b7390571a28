// RAII owners for file descriptors and memory mappings.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

namespace livemig {

/// Owns one file descriptor; closes it on destruction. Move-only.
class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  /// The descriptor, or -1.
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  /// Gives up ownership without closing.
  int release() noexcept { return std::exchange(fd_, -1); }
  /// Closes the current descriptor (if any) and owns `fd`.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// A close-on-exec duplicate of `fd` (a descriptor borrowed from someone else, kept for as long
/// as its new owner needs it). Throws KernelError("dup") naming `what`.
UniqueFd dup_fd(int fd, const char* what);

/// Owns one mmap()ed range; unmaps it on destruction. Move-only.
class Mapping {
 public:
  Mapping() noexcept = default;
  Mapping(void* addr, std::size_t len) noexcept : addr_(static_cast<std::uint8_t*>(addr)), len_(len) {}
  Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  /// Anonymous private memory of `len` bytes (a page multiple); throws KernelError("mmap").
  static Mapping anonymous(std::size_t len);
  /// Room for `n` 64-bit words of anonymous memory, zero and untouched until written (first touch
  /// is slow: a table made this way costs nothing until used); an empty Mapping for n = 0.
  static Mapping zeroed_words(std::size_t n);
  /// Shared memory backed by a new memfd of `len` bytes; the fd is returned in `fd_out`.
  /// Throws KernelError("memfd_create" / "ftruncate" / "mmap").
  static Mapping memfd(std::size_t len, const std::string& name, UniqueFd& fd_out);
  /// Maps `len` bytes of `fd` shared at offset 0 (for a second view of a memfd).
  static Mapping shared(int fd, std::size_t len);

  std::uint8_t* data() const noexcept { return addr_; }
  std::size_t size() const noexcept { return len_; }
  explicit operator bool() const noexcept { return addr_ != nullptr; }
  void reset() noexcept {
    if (addr_ != nullptr) ::munmap(addr_, len_);
    addr_ = nullptr;
    len_ = 0;
  }

 private:
  std::uint8_t* addr_ = nullptr;
  std::size_t len_ = 0;
};

}  // namespace livemig
