#include "livemig/dest/region.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "livemig/base/digest.hpp"
#include "livemig/base/errors.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/base/uapi.hpp"

namespace livemig {
namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
// fault_ts_ packing: low 56 bits a timestamp (ns since the region was made, + 1 so it is never 0),
// top 8 bits the number of fault events waiting (saturating at 255).
constexpr std::uint64_t kTsMask = (std::uint64_t{1} << 56) - 1;
constexpr std::uint64_t kWaiter = std::uint64_t{1} << 56;
constexpr std::size_t kFillChunk = 64;  // pages in a fill buffer
constexpr std::size_t kMsgBatch = 64;   // fault events read per read()

std::uint64_t mono_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ULL + static_cast<std::uint64_t>(ts.tv_nsec);
}

const std::uint64_t g_t0 = mono_ns();
std::uint64_t rel_ns() noexcept { return mono_ns() - g_t0 + 1; }

struct FreeDeleter {
  void operator()(std::uint8_t* p) const noexcept { std::free(p); }
};

// A per-thread buffer of kFillChunk pages holding one 32-bit pattern.
struct FillBuffer {
  std::unique_ptr<std::uint8_t, FreeDeleter> buf;
  std::uint32_t pattern = 0;
  bool valid = false;
};

}  // namespace

// ---- RequestQueue ----

void RequestQueue::request(std::uint64_t first_page, std::uint32_t npages) noexcept {
  try {
    {
      std::lock_guard lk(mu_);
      q_.push_back({first_page, npages});
    }
    cv_.notify_one();
  } catch (...) {
    // Allocation failure: nothing sensible to do on the fault thread; the page stays requested and
    // the faulting thread waits for a background push.
  }
}

std::vector<PageRange> RequestQueue::drain() {
  std::lock_guard lk(mu_);
  std::vector<PageRange> out;
  out.swap(q_);
  return out;
}

bool RequestQueue::wait(std::int64_t timeout_ns) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, std::chrono::nanoseconds(timeout_ns), [&] { return !q_.empty() || closed_; });
  return !q_.empty();
}

