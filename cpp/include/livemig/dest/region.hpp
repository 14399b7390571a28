// The destination side of postcopy: a region of guest memory, its received/requested bitmaps, the
// placement engine (UFFDIO_COPY / ZEROPAGE / MOVE) and the fault thread.
//
// Life cycle:
//   precopy   the region is plain memory, not registered with userfaultfd. place() memcpy()s (and
//             overwrites: precopy resends dirtied pages) and marks the pages received; a receiver
//             that writes into data() itself calls mark_received().
//   postcopy  start_postcopy() registers the whole region in MISSING mode and starts the fault
//             thread. place() now follows rule 1: it checks `received` first, drops and counts pages
//             already there, and places the rest with UFFDIO_COPY (which never overwrites: EEXIST).
//   stopped   stop() unregisters (the kernel wakes every waiter; a page still missing then reads as
//             zero), joins the fault thread. Placement afterwards throws.
//
// Remote regions (another process's memory, docs/attach.md): the bytes are written through livemig's
// mapping of the process's memfd in precopy; from start_postcopy on, placement goes only through the
// process's userfaultfd (registered MISSING by the process) at the process's addresses, discards
// punch holes in the memfd, and stop() leaves the registration to the process.
//
// Page units everywhere (page = 4 KiB base page; huge pages are not supported: hugetlb mappings fail
// registration with UnsupportedError, and owned anonymous regions are madvise(MADV_NOHUGEPAGE)).
//
// Threads: place*, discard, mark_received, set_local_fill and the counters may be called from any
// number of threads at once; start_postcopy/stop/set_request_sink from one controlling thread.
// The fault thread never calls into Python.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "livemig/base/fd.hpp"
#include "livemig/base/latency_histogram.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/base/page_range.hpp"
#include "livemig/base/remote.hpp"
#include "livemig/base/userfaultfd.hpp"
#include "livemig/dest/prefault.hpp"

namespace livemig {

/// Where the fault thread sends page requests (the wire issue implements one that sends a request
/// frame to the source). Called on the fault thread, without the GIL; must not block for long and
/// must not throw.
struct RequestSink {
  virtual ~RequestSink() = default;
  /// Pages [first_page, first_page + npages) were faulted on and are neither received nor requested.
  virtual void request(std::uint64_t first_page, std::uint32_t npages) noexcept = 0;
};

/// The default sink: a queue that Python and tests drain.
class RequestQueue final : public RequestSink {
 public:
  void request(std::uint64_t first_page, std::uint32_t npages) noexcept override;
  /// Takes every queued request, oldest first.
  std::vector<PageRange> drain();
  /// Waits until a request is queued or `timeout_ns` passes (or close() is called); true when one is.
  bool wait(std::int64_t timeout_ns);
  /// Wakes every wait() for good.
  void close();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<PageRange> q_;
  bool closed_ = false;
};

/// The postcopy latencies a DestRegion keeps (one histogram each).
enum class LatencyMeasure {
  fault,    ///< fault event read to its page placed: one sample per page a fault waited on
  request,  ///< request handed to the sink (sent) to the page placed: one sample per requested page
  blocked,  ///< faulting thread blocked, fault event read to its wake (placement or UFFDIO_WAKE):
            ///< one sample per fault event, stale and locally filled ones included
};

/// A snapshot of the destination's counters (pages unless named otherwise).
struct DestCounters {
  std::uint64_t faults = 0;          // fault events read (one per faulting thread and page)
  std::uint64_t requests = 0;        // request() calls made to the sink
  std::uint64_t requested_pages = 0; // pages in those requests
  std::uint64_t placed = 0;          // pages placed with data (COPY / MOVE / precopy memcpy)
  std::uint64_t zero = 0;            // pages placed as zero pages
  std::uint64_t local_fills = 0;     // faults resolved on the spot from the local-fill set
  std::uint64_t filled = 0;          // pages placed with a non-zero fill pattern
  std::uint64_t duplicates = 0;      // pages dropped because already received
  std::uint64_t eexist = 0;          // pages the kernel already had (EEXIST): marked received
  std::uint64_t eagain = 0;          // placement retries after EAGAIN
  std::uint64_t removed = 0;         // pages that lost their received bit to REMOVE/UNMAP events
  std::uint64_t discarded = 0;       // pages dropped by discard()
  std::uint64_t stale_faults = 0;    // fault events for pages already placed (woken, nothing else)
  std::uint64_t errors = 0;          // exceptions caught on the fault thread
  std::uint64_t placed_twice = 0;    // postcopy placements of a page already placed in this postcopy
                                     // (or present when it started): rule 1 says never (a page the
                                     // guest zapped and that arrived again counts too)
  bool operator==(const DestCounters&) const = default;
};

/// Which placement the fault thread and place() use for runs of data pages.
enum class PlaceMode { copy, move };

class DestRegion {
 public:
  enum class State { precopy, postcopy, stopped };

