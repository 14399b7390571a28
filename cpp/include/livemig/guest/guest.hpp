// The guest model: plain C++ threads that use a memory region the way a VM's guest uses its RAM,
// so migrations have a real, checkable writer to move.
//
// - Writer threads run a workload: `increment` (byte 0 of each allocated page, in address order,
//   pass after pass: docs/design.md's test oracle), `random` (uniform over allocated pages), `hotset`
//   (most writes to a small range), `idle`. Rates are in pages per second, paced by batches per short
//   sleep of the writer thread (a guest that sleeps models guest work; it never busy-burns a CPU).
// - A page allocator: a free pool of a configurable fraction of the region, with churn (pages
//   allocated, written and freed per second) done by the writer threads.
// - A balloon driver thread with Linux's free page hinting behaviour, against a balloon::Port.
// - Self-describing pages (see page format below) and a generation table: verify() finds a stale,
//   lost, torn or misplaced page at any time.
// - pause() parks every guest thread at a consistent point; export_state()/import_state() carry the
//   guest to another region (a migration destination). Guest threads never touch Python, so they may
//   fault on userfaultfd-registered memory.
//
// Page ownership: every page is in exactly one of three sets: allocated (writers own it), available
// (the allocator's free pool) or held (the balloon driver hinted it and keeps it until DONE). Pages
// move between the sets only through atomic bitmap operations (test_and_clear / harvest), so each
// page has one owner. Writer thread t owns slice t of the region: only it writes, allocates or frees
// pages in its slice. The driver only moves pages available -> held -> available.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "livemig/base/fd.hpp"
#include "livemig/balloon/device.hpp"
#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig::guest {

// The balloon driver's limit: the most pages one hint reports (Linux reports free blocks of up
// to order 9, 2 MiB).
inline constexpr std::uint64_t kMaxHintPages = 512;

/// The guest's view of the balloon device (balloon/device.hpp): like Linux's driver, the guest acts
/// on a *change* of the command id it reads (polled every poll_interval_us, or at once after
/// Guest::kick()). The host must leave DONE showing until the guest has seen it (stats().done_seen
/// or last_cmd_id).
using BalloonPort = balloon::Port;

// ---- page format ----
// A self-describing page, as 64-bit little-endian words:
//   word 0: (page index << 8) | (generation & 0xff)   (the low byte is the increment counter)
//   word 1: generation
//   word k >= 2: page_word(key(index, generation), k)
// Generation 0 is the initial content: this pattern, or all zero with Fill::Zero. Writers use
// generations from 1. The increment workload changes byte 0 only.
inline constexpr std::uint64_t kKeyMulIndex = 0x9E3779B97F4A7C15ULL;
inline constexpr std::uint64_t kKeyMulGen = 0xC2B2AE3D27D4EB4FULL;
inline constexpr std::uint64_t kMix1 = 0xFF51AFD7ED558CCDULL;
inline constexpr std::uint64_t kMix2 = 0xC4CEB9FE1A85EC53ULL;
inline constexpr std::uint64_t kWordMul = 0xBF58476D1CE4E5B9ULL;

/// The per-page key of (index, generation).
constexpr std::uint64_t page_key(std::uint64_t index, std::uint64_t gen) noexcept {
  std::uint64_t z = index * kKeyMulIndex + (gen + 1) * kKeyMulGen;
  z ^= z >> 33;
  z *= kMix1;
  z ^= z >> 33;
  z *= kMix2;
  z ^= z >> 33;
  return z;
}
/// Word k (k >= 2) of a page with key `key`.
constexpr std::uint64_t page_word(std::uint64_t key, std::uint64_t k) noexcept {
  std::uint64_t z = key ^ (k * kKeyMulIndex);
  z ^= z >> 32;
  z *= kWordMul;
  z ^= z >> 29;
  return z;
}
/// Writes page `index` generation `gen` into `page` (page_size / 8 words, 8-byte aligned).
void write_page(std::uint64_t* page, std::size_t words, std::uint64_t index, std::uint64_t gen) noexcept;

enum class Workload : std::uint8_t { Idle = 0, Increment = 1, Random = 2, Hotset = 3 };
enum class Fill : std::uint8_t { Pattern = 0, Zero = 1 };

/// Parses "idle", "increment", "random", "hotset"; invalid_argument otherwise.
Workload parse_workload(const std::string& name);
const char* workload_name(Workload w) noexcept;