void RequestQueue::close() {
  {
    std::lock_guard lk(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

// ---- DestRegion: construction ----

DestRegion::DestRegion(std::size_t bytes, bool memfd, std::size_t page_size) : ps_(page_size), placed_pc_(0) {
  check_page_size(ps_);
  if (bytes == 0 || bytes % ps_ != 0)
    throw std::invalid_argument("region size must be a positive multiple of the page size (" + std::to_string(ps_) +
                                "), got " + std::to_string(bytes));
  if (memfd) {
    owned_ = Mapping::memfd(bytes, "livemig-dest", memfd_fd_);
  } else {
    owned_ = Mapping::anonymous(bytes);
    // Base pages only: UFFDIO_COPY places 4 KiB pages, and a THP made during precopy would be split
    // by the first discard anyway. Advisory: failure changes nothing that matters.
    (void)::madvise(owned_.data(), bytes, MADV_NOHUGEPAGE);
  }
  base_ = owned_.data();
  kaddr_ = reinterpret_cast<std::uintptr_t>(base_);
  bytes_ = bytes;
  pages_ = bytes / ps_;
  memfd_ = memfd;
  received_ = std::make_shared<PageBitmap>(pages_);
  requested_ = std::make_shared<PageBitmap>(pages_);
  local_fill_ = std::make_shared<PageBitmap>(pages_);
  placed_pc_ = PageBitmap(pages_);
  // Reserved now, zero and untouched until a fault stamps it (first touch is slow, start_postcopy is
  // inside the switchover).
  fault_ts_map_ = Mapping::zeroed_words(pages_);
  request_ts_map_ = Mapping::zeroed_words(pages_);
  queue_ = std::make_shared<RequestQueue>();
  sink_ = queue_;
}

DestRegion::DestRegion(void* addr, std::size_t bytes, std::size_t page_size) : ps_(page_size), placed_pc_(0) {
  check_page_size(ps_);
  if (bytes == 0 || bytes % ps_ != 0)
    throw std::invalid_argument("region size must be a positive multiple of the page size (" + std::to_string(ps_) +
                                "), got " + std::to_string(bytes));
  if (reinterpret_cast<std::uintptr_t>(addr) % ps_ != 0)
    throw std::invalid_argument("region address must be page aligned");
  base_ = static_cast<std::uint8_t*>(addr);
  kaddr_ = reinterpret_cast<std::uintptr_t>(base_);
  bytes_ = bytes;
  pages_ = bytes / ps_;
  received_ = std::make_shared<PageBitmap>(pages_);
  requested_ = std::make_shared<PageBitmap>(pages_);
  local_fill_ = std::make_shared<PageBitmap>(pages_);
  placed_pc_ = PageBitmap(pages_);
  // Reserved now, zero and untouched until a fault stamps it (first touch is slow, start_postcopy is
  // inside the switchover).
  fault_ts_map_ = Mapping::zeroed_words(pages_);
  request_ts_map_ = Mapping::zeroed_words(pages_);
  queue_ = std::make_shared<RequestQueue>();
  sink_ = queue_;
}

DestRegion::DestRegion(void* local, std::size_t bytes, std::size_t page_size, const RemoteMemory& remote)
    : DestRegion(local, bytes, page_size) {
  if (remote.addr % ps_ != 0) throw std::invalid_argument("the process's region address must be page aligned");
  kaddr_ = remote.addr;
  remote_ = true;
  remote_uffd_ = dup_fd(remote.uffd, "the process's userfaultfd");
  remote_uffd_features_ = remote.uffd_features;
  remote_memfd_ = dup_fd(remote.memfd, "the process's memfd");
  remote_memfd_offset_ = remote.memfd_offset;
}

DestRegion::~DestRegion() { stop(); }

void DestRegion::set_request_sink(std::shared_ptr<RequestSink> sink) {
  std::lock_guard lk(stop_mu_);
  if (state() != State::precopy) throw std::logic_error("set_request_sink: only before start_postcopy");
  sink_ = sink ? std::move(sink) : std::shared_ptr<RequestSink>(queue_);
}

// ---- start / stop ----

void DestRegion::start_postcopy() {
  settle_prefault();  // prefault hook: pages not received must be missing before registration
  std::lock_guard lk(stop_mu_);
  if (state() != State::precopy) throw std::logic_error("start_postcopy: the region is not in precopy");
  if (remote_) {
    // The process registered its mapping in MISSING mode (MISSING_SHMEM) when it attached and
    // never reads its userfaultfd while attached: the fault thread reads it from here on.
    if ((remote_uffd_features_ & UFFD_FEATURE_MISSING_SHMEM) == 0)
      throw UnsupportedError("MISSING_SHMEM", "the process's userfaultfd was not opened with MISSING_SHMEM");
    UniqueFd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!efd) throw_errno("eventfd", "fault thread stop signal");
    fault_ts_ = reinterpret_cast<std::uint64_t*>(fault_ts_map_.data());
    request_ts_ = reinterpret_cast<std::uint64_t*>(request_ts_map_.data());
    placed_pc_.reset();
    placed_pc_.or_with(*received_);
    uffd_ = Userfaultfd::adopt(std::move(remote_uffd_), remote_uffd_features_);
    // A shmem range registered MISSING allows these (UFFDIO_MOVE is refused into shmem).
    ioctls_ = (std::uint64_t{1} << _UFFDIO_COPY) | (std::uint64_t{1} << _UFFDIO_ZEROPAGE) |
              (std::uint64_t{1} << _UFFDIO_WAKE);
    stop_fd_ = std::move(efd);
    state_.store(State::postcopy, std::memory_order_release);
    fault_thread_ = std::thread([this] { fault_loop(); });
    return;
  }
  // REMOVE and UNMAP events keep `received` true when pages are dropped under us; shmem needs
  // MISSING_SHMEM (asked for only as optional: registration names the problem if it is missing).
  Userfaultfd u = Userfaultfd::open(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP,
                                    UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MOVE, true);
  if (memfd_ && !u.has(UFFD_FEATURE_MISSING_SHMEM))
    throw UnsupportedError("MISSING_SHMEM", "this kernel's userfaultfd cannot handle missing faults on shared memory");
  const std::uint64_t ioctls = u.register_range(base_, bytes_, UFFDIO_REGISTER_MODE_MISSING);
  if ((ioctls & (std::uint64_t{1} << _UFFDIO_COPY)) == 0) {
    u.unregister_range(base_, bytes_);
    throw UnsupportedError("UFFDIO_COPY", "the region does not allow UFFDIO_COPY (unsupported mapping kind)");
  }
  UniqueFd efd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!efd) {
    const int err = errno;
    u.unregister_range(base_, bytes_);
    errno = err;
    throw_errno("eventfd", "fault thread stop signal");
  }
  fault_ts_ = reinterpret_cast<std::uint64_t*>(fault_ts_map_.data());
  request_ts_ = reinterpret_cast<std::uint64_t*>(request_ts_map_.data());
  // Every page present now counts as placed: a postcopy placement of one would be its second.
  placed_pc_.reset();
  placed_pc_.or_with(*received_);
  pagemap_.reset(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));  // -1 is tolerated (see page_present)
  uffd_ = std::move(u);
  ioctls_ = ioctls;
  stop_fd_ = std::move(efd);
  state_.store(State::postcopy, std::memory_order_release);
  fault_thread_ = std::thread([this] { fault_loop(); });
}

void DestRegion::stop() noexcept {
  if (prefault_) prefault_->stop();  // prefault hook: its threads touch the region; joined first
  std::lock_guard lk(stop_mu_);
  const State prev = state_.exchange(State::stopped, std::memory_order_acq_rel);
  if (prev == State::postcopy) {
    // Unregister first, while the fault thread still reads events (a madvise waiting for its
    // REMOVE event to be read must not hang); the kernel wakes every waiter in the range. A remote
    // region's registration is the process's: it unregisters on COMPLETE, or keeps it when pages
    // are missing (docs/attach.md), so it is left alone here.
    try {
      if (!remote_) uffd_.unregister_range(base_, bytes_);
    } catch (const std::exception& e) {
      note_error(e);
    }
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
    if (fault_thread_.joinable()) fault_thread_.join();
    // Closing the fd releases anything still waiting for an event to be read.
    uffd_ = Userfaultfd{};
    stop_fd_.reset();
  }
  queue_->close();
}

