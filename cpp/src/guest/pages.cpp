// The guest's page format, configuration checks and the increment oracle.
#include <cmath>
#include <stdexcept>
#include <string>

#include "livemig/guest/guest.hpp"

namespace livemig::guest {

void write_page(std::uint64_t* page, std::size_t words, std::uint64_t index, std::uint64_t gen) noexcept {
  page[0] = (index << 8) | (gen & 0xFF);
  page[1] = gen;
  const std::uint64_t key = page_key(index, gen);
  // Independent words: the compiler vectorises this into wide stores.
  for (std::size_t k = 2; k < words; ++k) page[k] = page_word(key, k);
}

Workload parse_workload(const std::string& name) {
  if (name == "idle") return Workload::Idle;
  if (name == "increment") return Workload::Increment;
  if (name == "random") return Workload::Random;
  if (name == "hotset") return Workload::Hotset;
  throw std::invalid_argument("unknown workload '" + name + "' (idle, increment, random, hotset)");
}

const char* workload_name(Workload w) noexcept {
  switch (w) {
    case Workload::Idle: return "idle";
    case Workload::Increment: return "increment";
    case Workload::Random: return "random";
    case Workload::Hotset: return "hotset";
  }
  return "?";
}

namespace {
void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}
bool finite_nonneg(double v) { return std::isfinite(v) && v >= 0; }
}  // namespace

void validate(const GuestConfig& c) {
  require(c.page_size >= 64 && (c.page_size & (c.page_size - 1)) == 0,
          "page_size must be a power of two >= 64, got " + std::to_string(c.page_size));
  require(static_cast<unsigned>(c.workload) <= 3, "workload out of range");
  require(static_cast<unsigned>(c.fill) <= 1, "fill out of range");
  require(finite_nonneg(c.rate), "rate must be a finite number >= 0 (pages/s; 0 = unpaced)");
  require(finite_nonneg(c.churn), "churn must be a finite number >= 0 (pages/s)");
  require(std::isfinite(c.free_fraction) && c.free_fraction >= 0 && c.free_fraction < 1,
          "free_fraction must be in [0, 1)");
  require(std::isfinite(c.hot_fraction) && c.hot_fraction >= 0 && c.hot_fraction <= 1,
          "hot_fraction must be in [0, 1]");
  require(std::isfinite(c.hint_reserve) && c.hint_reserve >= 0 && c.hint_reserve <= 1,
          "hint_reserve must be in [0, 1]");
  require(c.threads >= 1 && c.threads <= 64, "threads must be in [1, 64]");
  require(c.poll_interval_us >= 10 && c.poll_interval_us <= 1000000, "poll_interval_us must be in [10, 1e6]");
  require(c.workload != Workload::Hotset || c.hotset_pages >= 1, "hotset_pages must be >= 1 for hotset");
  // The oracle needs every allocated page incremented once per pass, in address order, by one
  // thread, and a fixed set of allocated pages.
  require(c.workload != Workload::Increment || c.churn == 0, "the increment workload cannot have churn");
  require(c.workload != Workload::Increment || c.threads == 1, "the increment workload runs one writer thread");
}

IncrementCheck check_increment(const std::uint8_t* region, std::size_t page_size, std::size_t npages,
                               std::span<const std::uint8_t> excepted) {
  IncrementCheck r;
  bool first = true;
  std::uint8_t prev = 0;
  for (std::size_t p = 0; p < npages; ++p) {
    if (!excepted.empty() && excepted[p] != 0) continue;
    const std::uint8_t v = region[p * page_size];
    ++r.pages_checked;
    if (first) {
      r.value = prev = v;
      first = false;
      continue;
    }
    if (v != prev) {
      if (r.break_page < 0 && v == static_cast<std::uint8_t>(prev - 1)) {
        r.break_page = static_cast<std::int64_t>(p);
      } else {
        r.ok = false;
        if (r.bad.size() < 16) r.bad.push_back(p);
      }
    }
    prev = v;
  }
  return r;
}

}  // namespace livemig::guest
