// Opening and negotiating a userfaultfd; registering ranges. Shared by the destination (MISSING
// mode placement) and the source (asynchronous write-protect dirty tracking).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "livemig/base/fd.hpp"
#include "livemig/base/uapi.hpp"

namespace livemig {

/// The name of one UFFD_FEATURE_* bit, e.g. "WP_ASYNC" (for errors and reports).
std::string uffd_feature_name(std::uint64_t feature_bit);

/// Features the running kernel supports, probed once on a throwaway userfaultfd; throws
/// UnsupportedError when no userfaultfd can be opened (naming /dev/userfaultfd access,
/// vm.unprivileged_userfaultfd or seccomp).
std::uint64_t uffd_supported_features();

class Userfaultfd {
 public:
  /// Opens a userfaultfd (close-on-exec; non-blocking reads when `nonblock`) with every feature in
  /// `required` and those of `optional` the kernel has. Tries /dev/userfaultfd, then the
  /// userfaultfd(2) syscall (and the syscall with UFFD_USER_MODE_ONLY). Throws UnsupportedError
  /// naming a missing feature or permission.
  static Userfaultfd open(std::uint64_t required, std::uint64_t optional = 0, bool nonblock = true);

  /// Takes over `fd`, a userfaultfd some process already negotiated (UFFDIO_API) and registered
  /// (the attach protocol: the process's own), with `features` enabled on it. Nothing is checked.
  static Userfaultfd adopt(UniqueFd fd, std::uint64_t features) noexcept;

  Userfaultfd() = default;
  Userfaultfd(Userfaultfd&&) noexcept = default;
  Userfaultfd& operator=(Userfaultfd&&) noexcept = default;

  int fd() const noexcept { return fd_.get(); }
  /// The features enabled on this fd.
  std::uint64_t features() const noexcept { return features_; }
  bool has(std::uint64_t feature_bits) const noexcept { return (features_ & feature_bits) == feature_bits; }

  /// Registers [addr, addr + len) in `modes` (UFFDIO_REGISTER_MODE_*); returns the ioctls allowed on
  /// the range. Throws UnsupportedError when the mapping kind cannot be registered in that mode
  /// (e.g. hugetlb, or a file mapping in MISSING mode), KernelError("register") otherwise.
  std::uint64_t register_range(void* addr, std::size_t len, std::uint64_t modes);
  /// Unregisters [addr, addr + len); waiters are woken by the kernel. Throws KernelError("unregister").
  void unregister_range(void* addr, std::size_t len);
  /// Wakes threads waiting on faults in [addr, addr + len). Throws KernelError("wake").
  void wake(void* addr, std::size_t len);
  /// wake() for an address in the address space of the process that created the userfaultfd.
  void wake_at(std::uint64_t addr, std::size_t len);

 private:
  UniqueFd fd_;
  std::uint64_t features_ = 0;
};

}  // namespace livemig