// ---- placement ----

void DestRegion::check_run(std::uint64_t first, std::size_t n) const {
  if (first > pages_ || n > pages_ - first)
    throw std::out_of_range("pages [" + std::to_string(first) + ", " + std::to_string(first + n) +
                            ") out of range [0, " + std::to_string(pages_) + ")");
}

void DestRegion::require_placing() const {
  if (state() == State::stopped) throw Error("destination region is stopped: no more placement");
}

void DestRegion::mark_received(std::uint64_t first_page, std::size_t npages) {
  check_run(first_page, npages);
  if (state() != State::precopy)
    throw std::logic_error("mark_received: only in precopy (in postcopy, place pages with place())");
  received_->set_range(first_page, first_page + npages);
}

void DestRegion::placed_pages(std::uint64_t first, std::size_t n) noexcept {
  received_->set_range(first, first + n);
  if (fault_ts_) {
    // Pairs with handle_fault: we set R then read the fault stamp, it writes the stamp then reads
    // R. Both sides do an acq_rel RMW on order_ in between (a fence TSan understands): whichever
    // RMW comes second synchronises with the first, so at least one side sees the other's write
    // and a fault is never left untimed (at most one side takes the stamp: exchange).
    order_.fetch_add(1, std::memory_order_acq_rel);
    std::uint64_t now = 0;
    for (std::size_t p = first; p < first + n; ++p) {
      std::atomic_ref<std::uint64_t> ts(fault_ts_[p]);
      if (ts.load(kRelaxed) == 0) continue;
      const std::uint64_t v = ts.exchange(0, std::memory_order_acq_rel);
      if (v == 0) continue;
      if (now == 0) now = rel_ns();
      const std::uint64_t t = v & kTsMask, d = now > t ? now - t : 0;
      fault_hist_.record(d);
      blocked_hist_.record(d, v >> 56);  // each waiting thread was blocked that long (the first at least)
    }
  }
  // After R: a fault event read in between sees R set and sends no request.
  if (requested_->count(first, first + n) != 0) {
    if (request_ts_ != nullptr) {
      // Pairs with stamp_request like the fault stamps above (the same order_ RMW fences our R
      // store from these loads): at most one side takes each stamp.
      std::uint64_t now = 0;
      for (std::size_t p = first; p < first + n; ++p) {
        if (!requested_->test(p)) continue;
        std::atomic_ref<std::uint64_t> ts(request_ts_[p]);
        if (ts.load(kRelaxed) == 0) continue;
        const std::uint64_t t = ts.exchange(0, std::memory_order_acq_rel);
        if (t == 0) continue;
        if (now == 0) now = rel_ns();
        request_hist_.record(now > t ? now - t : 0);
      }
    }
    requested_->clear_range(first, first + n);
  }
}

void DestRegion::stamp_request(std::uint64_t first, std::size_t n) noexcept {
  const std::uint64_t t = rel_ns();
  for (std::size_t p = first; p < first + n; ++p) std::atomic_ref<std::uint64_t>(request_ts_[p]).store(t, kRelaxed);
  // Pairs with placed_pages (stamp written, then R read): a page placed before its request went
  // out takes its stamp back here, so no stamp outlives its page's placement.
  order_.fetch_add(1, std::memory_order_acq_rel);
  for (std::size_t p = first; p < first + n; ++p)
    if (received_->test(p)) std::atomic_ref<std::uint64_t>(request_ts_[p]).exchange(0, std::memory_order_acq_rel);
}

const LatencyHistogram& DestRegion::latency(LatencyMeasure m) const noexcept {
  switch (m) {
    case LatencyMeasure::request:
      return request_hist_;
    case LatencyMeasure::blocked:
      return blocked_hist_;
    case LatencyMeasure::fault:
      break;
  }
  return fault_hist_;
}

void DestRegion::reset_latency() noexcept {
  fault_hist_.reset();
  request_hist_.reset();
  blocked_hist_.reset();
}

void DestRegion::note_placed(std::uint64_t first, std::size_t n, const std::uint64_t* digests) noexcept {
  if (digests != nullptr)
    for (std::size_t i = 0; i < n; ++i)
      std::atomic_ref<std::uint64_t>(digests_[first + i]).store(digests[i], kRelaxed);
  // UFFDIO_* never places over a present page, so a page placed twice was dropped in between (a
  // discard or a REMOVE after it was placed): rule 1 says that never happens in postcopy.
  if (const std::size_t again = placed_pc_.count(first, first + n); again != 0) c_.placed_twice.fetch_add(again, kRelaxed);
  placed_pc_.set_range(first, first + n);
}

void DestRegion::store_digests(std::uint64_t first, std::size_t n, const std::uint8_t* src) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t d = src == nullptr ? zero_digest_ : page_digest(src + i * ps_, ps_);
    std::atomic_ref<std::uint64_t>(digests_[first + i]).store(d, kRelaxed);
  }
}