  /// A new anonymous private region of `bytes` (a multiple of `page_size` > 0); memfd=true makes it
  /// shared memory (a memfd). Throws std::invalid_argument for a bad size, UnsupportedError for a
  /// page size this build cannot place (check_page_size), KernelError for mmap.
  DestRegion(std::size_t bytes, bool memfd, std::size_t page_size);
  /// Adopts memory the caller keeps mapped for this object's lifetime (page-aligned, page-multiple).
  DestRegion(void* addr, std::size_t bytes, std::size_t page_size);
  /// Another process's memory: `local` is livemig's read-write mapping of the process's memfd
  /// (kept mapped by the caller for this object's lifetime); `remote` says where the process has
  /// it and gives its userfaultfd (registered MISSING, MISSING_SHMEM) and memfd (duplicated here;
  /// its pagemap is not used: a page is present when the memfd holds it). Throws like the adopting
  /// constructor, KernelError("dup").
  DestRegion(void* local, std::size_t bytes, std::size_t page_size, const RemoteMemory& remote);
  DestRegion(const DestRegion&) = delete;
  DestRegion& operator=(const DestRegion&) = delete;
  /// Stops (wakes every waiter, unregisters, joins) and unmaps an owned region.
  ~DestRegion();

  /// The region's first byte (reading a missing page in postcopy blocks until it is placed).
  std::uint8_t* data() const noexcept { return base_; }
  /// Size in bytes, pages, and the page size.
  std::size_t bytes() const noexcept { return bytes_; }
  std::size_t pages() const noexcept { return pages_; }
  std::size_t page_bytes() const noexcept { return ps_; }
  /// True for an owned memfd (shared memory) region.
  bool is_memfd() const noexcept { return memfd_; }
  /// True for another process's memory (the remote constructor).
  bool is_remote() const noexcept { return remote_; }
  /// precopy, postcopy or stopped.
  State state() const noexcept { return state_.load(std::memory_order_acquire); }
  /// R: set only after a page was placed (or the kernel said EEXIST); cleared by discard/REMOVE.
  const std::shared_ptr<PageBitmap>& received() const noexcept { return received_; }
  /// Pages requested from the sink and not yet placed.
  const std::shared_ptr<PageBitmap>& requested() const noexcept { return requested_; }
  /// Pages the fault thread resolves itself (set_local_fill).
  const std::shared_ptr<PageBitmap>& local_fill() const noexcept { return local_fill_; }
  /// The local-fill value (a 32-bit pattern; 0 = zero page).
  std::uint32_t local_fill_value() const noexcept { return fill_value_.load(std::memory_order_acquire); }

  /// Replaces the request sink (default: the internal RequestQueue). Only before start_postcopy.
  void set_request_sink(std::shared_ptr<RequestSink> sink);
  /// The internal queue (drained by Python and tests; unused when another sink is set).
  RequestQueue& queue() noexcept { return *queue_; }

  /// Registers the region in MISSING mode (a remote region: takes the process's registration) and
  /// starts the fault thread. Throws UnsupportedError when
  /// the kernel or the mapping kind cannot do it (the message names what), std::logic_error when
  /// not in precopy.
  void start_postcopy();
  /// Unregisters (the kernel wakes every waiter; missing pages then read as zero) and joins the
  /// fault thread. Idempotent.
  void stop() noexcept;

  /// Places `npages` pages from `src` at `first_page` and returns how many it placed. Postcopy:
  /// pages already received are dropped and counted; the rest go in with UFFDIO_COPY (partial
  /// copies continue, EAGAIN retries, EEXIST marks received and wakes). Precopy: memcpy, overwriting.
  /// Throws std::out_of_range, KernelError("copy") on any other kernel error, livemig::Error when stopped.
  std::size_t place(std::uint64_t first_page, std::size_t npages, const void* src);
  /// Like place(), with UFFDIO_MOVE: remaps the pages of the page-aligned anonymous `staging` buffer
  /// into the region (they leave holes in `staging`; dropped pages stay). Postcopy, anonymous
  /// regions only; throws UnsupportedError without the MOVE feature.
  std::size_t place_move(std::uint64_t first_page, std::size_t npages, void* staging);
  /// Places zero pages (UFFDIO_ZEROPAGE); same rules as place(). Returns pages placed.
  std::size_t place_zero(std::uint64_t first_page, std::size_t npages);
  /// Places pages filled with the 32-bit `pattern` repeated (0: zero pages). Returns pages placed.
  std::size_t place_fill(std::uint64_t first_page, std::size_t npages, std::uint32_t pattern);
  /// Marks pages received that the caller wrote into data() itself (precopy only).
  void mark_received(std::uint64_t first_page, std::size_t npages);

