#include "livemig/base/holes.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>

namespace livemig {

UniqueFd private_file(int fd) noexcept {
  if (fd < 0) return UniqueFd();
  // open(2) of /proc/self/fd/N makes a new open file description of the same file (a dup would
  // share the offset that lseek moves).
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  return UniqueFd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
}

std::uint64_t file_extent(int fd, std::uint64_t offset, std::uint64_t npages, std::size_t page_size,
                          bool& hole) noexcept {
  hole = false;
  const auto off = static_cast<off_t>(offset);
  const std::uint64_t end = offset + npages * page_size;
  // lseek(SEEK_DATA): the next offset the file holds (on tmpfs: a page in the page cache or in
  // swap); ENXIO when there is none before the end of the file.
  const off_t data = ::lseek(fd, off, SEEK_DATA);
  if (data < 0 && errno != ENXIO) return npages;  // cannot tell: data
  if (data < 0 || data > off) {
    const std::uint64_t stop = data < 0 ? end : std::min<std::uint64_t>(end, static_cast<std::uint64_t>(data));
    const std::uint64_t pages = (stop - offset) / page_size;  // tmpfs extents are whole pages
    if (pages > 0) {
      hole = true;
      return pages;
    }
    return 1;  // data inside the first page: data
  }
  // lseek(SEEK_HOLE) from a data offset: where that data ends (at most the file's end).
  const off_t gap = ::lseek(fd, off, SEEK_HOLE);
  if (gap <= off) return gap < 0 ? npages : 1;
  const std::uint64_t stop = std::min<std::uint64_t>(end, static_cast<std::uint64_t>(gap));
  return (stop - offset + page_size - 1) / page_size;
}

std::uint64_t mapped_file_extent(int fd, const void* map, std::uint64_t offset, std::uint64_t npages,
                                 std::size_t page_size, bool& hole) noexcept {
  hole = false;
  constexpr std::uint64_t kMax = 256;
  unsigned char vec[kMax];
  const std::uint64_t k = std::min(npages, kMax);
  // mincore() of a shared file mapping: bit 0 set where the page is in the file's page cache
  // (without faulting anything in). Not set: a hole, or a page in swap (asked below).
  if (::mincore(const_cast<void*>(map), k * page_size, vec) != 0) return npages;  // cannot tell: data
  std::uint64_t run = 0;
  while (run < k && (vec[run] & 1) != 0) ++run;
  if (run > 0) return run;
  const auto off = static_cast<off_t>(offset);
  const off_t data = ::lseek(fd, off, SEEK_DATA);  // bounded: stops at the next page the file holds
  if (data < 0 && errno != ENXIO) return npages;
  if (data == off) return 1;  // held, not in memory (swap): data
  const std::uint64_t end = offset + npages * page_size;
  const std::uint64_t stop = data < 0 ? end : std::min<std::uint64_t>(end, static_cast<std::uint64_t>(data));
  const std::uint64_t pages = (stop - offset) / page_size;
  if (pages == 0) return 1;
  hole = true;
  return pages;
}

}  // namespace livemig