void DestRegion::enable_digests() {
  std::lock_guard lk(stop_mu_);
  if (digests_ != nullptr) return;
  if (state() != State::precopy) throw std::logic_error("enable_digests: only before postcopy");
  std::vector<std::uint8_t> zero(ps_, 0);
  zero_digest_ = page_digest(zero.data(), ps_);
  digests_map_ = Mapping::zeroed_words(pages_);
  digests_ = reinterpret_cast<std::uint64_t*>(digests_map_.data());
}

std::span<const std::uint64_t> DestRegion::digests() const noexcept {
  if (digests_ == nullptr) return {};
  return {digests_, pages_};
}

void DestRegion::wrote_in_place(std::uint64_t first, std::size_t n) noexcept {
  if (prefault_) prefault_->arrived(first, n);  // prefault hook: where the receivers are
  if (digests_ == nullptr || first > pages_ || n > pages_ - first) return;
  store_digests(first, n, base_ + first * ps_);
}

void DestRegion::on_eagain() {
  c_.eagain.fetch_add(1, kRelaxed);
  // EAGAIN: a REMOVE/UNMAP/remap event is pending (mmap_changing). The fault thread must read it
  // itself (nobody else will); any other thread lets the fault thread run.
  if (fault_tid_.load(kRelaxed) == std::this_thread::get_id())
    read_events();
  else
    ::sched_yield();
}

std::size_t DestRegion::place_run(Op op, std::uint64_t first, std::size_t n, const std::uint8_t* src,
                                  std::uint64_t move_src) {
  // With digests on, the digest is of the bytes placed, never of the region (the woken guest may
  // write a page at once). A copy's source stays put, so its digests are taken after the ioctl, off
  // the faulting thread's wait; a move empties its staging pages, so those are digested before.
  thread_local std::vector<std::uint64_t> digests;
  const std::uint64_t* run_digests = nullptr;
  if (digests_ != nullptr && op != Op::copy) {
    digests.resize(n);
    if (op == Op::zero)
      std::fill(digests.begin(), digests.end(), zero_digest_);
    else
      page_digests(reinterpret_cast<const std::uint8_t*>(move_src), ps_, 0, n, digests.data());
    run_digests = digests.data();
  }
  std::size_t placed = 0;
  std::uint64_t page = first;
  const std::uint64_t end = first + n;
  while (page < end) {
    const std::uint64_t dst = kaddr_ + page * ps_;
    const std::uint64_t len = (end - page) * ps_;
    const std::uint64_t off = (page - first) * ps_;
    int rc = 0;
    std::int64_t done = 0;
    const char* what = "UFFDIO_COPY";
    if (op == Op::copy) {
      uffdio_copy a{};
      a.dst = dst;
      a.src = reinterpret_cast<std::uintptr_t>(src + off);
      a.len = len;
      a.mode = 0;  // wake waiters
      // UFFDIO_COPY: copy and map the pages atomically, then wake faulting threads in the range.
      rc = ::ioctl(uffd_.fd(), UFFDIO_COPY, &a);
      done = a.copy;
    } else if (op == Op::zero) {
      uffdio_zeropage a{};
      a.range.start = dst;
      a.range.len = len;
      a.mode = 0;
      what = "UFFDIO_ZEROPAGE";
      // UFFDIO_ZEROPAGE: map the shared zero page (anonymous) or a zeroed page (shmem) and wake.
      rc = ::ioctl(uffd_.fd(), UFFDIO_ZEROPAGE, &a);
      done = a.zeropage;
    } else {
      uffdio_move a{};
      a.dst = dst;
      a.src = move_src + off;
      a.len = len;
      a.mode = 0;
      what = "UFFDIO_MOVE";
      // UFFDIO_MOVE: remap the staging pages into the region (no copy), then wake.
      rc = ::ioctl(uffd_.fd(), UFFDIO_MOVE, &a);
      done = a.move;
    }
    if (rc == 0) done = static_cast<std::int64_t>(len);
    if (done > 0) {
      // Whole or partial: the first done bytes are in (and woken); continue where it stopped.
      const auto np = static_cast<std::size_t>(done) / ps_;
      placed_pages(page, np);  // R, the wake-up's timing: the faulting thread runs on from here
      if (digests_ != nullptr && op == Op::copy) {
        digests.resize(np);
        page_digests(src + off, ps_, 0, np, digests.data());
        run_digests = digests.data();
        note_placed(page, np, run_digests);
      } else {
        note_placed(page, np, run_digests == nullptr ? nullptr : run_digests + (page - first));
      }
      placed += np;
      page += np;
      continue;
    }
    const int err = errno;
    if (err == EAGAIN) {
      on_eagain();
      continue;
    }
    if (err == EEXIST) {
      // The page at `page` is already there: it counts as received; its waiters were not woken by
      // the failed ioctl, so wake them.
      placed_pages(page, 1);
      c_.eexist.fetch_add(1, kRelaxed);
      uffd_.wake_at(kaddr_ + page * ps_, ps_);
      page += 1;
      continue;
    }
    errno = err;
    throw_errno("place", std::string(what) + " of " + std::to_string(end - page) + " pages at page " +
                             std::to_string(page),
                dst, (page - first) * ps_);
  }
  return placed;
}

