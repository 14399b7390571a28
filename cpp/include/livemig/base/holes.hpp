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

}  // namespace livemig
