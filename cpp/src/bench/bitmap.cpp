#include "livemig/bench/bitmap.hpp"

#include <atomic>
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
