// Multithreaded stress test of PageBitmap: threads race test-and-set, range set, harvest and merge
// on overlapping ranges, and every bit must change hands exactly once. Built and run under
// ThreadSanitizer by .ci/run; also useful as a plain release binary.
#include <atomic>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "livemig/bitmap/page_bitmap.hpp"
#include "check.hpp"

using livemig::PageBitmap;

namespace {

constexpr std::size_t kPages = 64 * 1024 + 37;  // not a multiple of 64
constexpr int kThreads = 4;

// Every bit is won by exactly one of the threads racing test_and_set over the whole bitmap.
void race_test_and_set() {
  PageBitmap bm(kPages);
  std::vector<std::atomic<int>> winners(kPages);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      // Different orders so threads collide everywhere.
      for (std::size_t k = 0; k < kPages; ++k) {
        const std::size_t i = (t % 2 == 0) ? k : kPages - 1 - k;
        if (!bm.test_and_set(i)) winners[i].fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (auto& th : ts) th.join();
  for (std::size_t i = 0; i < kPages; ++i) CHECK(winners[i].load() == 1);
  CHECK(bm.count() == kPages);

  // And the reverse: test_and_clear hands each bit to exactly one thread.
  for (auto& w : winners) w.store(0);
  ts.clear();
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      for (std::size_t k = 0; k < kPages; ++k) {
        const std::size_t i = (k * 7919 + static_cast<std::size_t>(t) * 104729) % kPages;
        if (bm.test_and_clear(i)) winners[i].fetch_add(1, std::memory_order_relaxed);
      }
      for (std::size_t i = 0; i < kPages; ++i)
        if (bm.test_and_clear(i)) winners[i].fetch_add(1, std::memory_order_relaxed);
    });
  }
  for (auto& th : ts) th.join();
  for (std::size_t i = 0; i < kPages; ++i) CHECK(winners[i].load() == 1);
  CHECK(bm.count() == 0);
}

// A producer sets disjoint chunks with set_range while harvesters take overlapping, unaligned
// ranges; some harvesters "fail" and merge back. Every set bit is finally taken exactly once.
void race_range_set_harvest_merge() {
  PageBitmap bm(kPages);
  std::vector<std::atomic<int>> taken_count(kPages);
  std::atomic<bool> producer_done{false};

  auto record = [&](std::size_t begin, std::size_t end, const std::vector<PageBitmap::Word>& taken) {
    const std::size_t wb = begin / 64;
    for (std::size_t k = 0; k < PageBitmap::words_spanned(begin, end); ++k) {
      PageBitmap::Word w = taken[k];
      while (w != 0) {
        const std::size_t bit = static_cast<std::size_t>(__builtin_ctzll(w));
        w &= w - 1;
        taken_count[(wb + k) * 64 + bit].fetch_add(1, std::memory_order_relaxed);
      }
    }
  };

  std::thread producer([&] {
    std::mt19937_64 rng(1);
    std::size_t pos = 0;
    while (pos < kPages) {
      const std::size_t len = 1 + rng() % 300;
      const std::size_t end = pos + len < kPages ? pos + len : kPages;
      bm.set_range(pos, end);
      pos = end;
    }
    producer_done.store(true, std::memory_order_release);
  });

  std::vector<std::thread> harvesters;
  for (int t = 0; t < kThreads - 1; ++t) {
    harvesters.emplace_back([&, t] {
      std::mt19937_64 rng(100 + static_cast<unsigned>(t));
      std::vector<PageBitmap::Word> buf;
      bool last_round = false;
      while (!last_round) {
        last_round = producer_done.load(std::memory_order_acquire);
        for (int r = 0; r < 200; ++r) {
          const std::size_t begin = rng() % kPages;
          const std::size_t end = begin + 1 + rng() % (kPages - begin);
          buf.assign(PageBitmap::words_spanned(begin, end), 0);
          bm.harvest(begin, end, buf);
          if (rng() % 4 == 0) {
            bm.merge(begin, end, buf);  // a failed send: the bits go back, not lost
          } else {
            record(begin, end, buf);
          }
        }
      }
    });
  }
  producer.join();
  for (auto& th : harvesters) th.join();
  std::vector<PageBitmap::Word> rest(PageBitmap::words_spanned(0, kPages));
  bm.harvest(0, kPages, rest);
  record(0, kPages, rest);
  for (std::size_t i = 0; i < kPages; ++i) CHECK(taken_count[i].load() == 1);
  CHECK(bm.count() == 0);
}

