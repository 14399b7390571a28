#include "livemig/base/userfaultfd.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "livemig/base/errors.hpp"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

namespace livemig {
namespace {

struct FeatureName {
  std::uint64_t bit;
  const char* name;
};

constexpr FeatureName kFeatureNames[] = {
    {UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"},
    {UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"},
    {UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"},
    {UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"},
    {UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"},
    {UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"},
    {UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"},
    {UFFD_FEATURE_SIGBUS, "SIGBUS"},
    {UFFD_FEATURE_THREAD_ID, "THREAD_ID"},
    {UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"},
    {UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"},
    {UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"},
    {UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"},
    {UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"},
    {UFFD_FEATURE_POISON, "POISON"},
    {UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"},
    {UFFD_FEATURE_MOVE, "MOVE"},
};

std::string feature_list(std::uint64_t bits) {
  std::string out;
  for (const auto& f : kFeatureNames) {
    if ((bits & f.bit) == 0) continue;
    if (!out.empty()) out += ", ";
    out += f.name;
  }
  return out;
}

// A raw userfaultfd with no API negotiated yet: /dev/userfaultfd first (needs only access to the
// device node), then the syscall (needs vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE, or user
// mode only). Each EPERM/EACCES moves on to the next way; the last error is explained.
UniqueFd open_raw(bool nonblock) {
  const int flags = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
  int dev_err = 0;
  {
    UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
    if (dev) {
      // USERFAULTFD_IOC_NEW: a new userfaultfd whose permission check was the open() above.
      const int fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, flags);
      if (fd >= 0) return UniqueFd(fd);
    }
    dev_err = errno;
  }
  long fd = ::syscall(SYS_userfaultfd, flags);
  if (fd < 0 && (errno == EPERM || errno == EACCES)) fd = ::syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY);
  if (fd >= 0) return UniqueFd(static_cast<int>(fd));
  const int sys_err = errno;
  std::string why = "cannot open a userfaultfd: /dev/userfaultfd: " + std::string(std::strerror(dev_err)) +
                    "; userfaultfd(2): " + std::strerror(sys_err) + ". ";
  if (sys_err == ENOSYS)
    why += "The kernel was built without CONFIG_USERFAULTFD, or a seccomp filter blocks the syscall.";
  else
    why += "Give this user access to /dev/userfaultfd, or set vm.unprivileged_userfaultfd=1, or run with "
           "CAP_SYS_PTRACE; a seccomp filter (e.g. a container's default profile) can also forbid it.";
  throw UnsupportedError("userfaultfd", why);
}

}  // namespace

std::string uffd_feature_name(std::uint64_t feature_bit) { return feature_list(feature_bit); }

std::uint64_t uffd_supported_features() {
  static const std::uint64_t supported = [] {
    UniqueFd fd = open_raw(true);
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = 0;
    // UFFDIO_API with no features asked reports every feature the kernel has; it may be called
    // once per fd, so this fd is only a probe.
    if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) throw_errno("api", "UFFDIO_API probe");
    return static_cast<std::uint64_t>(api.features);
  }();
  return supported;
}

Userfaultfd Userfaultfd::open(std::uint64_t required, std::uint64_t optional, bool nonblock) {
  const std::uint64_t supported = uffd_supported_features();
  if ((supported & required) != required)
    throw UnsupportedError(feature_list(required & ~supported),
                           "this kernel's userfaultfd lacks " + feature_list(required & ~supported) +
                               " (kernel supports: " + feature_list(supported) + ")");
  Userfaultfd u;
  u.fd_ = open_raw(nonblock);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = required | (optional & supported);
  // UFFDIO_API: enable exactly these features on this fd.
  if (::ioctl(u.fd_.get(), UFFDIO_API, &api) != 0)
    throw_errno("api", "UFFDIO_API with features " + feature_list(required | (optional & supported)));
  u.features_ = required | (optional & supported);
  return u;
}

std::uint64_t Userfaultfd::register_range(void* addr, std::size_t len, std::uint64_t modes) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<std::uintptr_t>(addr);
  reg.range.len = len;
  reg.mode = modes;
  // UFFDIO_REGISTER: faults of these kinds in the range now come to this fd.
  if (::ioctl(fd_.get(), UFFDIO_REGISTER, &reg) != 0) {
    if (errno == EINVAL)
      throw UnsupportedError("register",
                             "cannot register " + std::to_string(len) + " bytes at " + std::to_string(reg.range.start) +
                                 " with userfaultfd (EINVAL): the range must be page aligned and wholly inside "
                                 "anonymous or shared-memory (memfd/shmem) mappings; hugetlb and file-backed "
                                 "mappings are not supported by livemig");
    throw_errno("register", "UFFDIO_REGISTER of " + std::to_string(len) + " bytes", reg.range.start);
  }
  return static_cast<std::uint64_t>(reg.ioctls);
}

void Userfaultfd::unregister_range(void* addr, std::size_t len) {
  uffdio_range r{};
  r.start = reinterpret_cast<std::uintptr_t>(addr);
  r.len = len;
  // UFFDIO_UNREGISTER: the kernel also wakes every thread still waiting in the range.
  if (::ioctl(fd_.get(), UFFDIO_UNREGISTER, &r) != 0) throw_errno("unregister", "UFFDIO_UNREGISTER", r.start);
}

void Userfaultfd::wake(void* addr, std::size_t len) { wake_at(reinterpret_cast<std::uintptr_t>(addr), len); }

Userfaultfd Userfaultfd::adopt(UniqueFd fd, std::uint64_t features) noexcept {
  Userfaultfd u;
  u.fd_ = std::move(fd);
  u.features_ = features;
  return u;
}

void Userfaultfd::wake_at(std::uint64_t addr, std::size_t len) {
  uffdio_range r{};
  r.start = addr;
  r.len = len;
  // UFFDIO_WAKE: retry the faults of threads blocked in the range.
  if (::ioctl(fd_.get(), UFFDIO_WAKE, &r) != 0) throw_errno("wake", "UFFDIO_WAKE", r.start);
}

}  // namespace livemig
