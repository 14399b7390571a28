// The guest model: writer threads, the page allocator, the balloon driver, pause/resume and state.
#include "livemig/guest/guest.hpp"

#include "livemig/base/page_size.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace livemig::guest {

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::uint64_t kBatch = 256;  // most pages a thread writes between two pause checks
constexpr std::uint64_t npos = PageBitmap::npos;

std::uint64_t splitmix64(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1).
double unit(std::uint64_t& state) noexcept {
  return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
}

// Token bucket: `rate` pages/s, at most `cap` pages of credit (no catch-up bursts after a stall).
class Pacer {
 public:
  explicit Pacer(double rate) : rate_(rate), cap_(std::max(static_cast<double>(kBatch), rate * 0.05)) {}
  void reset(Clock::time_point now) noexcept {
    last_ = now;
    tokens_ = 0;
  }
  std::uint64_t take(Clock::time_point now, std::uint64_t most) noexcept {
    const double dt = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    tokens_ = std::min(cap_, tokens_ + rate_ * dt);
    const auto n = std::min(most, static_cast<std::uint64_t>(tokens_));
    tokens_ -= static_cast<double>(n);
    return n;
  }
  // How long to sleep between batches: 1 ms at high rates, about one page's time at low ones.
  std::chrono::microseconds tick() const noexcept {
    if (rate_ <= 0) return std::chrono::microseconds(20000);
    const double us = std::clamp(1e6 / rate_, 1000.0, 20000.0);
    return std::chrono::microseconds(static_cast<std::int64_t>(us));
  }

 private:
  double rate_;
  double cap_;
  double tokens_ = 0;
  Clock::time_point last_{};
};

// ---- state serialisation (little-endian, which is what x86-64 and arm64 Linux are) ----
static_assert(std::endian::native == std::endian::little, "state bytes are little-endian");
constexpr std::array<char, 8> kMagic{'L', 'M', 'G', 'U', 'E', 'S', 'T', '1'};
constexpr std::uint32_t kStateVersion = 4;  // 2: word-wise checksum; 3: sparse generation table; 4: page sets as runs

// How the generation table travels: every word, or only the (page, generation) pairs of pages
// written since the guest started. A guest that wrote few of its pages (the usual case: idle,
// hotset, a random writer for a few seconds) then sends kilobytes instead of 8 bytes per page, and
// the destination builds its table without touching the untouched rest.
enum class GenEncoding : std::uint8_t { Dense = 0, Sparse = 1 };

// How a page set (allocated, held) travels: its bitmap, or its runs of set pages as (first,
// length) pairs when those are fewer bytes. A guest's sets are mostly long runs (all allocated, none
// held), so the state stays kilobytes however large the region, and it is packed, sent and
// checked inside the downtime.
enum class SetEncoding : std::uint8_t { Bitmap = 0, Runs = 1 };


class Out {
 public:
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    buf.insert(buf.end(), p, p + sizeof v);
  }
  void bytes(std::span<const std::uint8_t> b) { buf.insert(buf.end(), b.begin(), b.end()); }
  void words(std::span<const std::uint64_t> w) {
    bytes({reinterpret_cast<const std::uint8_t*>(w.data()), w.size_bytes()});
  }
  std::vector<std::uint8_t> buf;
};

class In {
 public:
  explicit In(std::span<const std::uint8_t> b) : b_(b) {}
  template <class T>
  T get() {
    T v;
    std::memcpy(&v, need(sizeof v), sizeof v);
    return v;
  }
  std::span<const std::uint8_t> bytes(std::size_t n) { return {need(n), n}; }
  std::size_t left() const noexcept { return b_.size() - pos_; }

 private:
  const std::uint8_t* need(std::size_t n) {
    if (n > b_.size() - pos_) throw std::invalid_argument("guest state is truncated");
    const std::uint8_t* p = b_.data() + pos_;
    pos_ += n;
    return p;
  }
  std::span<const std::uint8_t> b_;
  std::size_t pos_ = 0;
};

// FNV-1a over 64-bit words (bytes for the tail): the state is megabytes per GiB of guest and is
// checked on the switchover path, so eight bytes a step rather than one.
std::uint64_t fnv1a(std::span<const std::uint8_t> b) noexcept {
  std::uint64_t h = 0xCBF29CE484222325ULL;
  std::size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, b.data() + i, 8);
    h = (h ^ w) * 0x100000001B3ULL;
    h ^= h >> 29;
  }
  for (; i < b.size(); ++i) h = (h ^ b[i]) * 0x100000001B3ULL;
  return h;
}

