#include "livemig/dest/prefault.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>

#include "livemig/dest/region.hpp"

namespace livemig {
namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr std::size_t kDefaultChunk = std::size_t{2} << 20;  // 2 MiB: one page-table page of 4 KiB pages
constexpr std::size_t kCalibrateMax = std::size_t{16} << 20;  // per thread and step
constexpr std::size_t kCalibrateMin = std::size_t{256} << 10;
constexpr double kWorthIt = 1.10;  // more threads must gain 10%

unsigned default_max_threads() {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return std::clamp(2 * hw, 2u, 8u);
}

}  // namespace

Prefault::Prefault(std::uint8_t* base, std::size_t bytes, std::size_t page_size, PrefaultOptions opts)
    : base_(base), bytes_(bytes), ps_(page_size), pages_(page_size ? bytes / page_size : 0), chunks_(0) {
  if (ps_ == 0 || bytes_ == 0 || bytes_ % ps_ != 0) throw std::invalid_argument("prefault: bad region size");
  max_threads_ = opts.max_threads != 0 ? opts.max_threads : default_max_threads();
  std::size_t chunk = opts.chunk_bytes != 0 ? opts.chunk_bytes : kDefaultChunk;
  // Small regions get small chunks, so the calibration below still has several per thread.
  chunk = std::min(chunk, std::max(ps_, bytes_ / 64 / ps_ * ps_));
  chunk_pages_ = std::max<std::size_t>(1, chunk / ps_);
  nchunks_ = (pages_ + chunk_pages_ - 1) / chunk_pages_;
  chunks_ = PageBitmap(nchunks_);
  limit_chunk_ = nchunks_;
}

Prefault::~Prefault() { stop(); }

void Prefault::start() {
  std::lock_guard lk(ctl_mu_);
  if (started_) throw std::logic_error("prefault: already started");
  started_ = true;
  t0_ = std::chrono::steady_clock::now();
  lead_ = std::thread([this] { run_lead(); });
}

void Prefault::stop() noexcept {
  std::lock_guard lk(ctl_mu_);
  if (!started_ || stopped_) return;
  stopped_ = true;
  stop_.store(true, std::memory_order_release);
  if (lead_.joinable()) lead_.join();
}

bool Prefault::populate(std::size_t c, std::uint64_t from, std::uint64_t to) noexcept {
  if (from >= to) return true;
  chunks_.set(c);  // before the pages exist: settle drops whatever a marked chunk may hold
  for (;;) {
    // MADV_POPULATE_WRITE (5.14): write-fault every page of the range in now, as a first store
    // would, without changing a present page's content. A missing page becomes a zero page.
    if (::madvise(base_ + from * ps_, (to - from) * ps_, MADV_POPULATE_WRITE) == 0) break;
    if (errno == EINTR || errno == EAGAIN) continue;
    failed_.store(true, kRelaxed);  // EINVAL (older kernel), ENOMEM, EFAULT...: receivers fault pages in
    return false;
  }
  populated_.fetch_add(to - from, kRelaxed);
  return true;
}

std::uint64_t Prefault::lead_pages() const noexcept {
  const unsigned t = std::max(1u, active_.load(kRelaxed));
  const double pps = per_thread_pps_.load(kRelaxed);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  const double recv_pps = secs > 0 ? static_cast<double>(front_.load(kRelaxed)) / secs : 0;
  std::uint64_t lead = std::uint64_t{t} * chunk_pages_;
  if (pps > 0) lead += static_cast<std::uint64_t>(2.0 * recv_pps * (static_cast<double>(chunk_pages_) / pps));
  else lead += 3 * std::uint64_t{t} * chunk_pages_;
  return lead;
}