std::size_t DestRegion::place_impl(Op op, std::uint64_t first, std::size_t n, const std::uint8_t* src,
                                   std::uint64_t move_src) {
  check_run(first, n);
  require_placing();
  if (n == 0) return 0;
  if (state() == State::precopy) {
    if (op == Op::move) throw std::logic_error("place_move: only in postcopy");
    // Precopy: the destination guest has not run, so newer versions overwrite older ones.
    if (op == Op::zero)
      std::memset(base_ + first * ps_, 0, n * ps_);
    else
      std::memcpy(base_ + first * ps_, src, n * ps_);
    received_->set_range(first, first + n);
    if (digests_ != nullptr) store_digests(first, n, op == Op::zero ? nullptr : base_ + first * ps_);
    return n;
  }
  std::size_t placed = 0, dup = 0;
  if (n == 1) {
    if (received_->test(first))
      dup = 1;
    else
      placed = place_run(op, first, 1, src, move_src);
  } else {
    std::uint64_t i = first;
    const std::uint64_t end = first + n;
    while (i < end) {
      const std::size_t j = received_->find_next_clear(i, end);
      if (j == PageBitmap::npos) {
        dup += end - i;
        break;
      }
      dup += j - i;
      std::size_t k = received_->find_next_set(j, end);
      if (k == PageBitmap::npos) k = end;
      placed += place_run(op, j, k - j, src == nullptr ? nullptr : src + (j - first) * ps_,
                          move_src == 0 ? 0 : move_src + (j - first) * ps_);
      i = k;
    }
  }
  if (dup != 0) c_.duplicates.fetch_add(dup, kRelaxed);
  return placed;
}

std::size_t DestRegion::place(std::uint64_t first_page, std::size_t npages, const void* src) {
  const std::size_t placed = place_impl(Op::copy, first_page, npages, static_cast<const std::uint8_t*>(src), 0);
  c_.placed.fetch_add(placed, kRelaxed);
  return placed;
}

std::size_t DestRegion::place_move(std::uint64_t first_page, std::size_t npages, void* staging) {
  if (reinterpret_cast<std::uintptr_t>(staging) % ps_ != 0)
    throw std::invalid_argument("place_move: staging buffer must be page aligned");
  if (state() == State::postcopy && !uffd_.has(UFFD_FEATURE_MOVE))
    throw UnsupportedError("MOVE", "this kernel's userfaultfd lacks UFFDIO_MOVE (Linux 6.8)");
  if (memfd_ || remote_) throw UnsupportedError("MOVE", "UFFDIO_MOVE works on anonymous private regions only");
  const std::size_t placed =
      place_impl(Op::move, first_page, npages, nullptr, reinterpret_cast<std::uintptr_t>(staging));
  c_.placed.fetch_add(placed, kRelaxed);
  return placed;
}

std::size_t DestRegion::place_zero(std::uint64_t first_page, std::size_t npages) {
  std::size_t placed = 0;
  if (state() != State::postcopy || (ioctls_ & (std::uint64_t{1} << _UFFDIO_ZEROPAGE)) != 0) {
    placed = place_impl(Op::zero, first_page, npages, nullptr, 0);
  } else {
    // No UFFDIO_ZEROPAGE on this mapping kind: copy zero pages instead.
    check_run(first_page, npages);
    for (std::size_t done = 0; done < npages; done += kFillChunk) {
      const std::size_t k = std::min(kFillChunk, npages - done);
      placed += place_impl(Op::copy, first_page + done, k, fill_pages(0, k), 0);
    }
  }
  c_.zero.fetch_add(placed, kRelaxed);
  return placed;
}

const std::uint8_t* DestRegion::fill_pages(std::uint32_t pattern, std::size_t n) {
  thread_local FillBuffer fb;
  if (n > kFillChunk) throw std::logic_error("fill_pages: too many pages");
  if (!fb.buf) {
    fb.buf.reset(static_cast<std::uint8_t*>(std::aligned_alloc(ps_, kFillChunk * ps_)));
    if (!fb.buf) throw std::bad_alloc();
  }
  if (!fb.valid || fb.pattern != pattern) {
    auto* w = reinterpret_cast<std::uint32_t*>(fb.buf.get());
    std::fill(w, w + kFillChunk * ps_ / sizeof(std::uint32_t), pattern);
    fb.pattern = pattern;
    fb.valid = true;
  }
  return fb.buf.get();
}

std::size_t DestRegion::place_fill(std::uint64_t first_page, std::size_t npages, std::uint32_t pattern) {
  if (pattern == 0) return place_zero(first_page, npages);
  check_run(first_page, npages);
  std::size_t placed = 0;
  for (std::size_t done = 0; done < npages; done += kFillChunk) {
    const std::size_t k = std::min(kFillChunk, npages - done);
    placed += place_impl(Op::copy, first_page + done, k, fill_pages(pattern, k), 0);
  }
  c_.filled.fetch_add(placed, kRelaxed);
  return placed;
}

void DestRegion::set_local_fill(std::span<const PageRange> runs, std::uint32_t value) {
  for (const auto& r : runs) check_run(r.first, r.npages);
  // The value first: a fault thread that sees a bit must see its value (release/acquire).
  fill_value_.store(value, std::memory_order_release);
  for (const auto& r : runs) local_fill_->set_range(r.first, r.first + r.npages);
}