void put_set(Out& o, const PageBitmap& b) {
  const std::size_t limit = b.byte_size() / 16;  // runs cost 16 bytes each
  std::size_t runs = 0;
  b.for_each_run(0, b.size(), [&](std::size_t, std::size_t) { return ++runs <= limit; });
  if (runs <= limit) {
    o.put(static_cast<std::uint8_t>(SetEncoding::Runs));
    o.put<std::uint64_t>(runs);
    b.for_each_run(0, b.size(), [&](std::size_t first, std::size_t len) {
      o.put<std::uint64_t>(first);
      o.put<std::uint64_t>(len);
    });
    return;
  }
  o.put(static_cast<std::uint8_t>(SetEncoding::Bitmap));
  std::vector<std::uint8_t> bm(b.byte_size());
  b.export_bytes(bm);
  o.bytes(bm);
}

// Reads a page set into `b` (all clear); throws std::invalid_argument when it is malformed.
void get_set(In& in, PageBitmap& b) {
  const auto encoding = static_cast<SetEncoding>(in.get<std::uint8_t>());
  if (encoding == SetEncoding::Bitmap) {
    if (!b.import_bytes(in.bytes(b.byte_size()))) throw std::invalid_argument("guest state: malformed page sets");
    return;
  }
  if (encoding != SetEncoding::Runs) throw std::invalid_argument("guest state: unknown page set encoding");
  const auto runs = in.get<std::uint64_t>();
  if (runs > b.size() || runs * 16 > in.left()) throw std::invalid_argument("guest state: malformed page sets");
  std::size_t next = 0;  // runs are in order, apart, non-empty and inside the region
  for (std::uint64_t i = 0; i < runs; ++i) {
    const auto first = in.get<std::uint64_t>();
    const auto len = in.get<std::uint64_t>();
    if (first < next || len == 0 || first >= b.size() || len > b.size() - first)
      throw std::invalid_argument("guest state: malformed page sets");
    b.set_range(first, first + len);
    next = first + len + 1;
  }
}

struct Header {
  GuestConfig cfg;
  std::uint64_t npages = 0;
};

// Reads and checks the header (and the checksum of the whole state).
Header read_header(In& in, std::span<const std::uint8_t> all) {
  if (all.size() < 16) throw std::invalid_argument("guest state is truncated");
  auto magic = in.bytes(8);
  if (!std::equal(magic.begin(), magic.end(), reinterpret_cast<const std::uint8_t*>(kMagic.data())))
    throw std::invalid_argument("not a livemig guest state (bad magic)");
  const auto version = in.get<std::uint32_t>();
  if (version != kStateVersion)
    throw std::invalid_argument("guest state version " + std::to_string(version) + " is not supported (want " +
                                std::to_string(kStateVersion) + ")");
  const std::uint64_t sum = [&] {
    std::uint64_t s;
    std::memcpy(&s, all.data() + all.size() - 8, 8);
    return s;
  }();
  if (fnv1a(all.first(all.size() - 8)) != sum) throw std::invalid_argument("guest state checksum mismatch");
  Header h;
  h.cfg.page_size = in.get<std::uint64_t>();
  h.npages = in.get<std::uint64_t>();
  h.cfg.workload = static_cast<Workload>(in.get<std::uint8_t>());
  h.cfg.fill = static_cast<Fill>(in.get<std::uint8_t>());
  in.get<std::uint16_t>();
  h.cfg.threads = in.get<std::uint32_t>();
  h.cfg.rate = in.get<double>();
  h.cfg.free_fraction = in.get<double>();
  h.cfg.churn = in.get<double>();
  h.cfg.hot_fraction = in.get<double>();
  h.cfg.hint_reserve = in.get<double>();
  h.cfg.hotset_pages = in.get<std::uint64_t>();
  h.cfg.seed = in.get<std::uint64_t>();
  h.cfg.poll_interval_us = in.get<std::uint32_t>();
  validate(h.cfg);
  return h;
}

std::size_t checked_pages(const std::uint8_t* region, std::size_t bytes, const GuestConfig& c) {
  validate(c);
  if (region == nullptr && bytes != 0) throw std::invalid_argument("region is null");
  if (reinterpret_cast<std::uintptr_t>(region) % 8 != 0)
    throw std::invalid_argument("region must be 8-byte aligned");
  if (bytes == 0 || bytes % c.page_size != 0)
    throw std::invalid_argument("region size " + std::to_string(bytes) +
                                " is not a non-zero multiple of the page size " + std::to_string(c.page_size));
  return bytes / c.page_size;
}

