#include "livemig/bench/bitmap.hpp"

#include <atomic>
#include <barrier>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

namespace livemig::bench::bitmap {

double test_and_set(PageBitmap& b, int threads, std::size_t ops, bool plain) {
  const std::size_t n = b.size();
  if (n == 0 || threads < 1) throw std::invalid_argument("need a non-empty bitmap and threads >= 1");
  std::vector<std::thread> ts;
  std::vector<std::vector<PageBitmap::Word>> privates(static_cast<std::size_t>(threads),
                                                      std::vector<PageBitmap::Word>(b.word_count()));
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      auto& mine = privates[static_cast<std::size_t>(t)];
      std::size_t won = 0;
      for (std::size_t k = 0; k < ops; ++k) {
        const std::size_t i = (k * 64 + k / (n / 64 == 0 ? 1 : n / 64)) % n;  // walks words, then bits
        if (plain) {
          PageBitmap::Word& w = mine[i / 64];
          const PageBitmap::Word bit = PageBitmap::Word{1} << (i % 64);
          won += (w & bit) == 0;
          w |= bit;
        } else {
          won += !b.test_and_set(i);
        }
      }
      mine[0] += won;  // keep the work observable
    });
  }
  for (auto& th : ts) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<std::uint32_t> race_claims(PageBitmap& b, int threads, int rounds, bool split_rmw) {
  const std::size_t n = b.size();
  if (n == 0 || threads < 2 || rounds < 1)
    throw std::invalid_argument("need a non-empty bitmap, threads >= 2 and rounds >= 1");
  std::vector<std::atomic<std::uint32_t>> wins(n);
  std::barrier sync(threads);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      const std::size_t shift = static_cast<std::size_t>(t) * 37 % n;
      for (int r = 0; r < rounds; ++r) {
        sync.arrive_and_wait();  // the bitmap is clear; everyone starts together
        for (std::size_t k = 0; k < n; ++k) {
          const std::size_t j = (k + shift) % n;
          const std::size_t i = (t % 2 == 0) ? j : n - 1 - j;  // orders that collide
          bool won = false;
          if (split_rmw) {
            // Relaxed: this models an implementation that forgot the read-modify-write entirely.
            std::atomic<PageBitmap::Word>& w = b.word(i / 64);
            const PageBitmap::Word bit = PageBitmap::Word{1} << (i % 64);
            const PageBitmap::Word old = w.load(std::memory_order_relaxed);
            won = (old & bit) == 0;
            if (k % 8 == 0) std::this_thread::yield();  // a preemption here, as the scheduler may do
            w.store(old | bit, std::memory_order_relaxed);
          } else {
            won = !b.test_and_set(i);
          }
          if (won) wins[i].fetch_add(1, std::memory_order_relaxed);
        }
        sync.arrive_and_wait();  // everyone is done with this round
        if (t == 0 && r + 1 < rounds) b.reset();
      }
    });
  }
  for (auto& th : ts) th.join();
  std::vector<std::uint32_t> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = wins[i].load(std::memory_order_relaxed);
  return out;
}

std::size_t find_walk(const PageBitmap& b, bool set) {
  std::size_t hits = 0;
  const auto next = [&](std::size_t from) { return set ? b.find_next_set(from) : b.find_next_clear(from); };
  for (std::size_t i = next(0); i != PageBitmap::npos; i = next(i + 1)) ++hits;
  return hits;
}

double exchange_loop(std::size_t words) {
  std::vector<std::atomic<PageBitmap::Word>> a(words);
  std::vector<PageBitmap::Word> out(words);
  for (auto& w : a) w.store(~PageBitmap::Word{0}, std::memory_order_relaxed);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < words; ++i) out[i] = a[i].exchange(0, std::memory_order_acq_rel);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out[words / 2] == 0 ? -1.0 : secs;
}

}  // namespace livemig::bench::bitmap
