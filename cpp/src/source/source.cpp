#include "livemig/source/source.hpp"

#include <sys/mman.h>

#include <stdexcept>
#include <string>

#include "livemig/base/errors.hpp"
#include "livemig/base/holes.hpp"
#include "livemig/base/page_size.hpp"

namespace livemig {
namespace {

void check_pages(std::size_t npages) {
  if (npages == 0) throw std::invalid_argument("a source region needs at least one page");
}

std::uint8_t* page_aligned(std::uint8_t* base, std::size_t page_size) {
  if (base == nullptr || reinterpret_cast<std::uintptr_t>(base) % page_size != 0)
    throw std::invalid_argument("an adopted region must start on a page boundary");
  return base;
}

}  // namespace

Source::Region Source::make_region(std::size_t npages, Backing backing, std::size_t page_size) {
  check_pages(npages);
  check_page_size(page_size);
  Region r;
  const std::size_t len = npages * page_size;
  r.mapping = backing == Backing::Memfd ? Mapping::memfd(len, "livemig-source", r.memfd) : Mapping::anonymous(len);
  // Dirty tracking is per 4 KiB page: keep transparent huge pages out of the region, or one
  // written byte would mark 2 MiB written. Failure only costs precision, so it is ignored.
  (void)::madvise(r.mapping.data(), len, MADV_NOHUGEPAGE);
  r.base = r.mapping.data();
  return r;
}

Source::Source(std::size_t npages, TrackMode mode, Backing backing, std::size_t page_size)
    : Source(make_region(npages, backing, page_size), npages, mode, page_size) {}

Source::Source(std::uint8_t* base, std::size_t npages, TrackMode mode, std::size_t page_size)
    : Source(Region{Mapping(), UniqueFd(), page_aligned(base, page_size)}, npages, mode, page_size) {}

Source::Source(Region region, std::size_t npages, TrackMode mode, std::size_t page_size)
    : mapping_((check_pages(npages), check_page_size(page_size), std::move(region.mapping))),
      memfd_(std::move(region.memfd)),
      base_(region.base),
      npages_(npages),
      ps_(page_size),
      dirty_(std::make_shared<PageBitmap>(npages, true)),
      sent_(std::make_shared<PageBitmap>(npages)),
      hinted_(std::make_shared<PageBitmap>(npages)),
      tracker_(base_, npages, mode, page_size),
      hints_(*dirty_, *hinted_, &tracker_),
      scanner_(*dirty_, *sent_) {}

Source::Source(const std::uint8_t* local, std::size_t npages, const RemoteMemory& remote, std::size_t page_size)
    // The engine never writes through data() (a source's pages are only read and sent), so the
    // read-only mapping of another process's memory is held as the plain pointer every path uses.
    : Source(Region{Mapping(), UniqueFd(), page_aligned(const_cast<std::uint8_t*>(local), page_size)}, npages, remote,
             page_size) {}

Source::Source(Region region, std::size_t npages, const RemoteMemory& remote, std::size_t page_size)
    : mapping_((check_pages(npages), check_page_size(page_size), std::move(region.mapping))),
      memfd_(std::move(region.memfd)),
      base_(region.base),
      npages_(npages),
      ps_(page_size),
      dirty_(std::make_shared<PageBitmap>(npages, true)),
      sent_(std::make_shared<PageBitmap>(npages)),
      hinted_(std::make_shared<PageBitmap>(npages)),
      tracker_(remote, npages, page_size),
      hints_(*dirty_, *hinted_, &tracker_),
      scanner_(*dirty_, *sent_),
      holes_fd_(private_file(remote.memfd)),
      holes_offset_(remote.memfd_offset) {}

std::uint64_t Source::extent(std::uint64_t first, std::uint64_t n, bool& hole) const noexcept {
  hole = false;
  if (!holes_fd_) return n;
  const std::uint64_t k = mapped_file_extent(holes_fd_.get(), base_ + first * ps_, holes_offset_ + first * ps_, n, ps_, hole);
  if (hole) hole_pages_.fetch_add(k, std::memory_order_relaxed);
  return k;
}

std::size_t Source::sync() {
  std::lock_guard lock(sync_mu_);
  PageBitmap& d = *dirty_;
  PageBitmap& h = *hinted_;
  using Word = PageBitmap::Word;
  constexpr std::size_t kBits = PageBitmap::kWordBits;
  // Runs arrive in address order; the bits of runs that share a word are gathered and applied with
  // one locked RMW per word (sparse writes give several runs per word). D first, then H: a scanner
  // that sees H cleared for a page also finds it dirty. H is usually clear: test before the RMW.
  std::size_t acc_word = PageBitmap::npos;
  Word acc = 0;
  auto flush = [&] {
    if (acc == 0) return;
    d.word(acc_word).fetch_or(acc, std::memory_order_acq_rel);
    if ((h.word(acc_word).load(std::memory_order_acquire) & acc) != 0)
      h.word(acc_word).fetch_and(~acc, std::memory_order_acq_rel);
    acc = 0;
  };
  const std::size_t n = tracker_.harvest([&](std::size_t first, std::size_t len) {
    const std::size_t end = first + len;
    const std::size_t w = first / kBits;
    if ((end - 1) / kBits == w) {  // within one word
      if (w != acc_word) {
        flush();
        acc_word = w;
      }
      acc |= range_mask_for_word(w, first, end);
      return;
    }
    flush();
    acc_word = PageBitmap::npos;
    d.set_range(first, end);
    if (!h.none(first, end)) h.clear_range(first, end);
  });
  flush();
  syncs_.fetch_add(1, std::memory_order_relaxed);
  pages_written_.fetch_add(n, std::memory_order_relaxed);
  return n;
}

namespace {

// Appends the runs of set bits of word `x` (word index `w`) to `list`, extending the last run when
// it continues across words.
void append_runs(RangeList& list, std::size_t w, PageBitmap::Word x) {
  while (x != 0) {
    const auto lo = static_cast<std::size_t>(__builtin_ctzll(x));
    const PageBitmap::Word ones = ~(x >> lo);
    const std::size_t len = ones == 0 ? 64 - lo : static_cast<std::size_t>(__builtin_ctzll(ones));
    const std::size_t first = w * 64 + lo;
    if (!list.empty() && list.back().first + list.back().npages == first)
      list.back().npages += len;
    else
      list.emplace_back(first, len);
    x &= lo + len >= 64 ? 0 : ~PageBitmap::Word{0} << (lo + len);
  }
}

}  // namespace

SwitchoverSets Source::switchover_sets() const {
  SwitchoverSets out;
  const PageBitmap& d = *dirty_;
  const PageBitmap& s = *sent_;
  const PageBitmap& h = *hinted_;
  for (std::size_t w = 0; w < d.word_count(); ++w) {
    const PageBitmap::Word dw = d.word(w).load(std::memory_order_acquire);
    const PageBitmap::Word sw = s.word(w).load(std::memory_order_acquire);
    const PageBitmap::Word hw = h.word(w).load(std::memory_order_acquire);
    append_runs(out.discard, w, dw & sw);
    append_runs(out.local_fill, w, hw & ~dw & ~sw);
  }
  return out;
}

RangeList Source::take_stale_sent() noexcept {
  RangeList out;
  const PageBitmap& d = *dirty_;
  PageBitmap& s = *sent_;
  for (std::size_t w = 0; w < d.word_count(); ++w) {
    const PageBitmap::Word stale = d.word(w).load(std::memory_order_acquire) & s.word(w).load(std::memory_order_acquire);
    if (stale == 0) continue;
    // A hint may clear D for one of these pages meanwhile: the page is then hinted, unsent and
    // clean, which is what it is once the destination dropped it (a local fill, rule 4).
    s.word(w).fetch_and(~stale, std::memory_order_acq_rel);
    append_runs(out, w, stale);
  }
  return out;
}

std::size_t Source::dirty_hinted_unsent() noexcept {
  PageBitmap& d = *dirty_;
  const PageBitmap& s = *sent_;
  const PageBitmap& h = *hinted_;
  std::size_t n = 0;
  for (std::size_t w = 0; w < d.word_count(); ++w) {
    const PageBitmap::Word add = h.word(w).load(std::memory_order_acquire) & ~s.word(w).load(std::memory_order_acquire);
    if (add == 0) continue;
    const PageBitmap::Word old = d.word(w).fetch_or(add, std::memory_order_acq_rel);
    n += static_cast<std::size_t>(__builtin_popcountll(add & ~old));
  }
  return n;
}

std::size_t Source::resync_with_received(const PageBitmap& received, bool local_fill) {
  if (received.size() != npages_)
    throw std::invalid_argument("received bitmap has " + std::to_string(received.size()) + " pages, the region " +
                                std::to_string(npages_));
  PageBitmap& d = *dirty_;
  PageBitmap& s = *sent_;
  const PageBitmap& h = *hinted_;
  std::size_t n = 0;
  const std::size_t words = d.word_count();
  for (std::size_t w = 0; w < words; ++w) {
    const std::size_t lo = w * PageBitmap::kWordBits;
    const PageBitmap::Word valid = range_mask_for_word(w, lo, npages_);
    const PageBitmap::Word dw = d.word(w).load(std::memory_order_acquire);
    const PageBitmap::Word sw = s.word(w).load(std::memory_order_acquire);
    const PageBitmap::Word local = local_fill ? (h.word(w).load(std::memory_order_acquire) & ~dw & ~sw) : 0;
    const PageBitmap::Word lost = ~received.word(w).load(std::memory_order_acquire) & ~local & valid;
    if (lost == 0) continue;
    // S first, then D: in between, a request sees the page clean and unsent, and serves it.
    s.word(w).fetch_and(~lost, std::memory_order_acq_rel);
    d.word(w).fetch_or(lost, std::memory_order_acq_rel);
    n += static_cast<std::size_t>(__builtin_popcountll(lost));
  }
  return n;
}

void Source::stop_tracking() noexcept {
  std::lock_guard lock(sync_mu_);
  tracker_.stop();
}

SourceCounters Source::counters() const noexcept {
  SourceCounters c;
  c.sync = sync_counters();
  c.scanner = scanner_.counters();
  c.scan_calls = tracker_.scan_calls();
  return c;
}

void Source::set_timeline(std::shared_ptr<Timeline> t) {
  if (timeline_) throw std::logic_error("the source has a timeline already");
  timeline_ = std::move(t);
  scanner_.set_timeline(timeline_.get());
}

SyncCounters Source::sync_counters() const noexcept {
  return {syncs_.load(std::memory_order_relaxed), pages_written_.load(std::memory_order_relaxed)};
}

}  // namespace livemig
