// Source: the source side of a migration for one memory region. Owns (or adopts) the region, its
// dirty tracking, the page state bitmaps D (dirty), S (sent), H (hinted), the hint sink and the
// page scanner (docs/design.md rules 2 to 8).
//
// Writers (guest threads) write the region directly; sync() folds what they wrote into D and out of
// H. Initially D is all ones (everything must be sent), S and H clear.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "livemig/source/dirty_tracker.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/balloon/device.hpp"
#include "livemig/source/hint_sink.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/base/page_range.hpp"
#include "livemig/source/page_scanner.hpp"

namespace livemig {

enum class Backing : std::uint8_t { Anonymous = 0, Memfd = 1 };

using RangeList = std::vector<PageRange>;

struct SwitchoverSets {
  RangeList discard;     // D and S: the destination drops these before its guest runs (rule 3)
  RangeList local_fill;  // H, not D, not S: the destination may fill these locally (rule 4)
};

struct SyncCounters {
  std::uint64_t syncs = 0;
  std::uint64_t pages_written = 0;  // summed over syncs
};

/// Everything the source counts, read together (each counter atomically, not all at one instant).
struct SourceCounters {
  SyncCounters sync;
  ScannerCounters scanner;
  std::uint64_t scan_calls = 0;  // PAGEMAP_SCAN calls made by syncs
};

class Source {
 public:
  /// A new region of `npages` pages of `page_size` bytes (anonymous private or memfd shared memory,
  /// THP off), tracked in `mode`. Throws UnsupportedError / KernelError from the tracker or the
  /// mapping, UnsupportedError for a page size this build cannot track (check_page_size).
  Source(std::size_t npages, TrackMode mode, Backing backing, std::size_t page_size);
  /// Adopts `npages` pages at `base` (page aligned, mapped, outliving this object), tracked in `mode`.
  Source(std::uint8_t* base, std::size_t npages, TrackMode mode, std::size_t page_size);
  /// Another process's memory (docs/attach.md): pages are read at `local` (livemig's mapping of the
  /// process's memfd, page aligned, outliving this object); writes are tracked in the process at
  /// `remote.addr` through its userfaultfd and pagemap (DirtyTracker's remote mode).
  Source(const std::uint8_t* local, std::size_t npages, const RemoteMemory& remote, std::size_t page_size);
  Source(const Source&) = delete;
  Source& operator=(const Source&) = delete;

  std::uint8_t* data() const noexcept { return base_; }
  std::size_t pages() const noexcept { return npages_; }
  std::size_t page_size() const noexcept { return ps_; }
  std::size_t bytes() const noexcept { return npages_ * ps_; }
  /// The memfd behind the region, or -1 (anonymous or adopted).
  int memfd() const noexcept { return memfd_.get(); }
  TrackMode mode() const noexcept { return tracker_.mode(); }

  const std::shared_ptr<PageBitmap>& dirty() const noexcept { return dirty_; }
  const std::shared_ptr<PageBitmap>& sent() const noexcept { return sent_; }
  const std::shared_ptr<PageBitmap>& hinted() const noexcept { return hinted_; }
  DirtyTracker& tracker() noexcept { return tracker_; }
  /// Where a workload's balloon device sends the hints it accepts (balloon::Device::set_target):
  /// they land in D and H (rules 4, 5).
  HintSink& hint_sink() noexcept { return hints_; }
  PageScanner& scanner() noexcept { return scanner_; }

  /// Explicit mode: the writer records a write to [first, first + n); any thread, lock-free.
  /// Precondition: the range is inside the region (the bindings check).
  void mark_written(std::size_t first, std::size_t n) noexcept { tracker_.mark_written(first, n); }
  /// Folds every write since the last sync into D (and clears those pages' H bits); returns the
  /// pages found written. Serialised internally. Throws KernelError (D keeps what it had).
  std::size_t sync();
  /// With the guest stopped and a final sync done: the discard and local-fill sets (rule 3, 4).
  SwitchoverSets switchover_sets() const;
  /// Ahead of switchover, guest running, after a sync: the pages sent and dirty again (D and S), as
  /// runs, with S cleared for them: the caller has the destination drop them now, so that the
  /// switchover's own discard set (rule 3) holds only what the guest writes after this call.
  RangeList take_stale_sent() noexcept;
  /// For a peer without local fill: makes hinted, unsent, clean pages dirty (D |= H & ~S) so the
  /// background scan pushes them; returns how many.
  std::size_t dirty_hinted_unsent() noexcept;
  /// Recovery after a broken channel (docs/design.md "Recovery"): `received` is the destination's R
  /// (same size, else invalid_argument). Every page not received becomes dirty and unsent again,
  /// except, when `local_fill`, pages the destination fills itself (H, not D, not S). Returns how
  /// many pages were not received and are now queued again.
  std::size_t resync_with_received(const PageBitmap& received, bool local_fill);
  SyncCounters sync_counters() const noexcept;
  /// Ends dirty tracking now: the region is ordinary memory again (rule 9) while the bitmaps stay
  /// readable; later syncs find nothing. Serialised with sync(); idempotent.
  void stop_tracking() noexcept;
  /// The sync, scanner and balloon counters.
  SourceCounters counters() const noexcept;
  /// Counts the scanner's requests and takes into `t` from now on (see PageScanner::set_timeline);
  /// the Source keeps it alive. Once: a second call throws std::logic_error.
  void set_timeline(std::shared_ptr<Timeline> t);
  /// The timeline set_timeline gave, or null.
  const std::shared_ptr<Timeline>& timeline() const noexcept { return timeline_; }

  /// The first extent of [first, first + n) (n > 0): its length in pages, with `hole` set when the
  /// memory's file holds none of them (another process's memfd: such pages read as zero, and
  /// reading them through the mapping would allocate them in the process's memfd, so they go as
  /// ZERO runs unread). Memory without such a file is one extent that is not a hole. Never throws:
  /// when the file cannot tell, the pages count as data (read and sent).
  std::uint64_t extent(std::uint64_t first, std::uint64_t n, bool& hole) const noexcept;
  /// Pages extent() reported as holes (and the session sent unread).
  std::uint64_t hole_pages() const noexcept { return hole_pages_.load(std::memory_order_relaxed); }

 private:
  struct Region {
    Mapping mapping;
    UniqueFd memfd;
    std::uint8_t* base = nullptr;
  };
  static Region make_region(std::size_t npages, Backing backing, std::size_t page_size);
  Source(Region region, std::size_t npages, TrackMode mode, std::size_t page_size);
  Source(Region region, std::size_t npages, const RemoteMemory& remote, std::size_t page_size);

  Mapping mapping_;  // empty when adopted
  UniqueFd memfd_;
  std::uint8_t* base_;
  std::size_t npages_;
  std::size_t ps_;
  std::shared_ptr<PageBitmap> dirty_, sent_, hinted_;
  DirtyTracker tracker_;
  HintSink hints_;
  PageScanner scanner_;
  std::mutex sync_mu_;
  std::atomic<std::uint64_t> syncs_{0}, pages_written_{0};
  std::shared_ptr<Timeline> timeline_;  // the scanner points at it (no take runs once the Source goes)
  // Another process's memfd (reopened: an offset of livemig's own) and the region's offset in
  // it: extent()'s holes.
  UniqueFd holes_fd_;
  std::uint64_t holes_offset_ = 0;
  mutable std::atomic<std::uint64_t> hole_pages_{0};
};

}  // namespace livemig