void Prefault::populate_loop() noexcept {
  bool worked = false;  // populated a chunk since this thread's last jump (it was ahead, then caught)
  while (!stop_.load(std::memory_order_acquire) && !failed_.load(kRelaxed)) {
    const std::size_t c = next_chunk_.fetch_add(1, kRelaxed);
    if (c >= limit_chunk_) break;
    const std::uint64_t cs = std::uint64_t{c} * chunk_pages_;
    const std::uint64_t ce = std::min<std::uint64_t>(cs + chunk_pages_, pages_);
    const std::uint64_t front = front_.load(kRelaxed);
    if (ce <= front) {
      // Behind the receivers: jump ahead of them, so the work goes where they arrive later.
      const std::uint64_t lead = lead_pages();
      lead_pages_.store(lead, kRelaxed);
      const std::size_t target = static_cast<std::size_t>((front + lead + chunk_pages_ - 1) / chunk_pages_);
      std::size_t cur = next_chunk_.load(kRelaxed);
      while (cur < target && !next_chunk_.compare_exchange_weak(cur, target, kRelaxed)) {
      }
      jumps_.fetch_add(1, kRelaxed);
      // The receivers caught up with a thread that was ahead of them: what runs does not keep
      // ahead on this machine now. (A thread that starts behind them, as after the calibration,
      // only jumps.)
      if (worked) grow();
      worked = false;
      continue;
    }
    if (!populate(c, std::max(cs, front), ce)) break;
    worked = true;
  }
}

bool Prefault::grow() noexcept {
  unsigned cur = active_.load(kRelaxed);
  while (cur < max_threads_) {
    if (stop_.load(std::memory_order_acquire)) return false;
    if (!active_.compare_exchange_weak(cur, cur + 1, kRelaxed)) continue;
    try {
      std::lock_guard lk(workers_mu_);
      workers_.emplace_back([this] { populate_loop(); });
    } catch (...) {  // no more threads: those running do the work
      active_.fetch_sub(1, kRelaxed);
      return false;
    }
    added_.fetch_add(1, kRelaxed);
    return true;
  }
  return false;
}

double Prefault::calibrate(unsigned threads, std::size_t per_thread, std::size_t& tail) noexcept {
  const std::size_t need = std::size_t{threads} * per_thread;
  // Keep the calibration to the region's last quarter: the receivers are far from it.
  if (tail < need || tail - need < nchunks_ * 3 / 4) return 0;
  const std::size_t lo = tail - need;
  tail = lo;
  const auto t0 = std::chrono::steady_clock::now();
  auto part = [&](unsigned i) {
    for (std::size_t c = lo + i * per_thread; c < lo + (i + 1) * per_thread; ++c) {
      if (stop_.load(std::memory_order_acquire)) return;
      const std::uint64_t cs = std::uint64_t{c} * chunk_pages_;
      if (!populate(c, cs, std::min<std::uint64_t>(cs + chunk_pages_, pages_))) return;
    }
  };
  std::vector<std::thread> helpers;
  try {
    for (unsigned i = 1; i < threads; ++i) helpers.emplace_back(part, i);
  } catch (...) {  // no more threads: measure with those that started
  }
  part(0);
  for (auto& h : helpers) h.join();
  if (stop_.load(std::memory_order_acquire) || failed_.load(kRelaxed)) return 0;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double bytes = static_cast<double>(std::uint64_t{helpers.size() + 1} * per_thread * chunk_pages_ * ps_);
  return secs > 0 ? bytes / secs / 1e9 : 0;
}

void Prefault::run_lead() noexcept {
  // Calibration on the tail: 1, 2, 4 ... threads, twice over in that order, each count keeping
  // its better rate (other work on the machine only ever slows a sample down, so the better of
  // two is the closer to what the count can do); the smallest count within 10% of the best wins.
  std::size_t per_thread =
      std::clamp(bytes_ / 64, kCalibrateMin, kCalibrateMax) / (chunk_pages_ * ps_);
  per_thread = std::max<std::size_t>(1, per_thread);
  std::size_t tail = nchunks_;
  std::vector<unsigned> counts;
  for (unsigned t = 1; t <= max_threads_; t *= 2) counts.push_back(t);
  std::vector<double> rate(counts.size(), 0);
  bool short_of_room = false;
  for (int pass = 0; pass < 2 && !short_of_room; ++pass) {
    for (std::size_t i = 0; i < counts.size(); ++i) {
      const double gbps = calibrate(counts[i], per_thread, tail);
      if (gbps <= 0) {
        short_of_room = true;
        break;
      }
      rate[i] = std::max(rate[i], gbps);
      std::lock_guard lk(mu_);
      tried_.push_back(counts[i]);
      tried_gbps_.push_back(gbps);
    }
  }
  const double best = *std::max_element(rate.begin(), rate.end());
  unsigned chosen = 1;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    if (rate[i] > 0 && rate[i] * kWorthIt >= best) {
      chosen = counts[i];
      break;
    }
  }
  if (rate[0] > 0) per_thread_pps_.store(rate[0] * 1e9 / static_cast<double>(ps_), kRelaxed);
  limit_chunk_ = tail;  // before the workers start (their creation orders it)
  threads_.store(chosen, kRelaxed);
  lead_pages_.store(lead_pages(), kRelaxed);
  active_.store(1, kRelaxed);
  for (unsigned i = 1; i < chosen; ++i) grow();
  added_.store(0, kRelaxed);  // only threads the receivers' catching up added count
  populate_loop();
  // Join every worker, those grow() adds meanwhile too: a worker adds one only while it runs, so
  // once every worker in the list was joined no more can come.
  for (std::size_t i = 0;; ++i) {
    std::thread t;
    {
      std::lock_guard lk(workers_mu_);
      if (i >= workers_.size()) break;
      t = std::move(workers_[i]);
    }
    t.join();
  }
  finished_.store(!stop_.load(std::memory_order_acquire) && !failed_.load(kRelaxed), kRelaxed);
  end_ns_.store(static_cast<std::uint64_t>(
                    std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count()),
                kRelaxed);
}