Header header_of(std::span<const std::uint8_t> state) {
  In in(state);
  return read_header(in, state);
}

}  // namespace

// ---- construction ----

Guest::Guest(std::uint8_t* region, std::size_t bytes, const GuestConfig& config, std::shared_ptr<BalloonPort> port)
    : region_(region),
      npages_(checked_pages(region, bytes, config)),
      words_(config.page_size / 8),
      cfg_(config),
      port_(std::move(port)),
      allocated_(npages_),
      avail_(npages_),
      held_(npages_),
      gens_map_(Mapping::zeroed_words(npages_)),
      gens_(reinterpret_cast<std::uint64_t*>(gens_map_.data())),
      genned_(npages_),
      spare_alloc_(npages_),
      spare_held_(npages_) {
  init_layout();
  fill_initial();
}

Guest::Guest(std::uint8_t* region, std::size_t bytes, std::span<const std::uint8_t> state,
             std::shared_ptr<BalloonPort> port)
    : region_(region),
      npages_(checked_pages(region, bytes, header_of(state).cfg)),
      words_(header_of(state).cfg.page_size / 8),
      cfg_(header_of(state).cfg),
      port_(std::move(port)),
      allocated_(npages_),
      avail_(npages_),
      held_(npages_),
      gens_map_(Mapping::zeroed_words(npages_)),
      gens_(reinterpret_cast<std::uint64_t*>(gens_map_.data())),
      genned_(npages_),
      spare_alloc_(npages_),
      spare_held_(npages_) {
  load_state(state);
}

Guest::~Guest() { stop(); }

void Guest::init_layout() {
  const unsigned nthreads = cfg_.workload == Workload::Increment ? 1 : cfg_.threads;
  const std::uint64_t n = npages_;
  slices_.assign(nthreads, Slice{});
  std::uint64_t total_free = 0;
  allocated_.reset();
  avail_.reset();
  held_.reset();
  for (unsigned t = 0; t < nthreads; ++t) {
    Slice& s = slices_[t];
    s.begin = n * t / nthreads;
    s.end = n * (t + 1) / nthreads;
    s.rng = cfg_.seed * 0x100000001B3ULL + t;
    s.cursor = s.begin;
    // The free pool is the top of each slice, like the never-used high memory of a booted guest.
    const auto len = s.end - s.begin;
    const auto nfree = std::min<std::uint64_t>(
        len, static_cast<std::uint64_t>(std::llround(cfg_.free_fraction * static_cast<double>(len))));
    allocated_.set_range(s.begin, s.end - nfree);
    avail_.set_range(s.end - nfree, s.end);
    s.free_cursor = s.end - nfree;
    total_free += nfree;
  }
  reserve_pages_ = static_cast<std::uint64_t>(std::llround(cfg_.hint_reserve * static_cast<double>(total_free)));
}

void Guest::fill_initial() {
  if (cfg_.fill == Fill::Zero) return;
  for (std::uint64_t p = 0; p < npages_; ++p)
    write_page(reinterpret_cast<std::uint64_t*>(region_ + p * cfg_.page_size), words_, p, 0);
}

void Guest::prefault() {
  std::lock_guard lk(mu_);
  if (!quiescent()) throw std::invalid_argument("prefault needs a paused or stopped guest");
  // Rewrite every word with itself (a zero table stays zero); the stores fault the pages in.
  auto* volatile_table = static_cast<volatile std::uint64_t*>(gens_);
  const std::size_t step = livemig::system_page_size() / sizeof(std::uint64_t);
  for (std::size_t i = 0; i < npages_; i += step) volatile_table[i] = volatile_table[i];
}

// ---- thread control ----

void Guest::start() {
  std::lock_guard lk(mu_);
  if (!threads_.empty()) return;
  stop_req_.store(false);
  pause_req_.store(false);
  parked_ = 0;
  kick_ = false;
  const bool writers = cfg_.workload != Workload::Idle || cfg_.churn > 0;
  // The driver first: it mostly sleeps, while a writer starts at once (and, resumed in postcopy,
  // faults at once), so this thread gets its own work done before the writers compete for CPUs.
  if (port_) threads_.emplace_back(&Guest::driver_main, this);
  if (writers)
    for (unsigned t = 0; t < slices_.size(); ++t) threads_.emplace_back(&Guest::writer_main, this, t);
}