  /// Marks `runs` as local-fill pages: a fault on one is resolved by the fault thread with a page
  /// of `value` (0: zero page) and no request. One value per region: the last call's wins.
  void set_local_fill(std::span<const PageRange> runs, std::uint32_t value);
  /// Drops `runs` (MADV_DONTNEED; MADV_REMOVE for shared memory) and clears their received bits
  /// (rule 3, before the guest runs); returns how many were received. In postcopy it returns only
  /// after the fault thread has handled the REMOVE events it caused. Must not race placement of
  /// the same pages (at switchover it does not: the guest is stopped, the stream is ordered).
  /// A REMOVE by the guest itself that races a placement of the page can leave the page present
  /// with R clear (a later placement then gets EEXIST: R set, counted) or absent with R set (the
  /// next fault sees that through /proc/self/pagemap, clears R and requests it): never a page
  /// placed twice or over guest data.
  std::size_t discard(std::span<const PageRange> runs);

  /// Keeps a digest of every page as it is placed from now on (base/digest.hpp): the content each
  /// placement put there, so the generic oracle can compare the region as of the switchover with the
  /// source's while the guest here runs on. Call before anything is placed (precopy, no placement
  /// yet); idempotent. Receivers that write into data() themselves call wrote_in_place().
  void enable_digests();
  /// The digest table (one per page, kNoDigest for a page holding nothing placed), or an empty span
  /// when digests are off. Read it once placement is over.
  std::span<const std::uint64_t> digests() const noexcept;
  /// Precopy: the caller wrote pages [first, first + n) into data() itself (a receiver reading a
  /// frame straight into place): records their digests when enabled and tells the prefault where
  /// the receivers are. Any thread; pages written by one thread at a time.
  void wrote_in_place(std::uint64_t first, std::size_t n) noexcept;

  // ---- the prefault (dest/prefault.hpp; these four are defined in prefault.cpp) ----
  /// Starts populating the region ahead of the precopy receivers (threads and distance chosen by
  /// measuring). Precopy, before any page arrived, once. For memory this object owns, or whose
  /// pages not received may read as zero (settle_prefault drops them).
  void start_prefault(PrefaultOptions opts = {});
  /// Asks the prefault threads to end without waiting for them (precopy is complete: every page
  /// that matters arrived, and the caller is inside the downtime); stop() joins them. Any thread.
  void stop_prefault() noexcept;
  /// Before postcopy (COMMAND 1, and start_postcopy in case it did not come): stops the prefault
  /// and makes every page it may have populated that was not received missing again, so a fault
  /// asks for it or fills it locally. Returns the pages dropped; later calls return 0. Same
  /// contract as discard() (no placement of those pages meanwhile).
  std::size_t settle_prefault();
  /// What the prefault did (all zero when it never ran).
  PrefaultStats prefault_stats() const;

  /// A snapshot of the counters.
  DestCounters counters() const noexcept;
  /// One of the postcopy latency histograms (see LatencyMeasure).
  const LatencyHistogram& latency(LatencyMeasure m) const noexcept;
  /// Clears the three latency histograms (not atomic against faults being timed meanwhile).
  void reset_latency() noexcept;
  /// The last error the fault thread caught ("" when none).
  std::string last_error() const;
  /// The features negotiated on the userfaultfd (0 before start_postcopy).
  std::uint64_t uffd_features() const noexcept { return uffd_.features(); }

 private:
  struct Counters {
    std::atomic<std::uint64_t> faults{0}, requests{0}, requested_pages{0}, placed{0}, zero{0}, local_fills{0},
        filled{0}, duplicates{0}, eexist{0}, eagain{0}, removed{0}, discarded{0}, stale_faults{0}, errors{0},
        placed_twice{0};
  };
  enum class Op { copy, zero, move };

  void check_run(std::uint64_t first, std::size_t n) const;
  void require_placing() const;
  std::size_t place_impl(Op op, std::uint64_t first, std::size_t n, const std::uint8_t* src, std::uint64_t move_src);
  std::size_t place_run(Op op, std::uint64_t first, std::size_t n, const std::uint8_t* src, std::uint64_t move_src);
  void placed_pages(std::uint64_t first, std::size_t n) noexcept;
  // A placement put [first, first + n) in: digests from `digests` (or none), the placed-twice count.
  void note_placed(std::uint64_t first, std::size_t n, const std::uint64_t* digests) noexcept;
  void store_digests(std::uint64_t first, std::size_t n, const std::uint8_t* src) noexcept;
  void on_eagain();
  const std::uint8_t* fill_pages(std::uint32_t pattern, std::size_t n);