void DestRegion::wait_events_handled() {
  // Every event our madvise caused was read by a read() that has started by now; wait until that
  // many reads are handled (or the fault thread is gone).
  const std::uint64_t target = reads_started_.load(std::memory_order_seq_cst);
  read_waiters_.fetch_add(1, std::memory_order_seq_cst);
  {
    std::unique_lock lk(read_mu_);
    while (reads_done_.load(std::memory_order_seq_cst) < target && state() == State::postcopy)
      read_cv_.wait_for(lk, std::chrono::milliseconds(10));
  }
  read_waiters_.fetch_sub(1, std::memory_order_seq_cst);
}

namespace {

// Drops private anonymous pages with process_madvise(MADV_DONTNEED) on this process, up to 1024
// ranges a call, so the kernel (6.13 and later) batches the TLB flushes that one madvise() per
// range pays each time (a discard set is mostly single pages). Returns false, having dropped
// nothing, where the kernel does not take MADV_DONTNEED there; the caller then uses madvise().
bool drop_batched(std::uint8_t* base, std::size_t ps, std::span<const PageRange> runs) {
  std::vector<iovec> iov;
  iov.reserve(runs.size());
  for (const auto& r : runs)
    if (r.npages != 0) iov.push_back({base + r.first * ps, r.npages * ps});
  if (iov.empty()) return true;
  // pidfd_open(2) of ourselves: process_madvise(2) names its target by pidfd.
  UniqueFd self(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  if (!self) return false;
  constexpr std::size_t kMaxIov = 1024;  // UIO_MAXIOV
  for (std::size_t i = 0; i < iov.size(); i += kMaxIov) {
    const std::size_t n = std::min(kMaxIov, iov.size() - i);
    std::size_t want = 0;
    for (std::size_t k = i; k < i + n; ++k) want += iov[k].iov_len;
    // process_madvise(2): the same advice over every iovec; returns the bytes advised.
    const long rc = ::syscall(SYS_process_madvise, self.get(), iov.data() + i, n, MADV_DONTNEED, 0U);
    if (rc < 0 && i == 0 && (errno == EINVAL || errno == ENOSYS || errno == EPERM)) return false;
    if (rc < 0 || static_cast<std::size_t>(rc) != want) {
      // Part of this batch may be dropped: finish it range by range (dropping twice is harmless).
      for (std::size_t k = i; k < i + n; ++k)
        if (::madvise(iov[k].iov_base, iov[k].iov_len, MADV_DONTNEED) != 0)
          throw_errno("discard", "madvise of " + std::to_string(iov[k].iov_len / ps) + " pages",
                      reinterpret_cast<std::uintptr_t>(iov[k].iov_base));
    }
  }
  return true;
}

}  // namespace

std::size_t DestRegion::discard(std::span<const PageRange> runs) {
  for (const auto& r : runs) check_run(r.first, r.npages);
  // R first (so the REMOVE events below count only drops made by others), and again after the
  // drop, in case a placement hit EEXIST on a page in between and set it back.
  std::size_t was_received = 0;
  for (const auto& r : runs) {
    was_received += received_->count(r.first, r.first + r.npages);
    received_->clear_range(r.first, r.first + r.npages);
  }
  if (remote_) {
    punch_holes(runs);
  } else if (memfd_ || !drop_batched(base_, ps_, runs)) {
    for (const auto& r : runs) {
      if (r.npages == 0) continue;
      void* addr = base_ + r.first * ps_;
      const std::size_t len = r.npages * ps_;
      // Shared memory keeps pages in its page cache across MADV_DONTNEED: punch them out with
      // MADV_REMOVE. Private anonymous memory refuses MADV_REMOVE (EINVAL): MADV_DONTNEED drops it.
      // Either way a registered region sends us a REMOVE event (the fault thread clears R too).
      int rc = ::madvise(addr, len, MADV_REMOVE);
      if (rc != 0 && errno == EINVAL && !memfd_) rc = ::madvise(addr, len, MADV_DONTNEED);
      if (rc != 0) throw_errno("discard", "madvise of " + std::to_string(r.npages) + " pages at page " +
                                              std::to_string(r.first), reinterpret_cast<std::uintptr_t>(addr));
    }
  }
  for (const auto& r : runs) received_->clear_range(r.first, r.first + r.npages);
  if (digests_ != nullptr)
    for (const auto& r : runs)
      for (std::uint64_t p = r.first; p < r.first + r.npages; ++p)
        std::atomic_ref<std::uint64_t>(digests_[p]).store(kNoDigest, kRelaxed);
  // In postcopy the fault thread also clears R for the REMOVE events; make sure it has, so it
  // cannot clear a page placed after we return.
  // (A remote region's punched holes cause no REMOVE events: nothing to wait for.)
  if (state() == State::postcopy && !remote_ && fault_tid_.load(kRelaxed) != std::this_thread::get_id())
    wait_events_handled();
  c_.discarded.fetch_add(was_received, kRelaxed);
  return was_received;
}

void DestRegion::punch_holes(std::span<const PageRange> runs) {
  for (const auto& r : runs) {
    if (r.npages == 0) continue;
    const auto off = static_cast<off_t>(remote_memfd_offset_ + r.first * ps_);
    const auto len = static_cast<off_t>(r.npages * ps_);
    // fallocate(PUNCH_HOLE): drops the pages from the memfd and from every mapping of it (the
    // process's included), so its next touch faults (MISSING) and the page can be placed again.
    if (::fallocate(remote_memfd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) != 0)
      throw_errno("discard", "fallocate(PUNCH_HOLE) of " + std::to_string(r.npages) + " pages at page " +
                                 std::to_string(r.first));
  }
}

// ---- the fault thread ----

bool DestRegion::page_present(std::uint64_t page) const noexcept {
  if (remote_) {
    // Shared memory is present when the memfd holds the page, whatever the process's page table
    // says: a page livemig wrote through its own mapping (precopy), or one whose PTE the process
    // dropped, has no PTE there yet never faults again (and UFFDIO_COPY answers EEXIST). mincore()
    // on our mapping of the memfd reports the page cache without allocating anything.
    unsigned char in_core = 0;
    if (::mincore(base_ + page * ps_, ps_, &in_core) != 0) return true;  // cannot tell: stale
    return (in_core & 1) != 0;
  }
  if (!pagemap_) return true;  // cannot tell: assume the event is stale
  std::uint64_t entry = 0;
  const auto vpn = (kaddr_ + page * ps_) / ps_;
  if (::pread(pagemap_.get(), &entry, sizeof entry, static_cast<off_t>(vpn * sizeof entry)) !=
      static_cast<ssize_t>(sizeof entry))
    return true;
  return (entry >> 62) != 0;  // bit 63 present, bit 62 swapped
}

void DestRegion::note_error(const std::exception& e) noexcept {
  c_.errors.fetch_add(1, kRelaxed);
  try {
    std::lock_guard lk(err_mu_);
    last_error_ = e.what();
  } catch (...) {
  }
}

std::string DestRegion::last_error() const {
  std::lock_guard lk(err_mu_);
  return last_error_;
}

void DestRegion::handle_remove(std::uint64_t start, std::uint64_t end) noexcept {
  const std::uint64_t base = kaddr_;
  const std::uint64_t lo = std::max<std::uint64_t>(start, base);
  const std::uint64_t hi = std::min<std::uint64_t>(end, base + bytes_);
  if (lo >= hi) return;
  const std::uint64_t p0 = (lo - base) / ps_;
  const std::uint64_t p1 = (hi - base + ps_ - 1) / ps_;
  const std::size_t n = received_->count(p0, p1);
  received_->clear_range(p0, p1);
  c_.removed.fetch_add(n, kRelaxed);
}

void DestRegion::read_events() {
  std::array<uffd_msg, kMsgBatch> msgs{};
  // Counts this read as handled on every way out (see wait_events_handled).
  struct Done {
    DestRegion* self;
    ~Done() {
      self->reads_done_.fetch_add(1, std::memory_order_seq_cst);
      // seq_cst pairs with wait_events_handled: it bumps read_waiters_ then reads reads_done_.
      if (self->read_waiters_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard lk(self->read_mu_);
        self->read_cv_.notify_all();
      }
    }
  };
  for (;;) {
    reads_started_.fetch_add(1, std::memory_order_seq_cst);
    Done done{this};
    const ssize_t r = ::read(uffd_.fd(), msgs.data(), sizeof msgs);
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      throw_errno("read", "userfaultfd events");
    }
    const std::uint64_t now = rel_ns();
    const auto n = static_cast<std::size_t>(r) / sizeof(uffd_msg);
    for (std::size_t i = 0; i < n; ++i) {
      const uffd_msg& m = msgs[i];
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        deferred_.push_back({m.arg.pagefault.address, now});
      } else if (m.event == UFFD_EVENT_REMOVE) {
        // Removed pages are missing again: they lose R (and can be placed again).
        handle_remove(m.arg.remove.start, m.arg.remove.end);
      } else if (m.event == UFFD_EVENT_UNMAP) {
        handle_remove(m.arg.remove.start, m.arg.remove.end);
      }
    }
    if (n < kMsgBatch) return;
  }
}

