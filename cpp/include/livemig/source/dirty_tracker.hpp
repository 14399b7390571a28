// Dirty tracking of a memory region without instrumenting its writers.
//
// Kernel mode: a userfaultfd with asynchronous write-protect (UFFD_FEATURE_WP_ASYNC, and
// WP_UNPOPULATED so never-touched pages are armed too) is registered on the region and the whole
// region write-protected once. A write to a protected page is resolved inside the kernel, which
// records the page as "written" (its uffd-wp bit cleared); nothing comes to the fd. A harvest is one
// PAGEMAP_SCAN walk with PM_SCAN_WP_MATCHING: it reports the written pages and re-protects them in
// the same pass.
//
// Explicit mode: the writer marks the pages it wrote itself (mark_written, an atomic fetch-or) and a
// harvest takes those marks.
//
// Remote mode (another process's memory, docs/attach.md): the process registered its mapping with
// its own userfaultfd (WP_ASYNC) and sent it with its pagemap; the tracker arms and harvests through
// those, at the process's addresses. Stopping unprotects instead of unregistering: the registration
// is the process's.
//
// Units: pages relative to the region's start; ranges half-open.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/base/remote.hpp"
#include "livemig/base/uapi.hpp"
#include "livemig/base/userfaultfd.hpp"

namespace livemig {

enum class TrackMode : std::uint8_t { Kernel = 0, Explicit = 1 };

class DirtyTracker {
 public:
  /// Starts tracking [base, base + npages * page_size) (page aligned). Kernel mode throws
  /// UnsupportedError naming the missing feature (WP_ASYNC, WP_UNPOPULATED, WP_HUGETLBFS_SHMEM for
  /// shared memory, PAGEMAP_SCAN) and KernelError for other failures; after it returns every page
  /// is write-protected (nothing counts as written yet).
  DirtyTracker(std::uint8_t* base, std::size_t npages, TrackMode mode, std::size_t page_size);
  /// Kernel-mode tracking of `npages` pages of another process at `remote.addr`, through its
  /// userfaultfd (registered in WP mode with WP_ASYNC) and pagemap, both duplicated here. Arms the
  /// range (UFFDIO_WRITEPROTECT); throws KernelError when the kernel refuses (ESRCH: the process
  /// is gone), UnsupportedError when the userfaultfd lacks WP_ASYNC.
  DirtyTracker(const RemoteMemory& remote, std::size_t npages, std::size_t page_size);
  DirtyTracker(const DirtyTracker&) = delete;
  DirtyTracker& operator=(const DirtyTracker&) = delete;
  /// Unregisters the range (kernel mode); never throws.
  ~DirtyTracker();

  /// Ends tracking now (kernel mode: unregisters the range, which drops its write protection, and
  /// closes the userfaultfd; remote: unprotects the range and closes the duplicates), so the memory is ordinary again while this object may live on
  /// (docs/design.md rule 9). Later harvests report nothing. Not concurrent with harvest(); idempotent.
  void stop() noexcept;
  /// True once stop() ran.
  bool stopped() const noexcept { return stopped_.load(std::memory_order_acquire); }

  TrackMode mode() const noexcept { return mode_; }
  std::size_t pages() const noexcept { return npages_; }
  std::size_t page_size() const noexcept { return ps_; }
  /// True for another process's memory.
  bool remote() const noexcept { return remote_; }

  /// Calls fn(first_page, npages) for every run of pages written since the last harvest (or reset)
  /// and re-protects them, in address order. Not reentrant: one harvest at a time (callers
  /// serialise; concurrent reset() calls are fine). Returns the pages reported. Throws KernelError.
  template <class Fn>
  std::size_t harvest(Fn&& fn);

  /// Forgets writes to [first, first + n) (re-protects them) without reporting them. Thread safe,
  /// noexcept: returns false (changing nothing it can vouch for) if the kernel call failed.
  bool reset(std::size_t first, std::size_t n) noexcept;