  void fault_loop() noexcept;
  void read_events();
  void handle_fault(std::uint64_t page, std::uint64_t now, std::vector<std::uint64_t>& to_request);
  void handle_remove(std::uint64_t start, std::uint64_t end) noexcept;
  // Stamps pages [first, first + n) as requested now, just before the request goes out.
  void stamp_request(std::uint64_t first, std::size_t n) noexcept;
  bool page_present(std::uint64_t page) const noexcept;
  void note_error(const std::exception& e) noexcept;

  Mapping owned_;
  UniqueFd memfd_fd_;
  std::uint8_t* base_ = nullptr;
  // The region's first byte as the kernel knows it (UFFDIO_*, fault messages, pagemap): base_, or
  // the other process's address for a remote region.
  std::uint64_t kaddr_ = 0;
  std::size_t bytes_ = 0;
  std::size_t pages_ = 0;
  std::size_t ps_ = 0;
  bool memfd_ = false;
  // Remote regions: the process's descriptors (duplicates), taken over by start_postcopy.
  bool remote_ = false;
  UniqueFd remote_uffd_, remote_memfd_;
  std::uint64_t remote_uffd_features_ = 0, remote_memfd_offset_ = 0;
  // Remote discards: punches the runs out of the process's memfd.
  void punch_holes(std::span<const PageRange> runs);

  std::shared_ptr<PageBitmap> received_;
  std::shared_ptr<PageBitmap> requested_;
  std::shared_ptr<PageBitmap> local_fill_;
  std::atomic<std::uint32_t> fill_value_{0};
  // Pages placed since postcopy started (R at the start included): a second placement is counted.
  PageBitmap placed_pc_;
  // The digest table (enable_digests): words on their own mapping, written through atomic_ref
  // (relaxed: each page has one placer at a time, the table is read once placement is over).
  Mapping digests_map_;
  std::uint64_t* digests_ = nullptr;
  std::uint64_t zero_digest_ = 0;
  // Per page: when the first still-unresolved fault on it was read (ns, steady clock, low 56 bits)
  // and how many fault events are waiting on it (top 8 bits). 0 = no fault pending.
  // Words on their own anonymous mapping (zero until touched, so made with the region for free and
  // not zeroed inside the switchover), accessed through std::atomic_ref; null until postcopy.
  Mapping fault_ts_map_;
  std::uint64_t* fault_ts_ = nullptr;
  // Per page: when its request was handed to the sink (ns, as fault_ts_), 0 when none is pending;
  // same kind of mapping, touched only for requested pages.
  Mapping request_ts_map_;
  std::uint64_t* request_ts_ = nullptr;
  std::atomic<std::uint64_t> order_{0};  // RMW'd by placers and the fault thread as a store-load fence

  std::atomic<State> state_{State::precopy};
  Userfaultfd uffd_;
  std::uint64_t ioctls_ = 0;
  UniqueFd stop_fd_;
  std::thread fault_thread_;
  std::atomic<std::thread::id> fault_tid_{};
  std::mutex stop_mu_;

  std::shared_ptr<RequestQueue> queue_;
  std::shared_ptr<RequestSink> sink_;
  // Fault events read but not handled yet, as (address, time read): the fault thread's own queue
  // (read_events may run inside a placement that hit EAGAIN).
  std::vector<std::pair<std::uint64_t, std::uint64_t>> deferred_;
  UniqueFd pagemap_;

  // Event reads, for discard() to wait until the fault thread has handled the REMOVE event its
  // madvise caused (the kernel lets madvise return once the event is read, not handled).
  std::atomic<std::uint64_t> reads_started_{0}, reads_done_{0};
  std::atomic<int> read_waiters_{0};
  std::mutex read_mu_;
  std::condition_variable read_cv_;
  void wait_events_handled();

  // The prefault (start_prefault): set once in precopy before the receivers start (their creation
  // orders it), then only stopped; destroyed with the region (stop() joins its threads first).
  std::unique_ptr<Prefault> prefault_;
  std::atomic<bool> prefault_settled_{false};

  Counters c_;
  LatencyHistogram fault_hist_, request_hist_, blocked_hist_;
  mutable std::mutex err_mu_;
  std::string last_error_;
};

}  // namespace livemig