void DestRegion::handle_fault(std::uint64_t page, std::uint64_t now, std::vector<std::uint64_t>& to_request) {
  c_.faults.fetch_add(1, kRelaxed);
  if (received_->test(page)) {
    if (page_present(page)) {
      // Placed after the fault was queued; the placement woke the thread. Wake again: harmless.
      c_.stale_faults.fetch_add(1, kRelaxed);
      uffd_.wake_at(kaddr_ + page * ps_, ps_);
      const std::uint64_t t = rel_ns();
      blocked_hist_.record(t > now ? t - now : 0);
      return;
    }
    // R set but the page is gone: a placement raced a REMOVE. Repair R and serve the fault.
    received_->clear(page);
    c_.removed.fetch_add(1, kRelaxed);
  }
  std::atomic_ref<std::uint64_t> ts(fault_ts_[page]);
  std::uint64_t v = ts.load(kRelaxed), nv = 0;
  do {
    nv = v == 0 ? (kWaiter | (now & kTsMask)) : ((v >> 56) == 255 ? v : v + kWaiter);
  } while (!ts.compare_exchange_weak(v, nv, std::memory_order_acq_rel, kRelaxed));
  // Pairs with placed_pages (stamp written, then R read; see there).
  order_.fetch_add(1, std::memory_order_acq_rel);
  if (received_->test(page)) {
    // A placement won the race; it may or may not have taken the stamp.
    const std::uint64_t old = ts.exchange(0, std::memory_order_acq_rel);
    c_.stale_faults.fetch_add(1, kRelaxed);
    uffd_.wake_at(kaddr_ + page * ps_, ps_);
    if (old != 0) {
      const std::uint64_t t = rel_ns(), t0 = old & kTsMask, d = t > t0 ? t - t0 : 0;
      fault_hist_.record(d);
      blocked_hist_.record(d, old >> 56);
    }
    return;
  }
  if (local_fill_->test(page)) {
    // Rule 4: hinted, unsent pages resolve here with the guest's poison value, no round trip.
    const std::uint32_t value = fill_value_.load(std::memory_order_acquire);
    std::size_t placed = 0;
    if (value == 0 && (ioctls_ & (std::uint64_t{1} << _UFFDIO_ZEROPAGE)) != 0) {
      placed = place_impl(Op::zero, page, 1, nullptr, 0);
      c_.zero.fetch_add(placed, kRelaxed);
    } else {
      placed = place_impl(Op::copy, page, 1, fill_pages(value, 1), 0);
      c_.filled.fetch_add(placed, kRelaxed);
    }
    c_.local_fills.fetch_add(1, kRelaxed);
    // placed == 0: the page was received meanwhile (dropped as a duplicate) and place_impl saw it;
    // the placer woke the thread.
    return;
  }
  if (requested_->test_and_set(page)) return;  // asked already: one request per page
  // A placement between the R test above and this bit would not have seen the bit (it sets R, then
  // clears requested). Look at R once more, behind the same store-load fence as the stamp above:
  // either the placer sees our bit and clears it, or we see its R and take the bit back.
  order_.fetch_add(1, std::memory_order_acq_rel);
  if (received_->test(page)) {
    requested_->clear(page);
    c_.stale_faults.fetch_add(1, kRelaxed);
    uffd_.wake_at(kaddr_ + page * ps_, ps_);
    return;
  }
  to_request.push_back(page);
}