  /// Explicit mode: records a write to [first, first + n). Any thread, lock-free. No-op in kernel mode.
  void mark_written(std::size_t first, std::size_t n) noexcept {
    if (mode_ == TrackMode::Explicit) written_.set_range(first, first + n);
  }

  /// Number of PAGEMAP_SCAN calls made by harvests so far (for tests of the walk_end handling).
  std::uint64_t scan_calls() const noexcept { return scan_calls_.load(std::memory_order_relaxed); }

 private:
  // Write-protects the whole range once (UFFDIO_WRITEPROTECT mode WP); throws KernelError.
  void arm();
  // One PAGEMAP_SCAN over [start, end) with WP matching; fills vec_ (may be empty); returns the
  // number of regions or -1 with errno set. walk_end receives the kernel's walk end.
  long scan(std::uint64_t start, std::uint64_t end, page_region* vec, std::size_t vec_len,
            std::uint64_t* walk_end) const noexcept;

  // The region's first byte as the kernel knows it: our own address, or the other process's.
  std::uint64_t addr_;
  std::size_t npages_;
  TrackMode mode_;
  Userfaultfd uffd_;
  UniqueFd pagemap_;
  PageBitmap written_;  // explicit mode only (size 0 otherwise)
  std::vector<page_region> vec_;
  std::atomic<std::uint64_t> scan_calls_{0};
  std::atomic<bool> stopped_{false};
  std::size_t ps_;
  unsigned page_shift_ = 12;
  bool remote_ = false;
};

template <class Fn>
std::size_t DirtyTracker::harvest(Fn&& fn) {
  std::size_t reported = 0;
  if (mode_ == TrackMode::Explicit) {
    std::size_t w = 0;
    const std::size_t words = written_.word_count();
    for (; w < words; ++w) {
      auto& word = written_.word(w);
      // Skip empty words without a locked RMW; a mark racing in after the load waits for the next
      // harvest, as if it came after this one. exchange is acq_rel: the marker's earlier writes to
      // the page are visible to whoever sends the page after seeing it dirty.
      if (word.load(std::memory_order_relaxed) == 0) continue;
      PageBitmap::Word x = word.exchange(0, std::memory_order_acq_rel);
      while (x != 0) {
        const auto lo = static_cast<std::size_t>(__builtin_ctzll(x));
        const PageBitmap::Word shifted = ~(x >> lo);
        const std::size_t len = shifted == 0 ? 64 - lo : static_cast<std::size_t>(__builtin_ctzll(shifted));
        fn(w * 64 + lo, len);
        reported += len;
        x &= len + lo >= 64 ? 0 : ~PageBitmap::Word{0} << (lo + len);
      }
    }
    return reported;
  }
  if (stopped()) return 0;
  const std::uint64_t start = addr_;
  const std::uint64_t end = start + npages_ * ps_;
  std::uint64_t pos = start;
  while (pos < end) {
    std::uint64_t walk_end = 0;
    const long n = scan(pos, end, vec_.data(), vec_.size(), &walk_end);
    ++scan_calls_;
    if (n < 0) throw_errno("pagemap_scan", "harvest of written pages", pos, (pos - start));
    // Shifts, not divisions: a 64-bit divide per region is measurable at tens of thousands of regions.
    for (long i = 0; i < n; ++i) {
      const page_region& r = vec_[static_cast<std::size_t>(i)];
      const std::size_t first = (r.start - start) >> page_shift_, len = (r.end - r.start) >> page_shift_;
      fn(first, len);
      reported += len;
    }
    // A call that did not fill the vector walked to the end; its walk_end can be stale then
    // (see MACHINE-FIGURES), so it is trusted only when the vector was full.
    if (static_cast<std::size_t>(n) < vec_.size()) break;
    if (walk_end <= pos) break;  // no progress: cannot happen with a full vector, but never loop
    pos = walk_end;
  }
  return reported;
}

}  // namespace livemig