struct GuestConfig {
  std::size_t page_size = 4096;  // a power of two >= 64
  Workload workload = Workload::Idle;
  double rate = 0;                // workload pages/s over all writer threads; 0 = unpaced
  double free_fraction = 0;       // fraction of the region in the free pool at start (its top pages)
  double churn = 0;               // pages allocated+written and freed per second; 0 = none
  std::uint64_t hotset_pages = 64;  // hot range per writer thread (hotset)
  double hot_fraction = 0.9;      // share of hotset writes that go to the hot range
  std::uint64_t seed = 1;
  Fill fill = Fill::Pattern;
  unsigned threads = 1;           // writer threads (random, hotset, churn); increment uses one
  std::uint32_t poll_interval_us = 1000;  // balloon driver: how often it looks at the command id
  double hint_reserve = 0;        // fraction of the free pool the driver leaves unhinted
};

/// Checks a config; invalid_argument naming the field otherwise.
void validate(const GuestConfig& c);

/// Result of verify(): pages_checked + pages_excepted == pages.
struct VerifyResult {
  struct Mismatch {
    std::uint64_t page;
    const char* kind;  // "misplaced", "generation", "torn", "zero", "nonzero", "counter"
    std::uint64_t found_generation;
    std::uint64_t expected_generation;
  };
  std::uint64_t pages_checked = 0;
  std::uint64_t pages_excepted = 0;
  std::uint64_t mismatches = 0;
  std::vector<Mismatch> first;  // up to kMaxReported, in page order
  static constexpr std::size_t kMaxReported = 16;
};

/// Result of the increment oracle over the non-excepted pages.
struct IncrementCheck {
  bool ok = true;
  std::uint64_t pages_checked = 0;
  std::uint8_t value = 0;            // byte 0 of the first checked page
  std::int64_t break_page = -1;      // the first page one lower than its predecessor, -1 if none
  std::vector<std::uint64_t> bad;    // pages where the pattern breaks (up to 16)
};

/// The increment oracle (docs/design.md "Test oracle"): byte 0 of every page not in `excepted` (a
/// page-state byte per page, non-zero = skip; may be empty) is equal, except one place where the
/// next page is exactly one lower (mod 256). Reads `region` (npages * page_size bytes) only.
IncrementCheck check_increment(const std::uint8_t* region, std::size_t page_size, std::size_t npages,
                               std::span<const std::uint8_t> excepted);

/// Counters, each read atomically.
struct GuestStats {
  std::uint64_t pages_written = 0;  // workload and churn page writes
  std::uint64_t passes = 0;         // increment: completed passes
  std::uint64_t allocations = 0, frees = 0, alloc_failures = 0;
  std::uint64_t rounds = 0;          // rounds acknowledged
  std::uint64_t hints_sent = 0, pages_hinted = 0, hints_dropped = 0;
  std::uint64_t pages_held = 0, done_seen = 0;
  std::uint32_t last_cmd_id = 0;
  std::uint64_t free_pages = 0;      // in the pool now
  std::uint64_t allocated_pages = 0;
  bool operator==(const GuestStats&) const = default;
};

/// Per-page state for page_states(): allocated, in the free pool, held by the balloon driver.
enum class PageState : std::uint8_t { Allocated = 0, Free = 1, Held = 2 };

class Guest {
 public:
  /// A guest on `region` (size a multiple of page_size, 8-byte aligned, not owned; must outlive the
  /// guest). Writes generation 0 into every page unless Fill::Zero (the region is then taken as all
  /// zero). `port` may be null (no balloon driver). Not started.
  Guest(std::uint8_t* region, std::size_t bytes, const GuestConfig& config, std::shared_ptr<BalloonPort> port);
  /// A guest resumed from export_state() bytes on `region` (which already holds the memory); the
  /// region must have the exported size. Not started. invalid_argument on malformed state.
  Guest(std::uint8_t* region, std::size_t bytes, std::span<const std::uint8_t> state,
        std::shared_ptr<BalloonPort> port);
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;
  /// Stops and joins every thread (blocks while one is blocked in an unresolved page fault).
  ~Guest();

  /// Touches the generation table now, so that a later import_state() (a migration's destination,
  /// inside the downtime) writes only warm memory: first touch of fresh memory is slow.
  void prefault();
  /// Starts the threads; a no-op when running or paused. Restartable after stop().
  void start();
  /// Parks every guest thread at a consistent point and returns when all are parked (so memory,
  /// allocator, driver and generation table are quiescent). Idempotent; a no-op when not started.
  /// Blocks for as long as a thread is blocked in a page fault.
  void pause();
  /// Lets parked threads run again; starts them if never started. Idempotent.
  void resume();
  /// Stops and joins every thread (paused or not); blocks while a thread is blocked in a page
  /// fault. Idempotent. Not to be called concurrently with start().
  void stop();
  /// True while threads exist and are not parked by pause().
  bool running() const;

