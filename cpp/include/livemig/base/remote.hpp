// Memory of another process that livemig reaches through descriptors the process sent it (the
// attach protocol, docs/attach.md). livemig reads and writes the bytes through its own mapping of
// the process's memfd; every address handed to the kernel (PAGEMAP_SCAN, UFFDIO_*, fault messages)
// is the process's, because the kernel acts on the mm that created the userfaultfd and on the mm
// the pagemap was opened for, whoever issues the ioctl.
#pragma once

#include <cstdint>

namespace livemig {

/// Where a region lives for the kernel when it is not livemig's own. Descriptors are borrowed:
/// users dup what they keep (so the caller may close its copies at any time).
struct RemoteMemory {
  std::uint64_t addr = 0;           ///< the region's first byte in the process's address space
  int uffd = -1;                    ///< the process's userfaultfd, the region registered on it
  std::uint64_t uffd_features = 0;  ///< the features enabled on it (from its fdinfo)
  int pagemap = -1;                 ///< the process's /proc/<pid>/pagemap
  int memfd = -1;                   ///< the memfd behind the region
  std::uint64_t memfd_offset = 0;   ///< the region's offset in the memfd
};

}  // namespace livemig
