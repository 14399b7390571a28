#include "livemig/source/dirty_tracker.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <cerrno>
#include <string>

#include "livemig/base/errors.hpp"
#include "livemig/base/page_size.hpp"

namespace livemig {
namespace {

constexpr std::size_t kVecLen = 1024;  // regions per PAGEMAP_SCAN call (24 KiB)

}  // namespace

DirtyTracker::DirtyTracker(std::uint8_t* base, std::size_t npages, TrackMode mode, std::size_t page_size)
    : addr_(reinterpret_cast<std::uintptr_t>(base)), npages_(npages), mode_(mode), written_(mode == TrackMode::Explicit ? npages : 0), ps_(page_size) {
  check_page_size(ps_);
  page_shift_ = static_cast<unsigned>(__builtin_ctzll(ps_));
  if (mode_ == TrackMode::Explicit || npages_ == 0) return;
  const std::size_t len = npages_ * ps_;
  // WP_ASYNC: write faults resolve in the kernel and mark the page written; WP_UNPOPULATED: pages
  // never touched are protected too (without it they would silently escape tracking).
  // WP_HUGETLBFS_SHMEM is optional here: it is needed only for shared (memfd) regions, and
  // registration below reports its absence for those.
  uffd_ = Userfaultfd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_PAGEFAULT_FLAG_WP,
                            UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  try {
    uffd_.register_range(base, len, UFFDIO_REGISTER_MODE_WP);
  } catch (const UnsupportedError&) {
    if (!uffd_.has(UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
      throw UnsupportedError("WP_HUGETLBFS_SHMEM",
                             "cannot write-protect this region: the kernel's userfaultfd lacks WP_HUGETLBFS_SHMEM, "
                             "needed for shared memory");
    throw;
  }
  pagemap_.reset(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap_) throw_errno("open", "/proc/self/pagemap");
  vec_.resize(kVecLen);
  // Probe PAGEMAP_SCAN (Linux 6.7) with an empty walk: an old kernel answers ENOTTY/EINVAL.
  {
    std::uint64_t walk_end = 0;
    if (scan(addr_, addr_, nullptr, 0, &walk_end) < 0) {
      if (errno == ENOTTY || errno == EINVAL)
        throw UnsupportedError("PAGEMAP_SCAN", "this kernel lacks the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7)");
      throw_errno("pagemap_scan", "probe");
    }
  }
  arm();
}

DirtyTracker::DirtyTracker(const RemoteMemory& remote, std::size_t npages, std::size_t page_size)
    : addr_(remote.addr), npages_(npages), mode_(TrackMode::Kernel), written_(0), ps_(page_size), remote_(true) {
  check_page_size(ps_);
  page_shift_ = static_cast<unsigned>(__builtin_ctzll(ps_));
  if (npages_ == 0) return;
  if ((remote.uffd_features & UFFD_FEATURE_WP_ASYNC) == 0)
    throw UnsupportedError("WP_ASYNC", "the process's userfaultfd was not opened with WP_ASYNC: its writes cannot be "
                                       "tracked without blocking them");
  uffd_ = Userfaultfd::adopt(dup_fd(remote.uffd, "the process's userfaultfd"), remote.uffd_features);
  pagemap_ = dup_fd(remote.pagemap, "the process's pagemap");
  vec_.resize(kVecLen);
  // The process registered the range (WP mode) when it attached; protection starts only now, so
  // an attached process pays nothing between migrations.
  arm();
}

void DirtyTracker::arm() {
  uffdio_writeprotect wp{};
  wp.range.start = addr_;
  wp.range.len = npages_ * ps_;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  // UFFDIO_WRITEPROTECT: arm the whole region once (unpopulated pages get markers); later
  // re-protection is done by PAGEMAP_SCAN's WP matching, far cheaper per page.
  if (::ioctl(uffd_.fd(), UFFDIO_WRITEPROTECT, &wp) != 0)
    throw_errno("writeprotect", "arming " + std::to_string(wp.range.len) + " bytes", wp.range.start);
}

DirtyTracker::~DirtyTracker() { stop(); }

void DirtyTracker::stop() noexcept {
  if (stopped_.exchange(true, std::memory_order_acq_rel)) return;
  if (mode_ == TrackMode::Kernel && uffd_.fd() >= 0 && npages_ > 0) {
    if (remote_) {
      uffdio_writeprotect wp{};
      wp.range.start = addr_;
      wp.range.len = npages_ * ps_;
      wp.mode = 0;
      // UFFDIO_WRITEPROTECT mode 0: drop the protection, keep the process's registration (its
      // own). Fails with ESRCH once the process is gone: nothing is left to restore then.
      (void)::ioctl(uffd_.fd(), UFFDIO_WRITEPROTECT, &wp);
    } else {
      try {
        // Unregistering clears the range's uffd-wp bits: writes are plain writes again.
        uffd_.unregister_range(reinterpret_cast<void*>(addr_), npages_ * ps_);
      } catch (...) {  // closing the fd below releases the registration anyway
      }
    }
  }
  uffd_ = Userfaultfd{};
}

long DirtyTracker::scan(std::uint64_t start, std::uint64_t end, page_region* vec, std::size_t vec_len,
                        std::uint64_t* walk_end) const noexcept {
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.flags = PM_SCAN_WP_MATCHING;
  arg.start = start;
  arg.end = end;
  arg.vec = reinterpret_cast<std::uintptr_t>(vec);
  arg.vec_len = vec_len;
  arg.category_mask = PAGE_IS_WRITTEN;
  arg.return_mask = PAGE_IS_WRITTEN;
  // PAGEMAP_SCAN: report the written pages of [start, end) and write-protect them again, one walk.
  const int n = ::ioctl(pagemap_.get(), PAGEMAP_SCAN, &arg);
  *walk_end = arg.walk_end;
  return n;
}

bool DirtyTracker::reset(std::size_t first, std::size_t n) noexcept {
  if (n == 0) return true;
  if (mode_ == TrackMode::Explicit) {
    written_.clear_range(first, first + n);
    return true;
  }
  if (stopped()) return false;
  const std::uint64_t start = addr_ + (std::uint64_t{first} << page_shift_);
  const std::uint64_t end = start + (std::uint64_t{n} << page_shift_);
  std::uint64_t walk_end = 0;
  // With no output vector the walk never stops early: it re-protects every written page.
  return scan(start, end, nullptr, 0, &walk_end) >= 0;
}

}  // namespace livemig