// Dense words, hot from every side: setters test_and_set bits over and over while one thread
// test_and_clears and another harvests whole and unaligned ranges (the paired 16-byte path, its
// retry and its fall-back to single exchanges). Exact per bit: every 0->1 transition a setter won
// is taken exactly once, by test_and_clear or a harvest, or is still set at the end.
void race_dense_harvest_exactly_once() {
  constexpr std::size_t kDense = 4096 + 3 * 64 + 5;  // odd word count and a partial tail word
  PageBitmap bm(kDense, true);
  std::vector<std::atomic<long>> wins(kDense), takes(kDense);
  for (std::size_t i = 0; i < kDense; ++i) wins[i].store(1);  // the initial fill counts as a win
  std::atomic<bool> stop{false};
  std::atomic<int> running{0};
  const auto take_words = [&](std::size_t begin, std::size_t end, const std::vector<PageBitmap::Word>& got) {
    for (std::size_t k = 0; k < PageBitmap::words_spanned(begin, end); ++k)
      for (PageBitmap::Word w = got[k]; w != 0; w &= w - 1)
        takes[(begin / 64 + k) * 64 + static_cast<std::size_t>(__builtin_ctzll(w))].fetch_add(1);
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < 2; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(7 + static_cast<unsigned>(t));
      running.fetch_add(1);
      while (!stop.load(std::memory_order_relaxed)) {
        const std::size_t base = rng() % kDense;
        for (std::size_t k = 0; k < 256; ++k) {
          const std::size_t i = (base + k) % kDense;
          if (!bm.test_and_set(i)) wins[i].fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  }
  ts.emplace_back([&] {
    std::mt19937_64 rng(11);
    running.fetch_add(1);
    while (!stop.load(std::memory_order_relaxed)) {
      const std::size_t i = rng() % kDense;
      if (bm.test_and_clear(i)) takes[i].fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (running.load() < 3) std::this_thread::yield();  // every racer is in its loop
  std::mt19937_64 rng(13);
  std::vector<PageBitmap::Word> buf;
  for (int round = 0; round < 50000; ++round) {
    const bool whole = round % 2 == 0;
    const std::size_t begin = whole ? 0 : rng() % kDense;
    const std::size_t end = whole ? kDense : begin + rng() % (kDense - begin + 1);
    buf.assign(PageBitmap::words_spanned(begin, end), 0);
    const std::size_t n = bm.harvest(begin, end, buf);
    std::size_t bits = 0;
    for (const auto w : buf) bits += static_cast<std::size_t>(std::popcount(w));
    CHECK(n == bits);
    take_words(begin, end, buf);
  }
  stop.store(true);
  for (auto& th : ts) th.join();
  for (std::size_t i = 0; i < kDense; ++i) CHECK(wins[i].load() == takes[i].load() + (bm.test(i) ? 1 : 0));
}

// Whole-bitmap ops race single-bit writers without losing their bits.
void race_whole_ops() {
  PageBitmap a(kPages), b(kPages, true);
  std::thread setter([&] {
    for (std::size_t i = 0; i < kPages; i += 3) a.set(i);
  });
  std::thread orer([&] {
    PageBitmap evens(kPages);
    for (std::size_t i = 0; i < kPages; i += 2) evens.set(i);
    a.or_with(evens);
    b.and_not(evens);
  });
  setter.join();
  orer.join();
  for (std::size_t i = 0; i < kPages; ++i) {
    CHECK(a.test(i) == (i % 3 == 0 || i % 2 == 0));
    CHECK(b.test(i) == (i % 2 == 1));
  }
}

}  // namespace

template <void (*F)()>
void thrice() {
  for (int rep = 0; rep < 3; ++rep) F();
}

int main(int argc, char** argv) {
  return livemig::test::run(argc, argv,
                            {{"test_and_set", thrice<race_test_and_set>},
                             {"range_set_harvest_merge", thrice<race_range_set_harvest_merge>},
                             {"dense_harvest_exactly_once", thrice<race_dense_harvest_exactly_once>},
                             {"whole_ops", thrice<race_whole_ops>}});
}