  /// Wakes the balloon driver now (after a host command change) instead of at its next poll.
  void kick();

  /// Checks every page not free or held against the generation table (and, for increment, byte 0
  /// against the pass cursor). Pauses a running guest for the check and resumes it after.
  VerifyResult verify();
  /// The increment oracle on this guest's region with free and held pages excepted (pauses a
  /// running guest for the check).
  IncrementCheck check_increment();

  /// The guest's state as bytes (config, counters, cursors, page sets, generation table, the
  /// driver's last command id). invalid_argument unless paused or stopped.
  std::vector<std::uint8_t> export_state() const;
  /// Replaces this guest's state by exported bytes (same page size and page count).
  /// invalid_argument when threads exist (stop() first) or the bytes are malformed.
  void import_state(std::span<const std::uint8_t> state);

  /// The counters now.
  GuestStats stats() const noexcept;
  /// A snapshot of every page's PageState (racy while running: each page is read atomically).
  std::vector<std::uint8_t> page_states() const;
  /// The generation table; invalid_argument unless paused or stopped.
  std::vector<std::uint64_t> generations() const;

  const GuestConfig& config() const noexcept { return cfg_; }
  std::size_t pages() const noexcept { return npages_; }
  std::size_t page_size() const noexcept { return cfg_.page_size; }

 private:
  struct Slice {
    std::uint64_t begin = 0, end = 0;  // pages [begin, end)
    std::uint64_t rng = 0;             // splitmix64 state
    std::uint64_t cursor = 0;          // increment: next page; churn: next allocation probe
    std::uint64_t free_cursor = 0;     // churn: next free probe (unused: random)
  };
  enum class Park : std::uint8_t { Run, Resumed, Stop };

  void init_layout();
  void fill_initial();
  void writer_main(unsigned t);
  void driver_main();
  // Parks here while paused; Stop when the guest is stopping.
  Park park_point();
  // Sleeps up to `d` or until pause/stop/kick; false when stopping.
  void nap(std::chrono::microseconds d, bool driver);
  void write_one(Slice& s);
  void increment_one(Slice& s);
  void churn_one(Slice& s);
  std::uint64_t pick_allocated(Slice& s, std::uint64_t lo, std::uint64_t hi);
  void write_gen(std::uint64_t page);
  // import_state without the thread check.
  void load_state(std::span<const std::uint8_t> state);
  void driver_round(std::uint32_t id);
  void driver_release();
  bool quiescent() const;  // no threads, or all parked (requires mu_)
  VerifyResult verify_locked() const;

  std::uint8_t* region_;
  std::size_t npages_ = 0;
  std::size_t words_ = 0;  // words per page
  GuestConfig cfg_;
  std::shared_ptr<BalloonPort> port_;

  PageBitmap allocated_, avail_, held_;
  // The generation table: one word per page, on its own anonymous mapping so that a fresh table is
  // zero without being touched (first touch is slow, and a resumed guest is built during downtime).
  // Written by the slice's writer thread; read when quiescent.
  Mapping gens_map_;
  std::uint64_t* gens_ = nullptr;
  // Pages whose generation is not zero: export and import walk these, not the whole table, so the
  // state's cost in the downtime follows what was written, not the region's size.
  PageBitmap genned_;
  // Where an imported state's page sets are decoded and checked before anything changes: made with
  // the guest (warm), so an import inside the downtime allocates and faults in nothing.
  PageBitmap spare_alloc_, spare_held_;
  std::vector<Slice> slices_;
  std::uint64_t reserve_pages_ = 0;  // the driver leaves this many pages in the pool

  // Counters: relaxed, they order nothing (the park handshake orders what readers need).
  std::atomic<std::uint64_t> pages_written_{0}, passes_{0}, allocations_{0}, frees_{0}, alloc_failures_{0};
  std::atomic<std::uint64_t> rounds_{0}, hints_sent_{0}, pages_hinted_{0}, hints_dropped_{0};
  std::atomic<std::uint64_t> pages_held_{0}, done_seen_{0};
  std::atomic<std::uint32_t> last_cmd_{balloon::kCmdStop};

  // Thread control. Flags are changed under mu_ and also read lock-free (acquire) on the fast path.
  mutable std::mutex mu_;
  std::condition_variable cv_;         // threads wait here (naps and parks)
  std::condition_variable parked_cv_;  // pause() waits here for parked_ == threads_.size()
  std::atomic<bool> pause_req_{false}, stop_req_{false};
  bool kick_ = false;
  std::size_t parked_ = 0;
  std::vector<std::thread> threads_;
};

}  // namespace livemig::guest