PrefaultStats Prefault::stats() const {
  PrefaultStats s;
  {
    std::lock_guard lk(mu_);
    s.tried = tried_;
    s.tried_gbps = tried_gbps_;
  }
  s.threads = threads_.load(kRelaxed);
  s.added_threads = added_.load(kRelaxed);
  s.lead_pages = lead_pages_.load(kRelaxed);
  s.populated_pages = populated_.load(kRelaxed);
  s.jumps = jumps_.load(kRelaxed);
  s.dropped_pages = dropped_.load(kRelaxed);
  s.finished = finished_.load(kRelaxed);
  s.stopped = stop_.load(kRelaxed);
  s.failed = failed_.load(kRelaxed);
  s.skipped_pages = s.finished ? pages_ - std::min<std::uint64_t>(pages_, s.populated_pages) : 0;
  const std::uint64_t end = end_ns_.load(kRelaxed);
  s.seconds = end != 0 ? static_cast<double>(end) / 1e9
                       : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  return s;
}

// ---- DestRegion's prefault hooks (declared in region.hpp; here so region.cpp stays small) ----

void DestRegion::start_prefault(PrefaultOptions opts) {
  std::lock_guard lk(stop_mu_);
  if (state() != State::precopy) throw std::logic_error("start_prefault: only in precopy, before any page arrived");
  if (prefault_) throw std::logic_error("start_prefault: already started");
  prefault_ = std::make_unique<Prefault>(base_, bytes_, ps_, opts);
  prefault_->start();
}

void DestRegion::stop_prefault() noexcept {
  if (prefault_) prefault_->request_stop();
}

std::size_t DestRegion::settle_prefault() {
  if (!prefault_ || prefault_settled_.exchange(true)) return 0;
  prefault_->stop();
  // Every page the prefault may have populated and that was not received must be missing again,
  // so a postcopy fault asks for it (or fills it locally): the pages of the marked chunks with R
  // clear. Dropped as a discard of pages not received (nothing received is lost, R stays clear).
  const PageBitmap& chunks = prefault_->populated_chunks();
  const std::size_t cp = prefault_->chunk_pages();
  std::vector<PageRange> runs;
  std::uint64_t dropped = 0;
  chunks.for_each_run(0, chunks.size(), [&](std::size_t first, std::size_t n) {
    const std::uint64_t lo = std::uint64_t{first} * cp, hi = std::min<std::uint64_t>((first + n) * cp, pages_);
    for (std::uint64_t p = lo; p < hi;) {
      const std::size_t a = received_->find_next_clear(p, hi);
      if (a == PageBitmap::npos) break;
      std::size_t b = received_->find_next_set(a, hi);
      if (b == PageBitmap::npos) b = hi;
      runs.push_back({a, b - a});
      dropped += b - a;
      p = b;
    }
  });
  if (!runs.empty()) discard(runs);
  prefault_->note_dropped(dropped);
  return dropped;
}

PrefaultStats DestRegion::prefault_stats() const {
  return prefault_ ? prefault_->stats() : PrefaultStats{};
}

}  // namespace livemig