void DestRegion::fault_loop() noexcept {
  fault_tid_.store(std::this_thread::get_id(), kRelaxed);
  std::vector<std::uint64_t> to_request;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> batch;
  to_request.reserve(kMsgBatch);
  batch.reserve(kMsgBatch);
  const std::uint64_t base = kaddr_;
  for (;;) {
    pollfd fds[2] = {{uffd_.fd(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    // Block until a fault or event arrives, or stop() signals.
    const int pr = ::poll(fds, 2, -1);
    if (pr < 0) {
      if (errno == EINTR) continue;
      note_error(KernelError(errno, "poll", "fault thread poll"));
      continue;
    }
    if ((fds[1].revents & POLLIN) != 0) break;
    try {
      read_events();
    } catch (const std::exception& e) {
      note_error(e);
    }
    while (!deferred_.empty()) {
      batch.clear();
      batch.swap(deferred_);  // handle_fault may append (EAGAIN retries read more events)
      to_request.clear();
      for (const auto& [addr, t] : batch) {
        // Stopping: the region is (being) unregistered and its waiters woken by the kernel.
        if (state() != State::postcopy) break;
        if (addr < base || addr >= base + bytes_) continue;
        try {
          handle_fault((addr - base) / ps_, t, to_request);
        } catch (const std::exception& e) {
          note_error(e);
        }
      }
      if (to_request.empty()) continue;
      // One request per run of adjacent pages.
      std::sort(to_request.begin(), to_request.end());
      std::size_t i = 0;
      while (i < to_request.size()) {
        std::size_t j = i + 1;
        while (j < to_request.size() && to_request[j] == to_request[j - 1] + 1 && j - i < 0xFFFFFFFFu) ++j;
        stamp_request(to_request[i], j - i);
        sink_->request(to_request[i], static_cast<std::uint32_t>(j - i));
        c_.requests.fetch_add(1, kRelaxed);
        c_.requested_pages.fetch_add(j - i, kRelaxed);
        i = j;
      }
    }
  }
  fault_tid_.store(std::thread::id{}, kRelaxed);
}

DestCounters DestRegion::counters() const noexcept {
  DestCounters o;
  o.faults = c_.faults.load(kRelaxed);
  o.requests = c_.requests.load(kRelaxed);
  o.requested_pages = c_.requested_pages.load(kRelaxed);
  o.placed = c_.placed.load(kRelaxed);
  o.zero = c_.zero.load(kRelaxed);
  o.local_fills = c_.local_fills.load(kRelaxed);
  o.filled = c_.filled.load(kRelaxed);
  o.duplicates = c_.duplicates.load(kRelaxed);
  o.eexist = c_.eexist.load(kRelaxed);
  o.eagain = c_.eagain.load(kRelaxed);
  o.removed = c_.removed.load(kRelaxed);
  o.discarded = c_.discarded.load(kRelaxed);
  o.stale_faults = c_.stale_faults.load(kRelaxed);
  o.errors = c_.errors.load(kRelaxed);
  o.placed_twice = c_.placed_twice.load(kRelaxed);
  return o;
}

}  // namespace livemig
