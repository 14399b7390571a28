#include "livemig/base/fd.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <stdexcept>
#include <string>

#include "livemig/base/errors.hpp"
#include "livemig/base/page_size.hpp"

namespace livemig {

UniqueFd dup_fd(int fd, const char* what) {
  UniqueFd out(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
  if (!out) throw_errno("dup", what);
  return out;
}

Mapping Mapping::anonymous(std::size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw_errno("mmap", "anonymous mapping of " + std::to_string(len) + " bytes");
  return Mapping(p, len);
}

Mapping Mapping::zeroed_words(std::size_t n) {
  if (n == 0) return {};
  const std::size_t ps = system_page_size();
  return anonymous((n * sizeof(std::uint64_t) + ps - 1) / ps * ps);
}

Mapping Mapping::memfd(std::size_t len, const std::string& name, UniqueFd& fd_out) {
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC));
  if (!fd) throw_errno("memfd_create", name);
  if (::ftruncate(fd.get(), static_cast<off_t>(len)) != 0)
    throw_errno("ftruncate", name + " to " + std::to_string(len) + " bytes");
  Mapping m = shared(fd.get(), len);
  fd_out = std::move(fd);
  return m;
}

Mapping Mapping::shared(int fd, std::size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw_errno("mmap", "shared mapping of " + std::to_string(len) + " bytes");
  return Mapping(p, len);
}

std::size_t system_page_size() noexcept {
  static const std::size_t ps = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return ps;
}

void check_page_size(std::size_t page_size) {
  if (page_size < 64 || (page_size & (page_size - 1)) != 0)
    throw std::invalid_argument("page size " + std::to_string(page_size) + " is not a power of two of at least 64 bytes");
  if (page_size != system_page_size())
    throw UnsupportedError("huge pages", "page size " + std::to_string(page_size) + " is not this system's base page size (" +
                                             std::to_string(system_page_size()) + " bytes); huge pages are not supported yet");
}

}  // namespace livemig
