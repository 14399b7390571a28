// livemig's C++ exceptions. The bindings turn each into the Python exception of the same name in
// livemig.errors (std::out_of_range becomes IndexError, std::invalid_argument ValueError).
#pragma once

#include <cerrno>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace livemig {

/// Base of every livemig error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A system call failed. Carries errno, the step that failed (e.g. "register", "copy", "send"),
/// and where known the address and the bytes done before the failure.
class KernelError : public Error {
 public:
  KernelError(int err, std::string step, std::string detail, std::uint64_t address = 0,
              std::uint64_t bytes_done = 0)
      : Error(step + ": " + detail), err_(err), step_(std::move(step)), address_(address), bytes_done_(bytes_done) {}
  int err() const noexcept { return err_; }
  const std::string& step() const noexcept { return step_; }
  std::uint64_t address() const noexcept { return address_; }
  std::uint64_t bytes_done() const noexcept { return bytes_done_; }

 private:
  int err_;
  std::string step_;
  std::uint64_t address_;
  std::uint64_t bytes_done_;
};

/// The running kernel (or its configuration, or the process's permissions) lacks something livemig
/// needs; the message names it.
class UnsupportedError : public Error {
 public:
  UnsupportedError(std::string feature, const std::string& message)
      : Error(message), feature_(std::move(feature)) {}
  const std::string& feature() const noexcept { return feature_; }

 private:
  std::string feature_;
};

/// A peer sent something malformed, unexpected or unknown; the message names what was wrong.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

/// The peer failed the shared-secret challenge.
class AuthenticationError : public ProtocolError {
 public:
  using ProtocolError::ProtocolError;
};

/// The peer closed the connection or the connection broke.
class ConnectionLost : public Error {
 public:
  using Error::Error;
};

/// Throws KernelError for the current errno.
[[noreturn]] void throw_errno(const std::string& step, const std::string& detail, std::uint64_t address = 0,
                              std::uint64_t bytes_done = 0);

}  // namespace livemig