void Guest::pause() {
  std::unique_lock lk(mu_);
  if (threads_.empty()) return;
  pause_req_.store(true);
  cv_.notify_all();
  parked_cv_.wait(lk, [&] { return parked_ == threads_.size() || stop_req_.load(); });
}

void Guest::resume() {
  {
    std::lock_guard lk(mu_);
    if (!threads_.empty()) {
      pause_req_.store(false);
      cv_.notify_all();
      return;
    }
  }
  start();
}

void Guest::stop() {
  std::vector<std::thread> ts;
  {
    std::lock_guard lk(mu_);
    if (threads_.empty()) return;
    stop_req_.store(true);
    cv_.notify_all();
    parked_cv_.notify_all();
    ts.swap(threads_);
  }
  for (auto& t : ts) t.join();
  std::lock_guard lk(mu_);
  stop_req_.store(false);
  pause_req_.store(false);
  parked_ = 0;
}

bool Guest::running() const {
  std::lock_guard lk(mu_);
  return !threads_.empty() && !pause_req_.load();
}

void Guest::kick() {
  std::lock_guard lk(mu_);
  kick_ = true;
  cv_.notify_all();
}

bool Guest::quiescent() const { return threads_.empty() || (pause_req_.load() && parked_ == threads_.size()); }

Guest::Park Guest::park_point() {
  // Fast path without the lock; the flags only change under mu_, so the slow path sees them exactly.
  if (!pause_req_.load(std::memory_order_acquire) && !stop_req_.load(std::memory_order_acquire)) return Park::Run;
  std::unique_lock lk(mu_);
  if (stop_req_.load()) return Park::Stop;
  if (!pause_req_.load()) return Park::Run;
  // Parking under mu_ orders every write this thread made before it with whatever the pauser does
  // after pause() returns (it reads parked_ under the same mutex).
  ++parked_;
  parked_cv_.notify_all();
  cv_.wait(lk, [&] { return !pause_req_.load() || stop_req_.load(); });
  --parked_;
  return stop_req_.load() ? Park::Stop : Park::Resumed;
}

void Guest::nap(std::chrono::microseconds d, bool driver) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, d, [&] { return pause_req_.load() || stop_req_.load() || (driver && kick_); });
  if (driver) kick_ = false;
}

// ---- writers ----

void Guest::writer_main(unsigned t) {
  Slice& s = slices_[t];
  const double share = static_cast<double>(slices_.size());
  const bool paced = cfg_.rate > 0;
  Pacer wp(cfg_.rate / share), cp(cfg_.churn / share);
  const bool writes = cfg_.workload != Workload::Idle;
  const bool churns = cfg_.churn > 0;
  auto tick = std::chrono::microseconds(20000);
  if (writes && paced) tick = std::min(tick, wp.tick());
  if (churns) tick = std::min(tick, cp.tick());
  auto now = Clock::now();
  wp.reset(now);
  cp.reset(now);
  for (;;) {
    const Park k = park_point();
    if (k == Park::Stop) return;
    now = Clock::now();
    if (k == Park::Resumed) {  // no credit for the time spent parked
      wp.reset(now);
      cp.reset(now);
    }
    const std::uint64_t nw = !writes ? 0 : (paced ? wp.take(now, kBatch) : kBatch);
    const std::uint64_t nc = churns ? cp.take(now, kBatch) : 0;
    for (std::uint64_t i = 0; i < nw; ++i) {
      if (cfg_.workload == Workload::Increment)
        increment_one(s);
      else
        write_one(s);
    }
    for (std::uint64_t i = 0; i < nc; ++i) churn_one(s);
    const bool behind = (writes && !paced) || nw == kBatch || nc == kBatch;
    if (!behind) nap(tick, false);
  }
}

