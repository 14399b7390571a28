#include "livemig/base/holes.hpp"

#include <fcntl.h>
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

}  // namespace livemig
