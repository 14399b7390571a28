// Holes in the file behind a region (another process's memfd, docs/attach.md): pages the file does
// not hold read as zero, and reading them through a shared mapping would allocate them in the
// file. lseek(SEEK_DATA / SEEK_HOLE) finds them without reading or allocating anything.
#pragma once

#include <cstddef>
#include <cstdint>

#include "livemig/base/fd.hpp"

namespace livemig {

/// A read-only open file description of its own for the file behind `fd` (reopened through
/// /proc/self/fd), so that lseek(SEEK_DATA / SEEK_HOLE) never moves the file offset `fd` shares
/// with its sender (a received memfd shares the process's). Empty when the file cannot be
/// reopened; never throws.
UniqueFd private_file(int fd) noexcept;

/// The first extent of the `npages` pages of `page_size` bytes at byte `offset` of the file `fd`
/// (npages > 0): its length in pages, with `hole` set when the file holds none of them. Never
/// throws: where the file cannot tell (lseek fails), the pages count as data.
std::uint64_t file_extent(int fd, std::uint64_t offset, std::uint64_t npages, std::size_t page_size,
                          bool& hole) noexcept;

/// The same, for a caller that maps the file: `map` is where byte `offset` is mapped (shared).
/// Cost bounded by `npages`, not by the file: a run of pages in the page cache is measured with
/// mincore() (SEEK_HOLE walks every page up to the next hole, to the end of a full file), a page
/// that is not is asked with SEEK_DATA (a swapped-out page is data, a hole is not). Runs may be
/// shorter than file_extent's; a hole is only ever reported where the file holds nothing.
std::uint64_t mapped_file_extent(int fd, const void* map, std::uint64_t offset, std::uint64_t npages,
                                 std::size_t page_size, bool& hole) noexcept;

}  // namespace livemig