void Guest::write_gen(std::uint64_t page) {
  const std::uint64_t g = ++gens_[page];
  if (g == 1) genned_.set(page);
  write_page(reinterpret_cast<std::uint64_t*>(region_ + page * cfg_.page_size), words_, page, g);
  pages_written_.fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t Guest::pick_allocated(Slice& s, std::uint64_t lo, std::uint64_t hi) {
  if (lo >= hi) return npos;
  const std::uint64_t x = lo + splitmix64(s.rng) % (hi - lo);
  std::uint64_t p = allocated_.find_next_set(x, hi);
  if (p == npos) p = allocated_.find_next_set(lo, x);
  return p;
}

void Guest::write_one(Slice& s) {
  std::uint64_t p = npos;
  if (cfg_.workload == Workload::Hotset && unit(s.rng) < cfg_.hot_fraction)
    p = pick_allocated(s, s.begin, std::min(s.end, s.begin + cfg_.hotset_pages));
  if (p == npos) p = pick_allocated(s, s.begin, s.end);
  if (p != npos) write_gen(p);
}

void Guest::increment_one(Slice& s) {
  std::uint64_t p = allocated_.find_next_set(s.cursor, s.end);
  if (p == npos) {  // the rest of the pass has no allocated page: the pass is complete
    passes_.fetch_add(1, std::memory_order_relaxed);
    s.cursor = s.begin;
    p = allocated_.find_next_set(s.begin, s.end);
    if (p == npos) return;
  }
  region_[p * cfg_.page_size] += 1;
  pages_written_.fetch_add(1, std::memory_order_relaxed);
  s.cursor = p + 1;
  if (s.cursor >= s.end) {
    passes_.fetch_add(1, std::memory_order_relaxed);
    s.cursor = s.begin;
  }
}

void Guest::churn_one(Slice& s) {
  // Allocate the next free page after the cursor; the driver may take a page between the find
  // and the test_and_clear, then look further.
  std::uint64_t p = npos;
  std::uint64_t from = s.free_cursor;
  for (int tries = 0; tries < 8; ++tries) {
    p = avail_.find_next_set(from, s.end);
    if (p == npos) p = avail_.find_next_set(s.begin, s.end);
    if (p == npos) break;
    if (avail_.test_and_clear(p)) break;
    from = p + 1 < s.end ? p + 1 : s.begin;
    p = npos;
  }
  if (p == npos) {
    alloc_failures_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  allocated_.set(p);
  write_gen(p);
  allocations_.fetch_add(1, std::memory_order_relaxed);
  s.free_cursor = p + 1 < s.end ? p + 1 : s.begin;
  // Free another allocated page of the slice, so the pool keeps its size.
  std::uint64_t q = pick_allocated(s, s.begin, s.end);
  if (q == p) q = pick_allocated(s, s.begin, s.end);
  if (q == npos || q == p) return;
  allocated_.clear(q);
  avail_.set(q);
  frees_.fetch_add(1, std::memory_order_relaxed);
}

// ---- balloon driver ----

void Guest::driver_main() {
  const auto poll = std::chrono::microseconds(cfg_.poll_interval_us);
  for (;;) {
    if (park_point() == Park::Stop) return;
    const std::uint32_t id = port_->cmd_id();
    if (id == last_cmd_.load(std::memory_order_relaxed)) {
      nap(poll, true);
      continue;
    }
    last_cmd_.store(id, std::memory_order_relaxed);
    if (id == balloon::kCmdDone) {
      driver_release();
      done_seen_.fetch_add(1, std::memory_order_relaxed);
    } else if (balloon::is_round_id(id)) {
      driver_round(id);
    }
    // kCmdStop: the host stopped the round; held pages stay held until DONE.
  }
}

void Guest::driver_round(std::uint32_t id) {
  if (!port_->ack(id)) return;  // the host has moved on; the next look sees its new id
  rounds_.fetch_add(1, std::memory_order_relaxed);
  const std::uint64_t avail = avail_.count();
  std::uint64_t budget = avail > reserve_pages_ ? avail - reserve_pages_ : 0;
  std::uint64_t pos = 0;
  bool live = true;
  while (live && budget > 0 && pos < npages_) {
    if (park_point() == Park::Stop) break;
    if (port_->cmd_id() != id) break;  // stopped or superseded: Linux stops reporting too
    const std::uint64_t s = avail_.find_next_set(pos);
    if (s == npos) break;
    std::uint64_t e = avail_.find_next_clear(s);
    if (e == npos) e = npages_;
    e = std::min(e, s + std::min(kMaxHintPages, budget));
    // Take the run; a writer may allocate some of it first, so report what was taken, in runs.
    std::array<PageBitmap::Word, kMaxHintPages / 64 + 2> taken{};
    avail_.harvest(s, e, taken);
    const std::uint64_t w0 = s / 64;
    auto is_taken = [&](std::uint64_t p) { return (taken[p / 64 - w0] >> (p % 64)) & 1U; };
    std::uint64_t p = s;
    while (p < e) {
      if (!is_taken(p)) {
        ++p;
        continue;
      }
      std::uint64_t q = p;
      while (q < e && is_taken(q)) ++q;
      if (live && port_->hint(id, p, q - p)) {
        held_.set_range(p, q);
        pages_held_.fetch_add(q - p, std::memory_order_relaxed);
        hints_sent_.fetch_add(1, std::memory_order_relaxed);
        pages_hinted_.fetch_add(q - p, std::memory_order_relaxed);
        budget -= std::min(budget, q - p);
      } else {
        // Dropped (or after a drop): the host did not record these pages, so they are free again.
        if (live) hints_dropped_.fetch_add(1, std::memory_order_relaxed);
        live = false;
        avail_.set_range(p, q);
      }
      p = q;
    }
    pos = e;
  }
  port_->stop(id);
}

void Guest::driver_release() {
  held_.for_each_run(0, npages_, [&](std::size_t s, std::size_t n) {
    held_.clear_range(s, s + n);
    avail_.set_range(s, s + n);
  });
  pages_held_.store(0, std::memory_order_relaxed);
}

// ---- checks ----

namespace {
const char* check_page(const std::uint64_t* w, std::size_t words, std::uint64_t p, std::uint64_t gen, Fill fill,
                       int counter) {
  const bool inc = counter >= 0;
  const std::uint64_t lowmask = 0xFF;
  if (gen == 0 && fill == Fill::Zero) {
    if (inc ? (w[0] & ~lowmask) != 0 : w[0] != 0) return "nonzero";
    for (std::size_t k = 1; k < words; ++k)
      if (w[k] != 0) return "nonzero";
    if (inc && (w[0] & lowmask) != static_cast<std::uint64_t>(counter)) return "counter";
    return nullptr;
  }
  if ((w[0] >> 8) != (p & (~std::uint64_t{0} >> 8))) {
    bool zero = true;
    for (std::size_t k = 0; k < words && zero; ++k) zero = w[k] == 0;
    return zero ? "zero" : "misplaced";
  }
  if (w[1] != gen) return "generation";
  if (inc) {
    if ((w[0] & lowmask) != static_cast<std::uint64_t>(counter)) return "counter";
  } else if ((w[0] & lowmask) != (gen & lowmask)) {
    return "torn";
  }
  const std::uint64_t key = page_key(p, gen);
  for (std::size_t k = 2; k < words; ++k)
    if (w[k] != page_word(key, k)) return "torn";
  return nullptr;
}
}  // namespace

VerifyResult Guest::verify_locked() const {
  VerifyResult r;
  const bool inc = cfg_.workload == Workload::Increment;
  const std::uint64_t passes = passes_.load(std::memory_order_relaxed);
  const std::uint64_t cursor = slices_.empty() ? 0 : slices_[0].cursor;
  for (std::uint64_t p = 0; p < npages_; ++p) {
    if (!allocated_.test(p)) {
      ++r.pages_excepted;
      continue;
    }
    ++r.pages_checked;
    const auto* w = reinterpret_cast<const std::uint64_t*>(region_ + p * cfg_.page_size);
    const int counter = inc ? static_cast<int>((passes + (p < cursor ? 1 : 0)) & 0xFF) : -1;
    const char* kind = check_page(w, words_, p, gens_[p], cfg_.fill, counter);
    if (kind == nullptr) continue;
    ++r.mismatches;
    if (r.first.size() < VerifyResult::kMaxReported) r.first.push_back({p, kind, w[1], gens_[p]});
  }
  return r;
}

VerifyResult Guest::verify() {
  bool resume_after = false;
  {
    std::lock_guard lk(mu_);
    resume_after = !threads_.empty() && !pause_req_.load();
  }
  if (resume_after) pause();
  VerifyResult r = verify_locked();
  if (resume_after) resume();
  return r;
}

IncrementCheck Guest::check_increment() {
  bool resume_after = false;
  {
    std::lock_guard lk(mu_);
    resume_after = !threads_.empty() && !pause_req_.load();
  }
  if (resume_after) pause();
  std::vector<std::uint8_t> excepted(npages_);
  for (std::uint64_t p = 0; p < npages_; ++p) excepted[p] = allocated_.test(p) ? 0 : 1;
  IncrementCheck r = livemig::guest::check_increment(region_, cfg_.page_size, npages_, excepted);
  if (resume_after) resume();
  return r;
}

// ---- state ----

std::vector<std::uint8_t> Guest::export_state() const {
  {
    std::lock_guard lk(mu_);
    if (!quiescent()) throw std::invalid_argument("export_state needs a paused or stopped guest");
  }
  Out o;
  o.bytes({reinterpret_cast<const std::uint8_t*>(kMagic.data()), kMagic.size()});
  o.put(kStateVersion);
  o.put<std::uint64_t>(cfg_.page_size);
  o.put<std::uint64_t>(npages_);
  o.put(static_cast<std::uint8_t>(cfg_.workload));
  o.put(static_cast<std::uint8_t>(cfg_.fill));
  o.put<std::uint16_t>(0);
  o.put<std::uint32_t>(cfg_.threads);
  o.put(cfg_.rate);
  o.put(cfg_.free_fraction);
  o.put(cfg_.churn);
  o.put(cfg_.hot_fraction);
  o.put(cfg_.hint_reserve);
  o.put<std::uint64_t>(cfg_.hotset_pages);
  o.put<std::uint64_t>(cfg_.seed);
  o.put<std::uint32_t>(cfg_.poll_interval_us);
  // The driver's view of the device and the counters.
  o.put<std::uint32_t>(last_cmd_.load());
  for (const auto* c : {&pages_written_, &passes_, &allocations_, &frees_, &alloc_failures_, &rounds_, &hints_sent_,
                        &pages_hinted_, &hints_dropped_, &pages_held_, &done_seen_})
    o.put<std::uint64_t>(c->load());
  o.put<std::uint64_t>(reserve_pages_);
  o.put<std::uint32_t>(static_cast<std::uint32_t>(slices_.size()));
  for (const Slice& s : slices_) {
    o.put(s.begin);
    o.put(s.end);
    o.put(s.rng);
    o.put(s.cursor);
    o.put(s.free_cursor);
  }
  const std::span<const std::uint64_t> gens(gens_, npages_);
  const std::uint64_t written = genned_.count();
  const bool sparse = written < npages_ / 2;  // a pair is two words, a dense entry one
  o.buf.reserve(o.buf.size() + 2 * allocated_.byte_size() + 16 + (sparse ? written * 16 : npages_ * 8) + 8);
  put_set(o, allocated_);
  put_set(o, held_);
  o.put(static_cast<std::uint8_t>(sparse ? GenEncoding::Sparse : GenEncoding::Dense));
  o.put<std::uint64_t>(sparse ? written : npages_);
  if (sparse) {
    genned_.for_each_set(0, npages_, [&](std::size_t p) {
      o.put<std::uint64_t>(p);
      o.put(gens[p]);
    });
  } else {
    o.words(gens);
  }
  o.put(fnv1a(o.buf));
  return std::move(o.buf);
}

void Guest::import_state(std::span<const std::uint8_t> state) {
  {
    std::lock_guard lk(mu_);
    if (!threads_.empty()) throw std::invalid_argument("import_state needs a guest without threads (stop() first)");
  }
  load_state(state);
}

void Guest::load_state(std::span<const std::uint8_t> state) {
  In in(state);
  const Header h = read_header(in, state);
  if (h.cfg.page_size != cfg_.page_size || h.npages != npages_)
    throw std::invalid_argument("guest state is for " + std::to_string(h.npages) + " pages of " +
                                std::to_string(h.cfg.page_size) + " bytes, this region has " + std::to_string(npages_) +
                                " of " + std::to_string(cfg_.page_size));
  const auto last = in.get<std::uint32_t>();
  std::array<std::uint64_t, 11> counters{};
  for (auto& c : counters) c = in.get<std::uint64_t>();
  const auto reserve = in.get<std::uint64_t>();
  const auto nslices = in.get<std::uint32_t>();
  const unsigned want = h.cfg.workload == Workload::Increment ? 1 : h.cfg.threads;
  if (nslices != want) throw std::invalid_argument("guest state: slice count does not match its config");
  std::vector<Slice> slices(nslices);
  std::uint64_t expect_begin = 0;
  for (Slice& s : slices) {
    s.begin = in.get<std::uint64_t>();
    s.end = in.get<std::uint64_t>();
    s.rng = in.get<std::uint64_t>();
    s.cursor = in.get<std::uint64_t>();
    s.free_cursor = in.get<std::uint64_t>();
    if (s.begin != expect_begin || s.end < s.begin || s.end > npages_ || s.cursor < s.begin || s.cursor > s.end ||
        s.free_cursor < s.begin || s.free_cursor > s.end)
      throw std::invalid_argument("guest state: malformed writer slices");
    expect_begin = s.end;
  }
  if (expect_begin != npages_) throw std::invalid_argument("guest state: writer slices do not cover the region");
  PageBitmap& alloc = spare_alloc_;
  PageBitmap& held = spare_held_;
  alloc.reset();
  held.reset();
  get_set(in, alloc);
  get_set(in, held);
  for (std::size_t w = 0; w < alloc.word_count(); ++w)
    if ((alloc.word(w).load(std::memory_order_relaxed) & held.word(w).load(std::memory_order_relaxed)) != 0)
      throw std::invalid_argument("guest state: a page is both allocated and held");
  const auto encoding = static_cast<GenEncoding>(in.get<std::uint8_t>());
  const auto entries = in.get<std::uint64_t>();
  const std::uint64_t entry_bytes = encoding == GenEncoding::Sparse ? 16 : 8;
  if (encoding != GenEncoding::Dense && encoding != GenEncoding::Sparse)
    throw std::invalid_argument("guest state: unknown generation table encoding");
  if ((encoding == GenEncoding::Dense && entries != npages_) || entries > npages_ ||
      in.left() != entries * entry_bytes + 8)
    throw std::invalid_argument("guest state: wrong length");
  const auto g = in.bytes(entries * entry_bytes);
  if (encoding == GenEncoding::Sparse) {  // strictly increasing pages in range, before anything changes
    std::uint64_t next = 0;
    for (std::uint64_t i = 0; i < entries; ++i) {
      std::uint64_t page;
      std::memcpy(&page, g.data() + i * 16, 8);
      if (page < next || page >= npages_) throw std::invalid_argument("guest state: malformed generation table");
      next = page + 1;
    }
  }

  cfg_ = h.cfg;
  last_cmd_.store(last);
  for (std::size_t i = 0; auto* c : {&pages_written_, &passes_, &allocations_, &frees_, &alloc_failures_, &rounds_,
                                     &hints_sent_, &pages_hinted_, &hints_dropped_, &pages_held_, &done_seen_})
    c->store(counters[i++]);
  reserve_pages_ = reserve;
  slices_ = std::move(slices);
  allocated_.reset();
  allocated_.or_with(alloc);
  held_.reset();
  held_.or_with(held);
  // Available: neither allocated nor held.
  avail_.reset();
  avail_.or_with(alloc);
  avail_.or_with(held);
  avail_.complement();
  if (encoding == GenEncoding::Dense) {
    std::memcpy(gens_, g.data(), g.size());
    genned_.reset();
    for (std::uint64_t p = 0; p < npages_; ++p)
      if (gens_[p] != 0) genned_.set(p);
  } else {
    // Only the pages written so far hold a generation: clear those, not the whole table.
    genned_.for_each_set(0, npages_, [&](std::size_t p) { gens_[p] = 0; });
    genned_.reset();
    for (std::uint64_t i = 0; i < entries; ++i) {
      std::uint64_t page, gen;
      std::memcpy(&page, g.data() + i * 16, 8);
      std::memcpy(&gen, g.data() + i * 16 + 8, 8);
      gens_[page] = gen;
      if (gen != 0) genned_.set(page);
    }
  }
  pages_held_.store(held_.count());
}

// ---- observers ----

GuestStats Guest::stats() const noexcept {
  GuestStats s;
  s.pages_written = pages_written_.load(std::memory_order_relaxed);
  s.passes = passes_.load(std::memory_order_relaxed);
  s.allocations = allocations_.load(std::memory_order_relaxed);
  s.frees = frees_.load(std::memory_order_relaxed);
  s.alloc_failures = alloc_failures_.load(std::memory_order_relaxed);
  s.rounds = rounds_.load(std::memory_order_relaxed);
  s.hints_sent = hints_sent_.load(std::memory_order_relaxed);
  s.pages_hinted = pages_hinted_.load(std::memory_order_relaxed);
  s.hints_dropped = hints_dropped_.load(std::memory_order_relaxed);
  s.pages_held = pages_held_.load(std::memory_order_relaxed);
  s.done_seen = done_seen_.load(std::memory_order_relaxed);
  s.last_cmd_id = last_cmd_.load(std::memory_order_relaxed);
  s.free_pages = avail_.count();
  s.allocated_pages = allocated_.count();
  return s;
}

std::vector<std::uint8_t> Guest::page_states() const {
  std::vector<std::uint8_t> out(npages_);
  for (std::uint64_t p = 0; p < npages_; ++p) {
    if (held_.test(p))
      out[p] = static_cast<std::uint8_t>(PageState::Held);
    else if (!allocated_.test(p))
      out[p] = static_cast<std::uint8_t>(PageState::Free);
  }
  return out;
}

std::vector<std::uint64_t> Guest::generations() const {
  std::lock_guard lk(mu_);
  if (!quiescent()) throw std::invalid_argument("generations() needs a paused or stopped guest");
  return {gens_, gens_ + npages_};
}

}  // namespace livemig::guest
