#include "livemig/page_bitmap.hpp"

#include <bit>
#include <cstring>

namespace livemig {

using Word = PageBitmap::Word;
static_assert(std::atomic<Word>::is_always_lock_free);
static_assert(sizeof(std::atomic<Word>) == sizeof(Word) && alignof(std::atomic<Word>) == alignof(Word),
              "raw_words() views the atomics as plain words");
static_assert(std::endian::native == std::endian::little, "the byte export assumes a little-endian host");

namespace {
constexpr Word kAll = ~Word{0};
constexpr std::size_t kBits = PageBitmap::kWordBits;
// Orders used throughout; see the header for why acquire/acq_rel.
constexpr auto kLoad = std::memory_order_acquire;
constexpr auto kRmw = std::memory_order_acq_rel;
constexpr auto kStore = std::memory_order_release;
}  // namespace

PageBitmap::PageBitmap(std::size_t size, bool all_set)
    : size_(size), words_((size + kBits - 1) / kBits), data_(new std::atomic<Word>[words_ == 0 ? 1 : words_]()) {
  if (all_set) set_range(0, size_);
}

std::size_t PageBitmap::words_spanned(std::size_t begin, std::size_t end) noexcept {
  if (begin >= end) return 0;
  return (end - 1) / kBits - begin / kBits + 1;
}

Word PageBitmap::tail_mask() const noexcept {
  const std::size_t r = size_ % kBits;
  return r == 0 ? kAll : (Word{1} << r) - 1;
}

const Word* PageBitmap::raw_words() const noexcept { return reinterpret_cast<const Word*>(data_.get()); }

bool PageBitmap::test(std::size_t i) const noexcept {
  return (data_[i / kBits].load(kLoad) >> (i % kBits)) & 1U;
}

void PageBitmap::set(std::size_t i) noexcept { data_[i / kBits].fetch_or(Word{1} << (i % kBits), kRmw); }

void PageBitmap::clear(std::size_t i) noexcept { data_[i / kBits].fetch_and(~(Word{1} << (i % kBits)), kRmw); }

bool PageBitmap::test_and_set(std::size_t i) noexcept {
  const Word bit = Word{1} << (i % kBits);
  return (data_[i / kBits].fetch_or(bit, kRmw) & bit) != 0;
}

bool PageBitmap::test_and_clear(std::size_t i) noexcept {
  const Word bit = Word{1} << (i % kBits);
  return (data_[i / kBits].fetch_and(~bit, kRmw) & bit) != 0;
}

void PageBitmap::set_range(std::size_t begin, std::size_t end) noexcept {
  if (begin >= end) return;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  if (wb == we) {
    data_[wb].fetch_or(range_mask_for_word(wb, begin, end), kRmw);
    return;
  }
  data_[wb].fetch_or(range_mask_for_word(wb, begin, end), kRmw);
  // Whole words: a plain atomic store is enough (every bit of the word takes the new value) and
  // is several times cheaper than a locked RMW.
  for (std::size_t w = wb + 1; w < we; ++w) data_[w].store(kAll, kStore);
  data_[we].fetch_or(range_mask_for_word(we, begin, end), kRmw);
}

void PageBitmap::clear_range(std::size_t begin, std::size_t end) noexcept {
  if (begin >= end) return;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  if (wb == we) {
    data_[wb].fetch_and(~range_mask_for_word(wb, begin, end), kRmw);
    return;
  }
  data_[wb].fetch_and(~range_mask_for_word(wb, begin, end), kRmw);
  for (std::size_t w = wb + 1; w < we; ++w) data_[w].store(0, kStore);
  data_[we].fetch_and(~range_mask_for_word(we, begin, end), kRmw);
}

std::size_t PageBitmap::count(std::size_t begin, std::size_t end) const noexcept {
  if (begin >= end) return 0;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  if (wb == we) return static_cast<std::size_t>(std::popcount(data_[wb].load(kLoad) & range_mask_for_word(wb, begin, end)));
  std::size_t n = static_cast<std::size_t>(std::popcount(data_[wb].load(kLoad) & range_mask_for_word(wb, begin, end)));
  for (std::size_t w = wb + 1; w < we; ++w) n += static_cast<std::size_t>(std::popcount(data_[w].load(kLoad)));
  n += static_cast<std::size_t>(std::popcount(data_[we].load(kLoad) & range_mask_for_word(we, begin, end)));
  return n;
}

bool PageBitmap::none(std::size_t begin, std::size_t end) const noexcept {
  return find_next_set(begin, end) == npos;
}

std::vector<std::pair<std::size_t, std::size_t>> PageBitmap::runs(std::size_t begin, std::size_t end) const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for_each_run(begin, end, [&](std::size_t s, std::size_t n) { out.emplace_back(s, n); });
  return out;
}

std::size_t PageBitmap::harvest(std::size_t begin, std::size_t end, std::span<Word> taken) noexcept {
  if (begin >= end) return 0;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  // Edge words: only the bits inside the range are taken.
  const auto take_masked = [&](std::size_t w) -> Word {
    const Word mask = range_mask_for_word(w, begin, end);
    return (data_[w].load(kLoad) & mask) != 0 ? data_[w].fetch_and(~mask, kRmw) & mask : 0;
  };
  std::size_t n = 0;
  taken[0] = take_masked(wb);
  n += static_cast<std::size_t>(std::popcount(taken[0]));
  if (we == wb) return n;
  for (std::size_t w = wb + 1; w < we; ++w) {
    // Skip the locked exchange (about 10 ns here) for words that read as empty: a bit set after
    // this load is left for the next harvest, as if it had been set after the whole call.
    const Word v = data_[w].load(kLoad);
    const Word got = v != 0 ? data_[w].exchange(0, kRmw) : 0;
    taken[w - wb] = got;
    n += static_cast<std::size_t>(std::popcount(got));
  }
  taken[we - wb] = take_masked(we);
  n += static_cast<std::size_t>(std::popcount(taken[we - wb]));
  return n;
}

void PageBitmap::merge(std::size_t begin, std::size_t end, std::span<const Word> taken) noexcept {
  if (begin >= end) return;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  for (std::size_t w = wb; w <= we; ++w) {
    const Word bits = taken[w - wb] & ((w == wb || w == we) ? range_mask_for_word(w, begin, end) : kAll);
    if (bits != 0) data_[w].fetch_or(bits, kRmw);
  }
}

void PageBitmap::or_with(const PageBitmap& other) noexcept {
  for (std::size_t w = 0; w < words_; ++w) {
    const Word v = other.data_[w].load(kLoad);
    if (v != 0) data_[w].fetch_or(v, kRmw);
  }
}

void PageBitmap::and_not(const PageBitmap& other) noexcept {
  for (std::size_t w = 0; w < words_; ++w) {
    const Word v = other.data_[w].load(kLoad);
    if (v != 0) data_[w].fetch_and(~v, kRmw);
  }
}

void PageBitmap::and_with(const PageBitmap& other) noexcept {
  for (std::size_t w = 0; w < words_; ++w) {
    const Word v = other.data_[w].load(kLoad);
    if (v != kAll) data_[w].fetch_and(v, kRmw);
  }
}

void PageBitmap::complement() noexcept {
  if (words_ == 0) return;
  for (std::size_t w = 0; w + 1 < words_; ++w) data_[w].fetch_xor(kAll, kRmw);
  data_[words_ - 1].fetch_xor(tail_mask(), kRmw);
}

void PageBitmap::export_bytes(std::span<std::uint8_t> out) const noexcept {
  const std::size_t nbytes = byte_size();
  for (std::size_t w = 0; w < words_; ++w) {
    const Word v = data_[w].load(kLoad);
    const std::size_t off = w * sizeof(Word);
    std::memcpy(out.data() + off, &v, nbytes - off < sizeof(Word) ? nbytes - off : sizeof(Word));
  }
}

bool PageBitmap::import_bytes(std::span<const std::uint8_t> in) noexcept {
  const std::size_t nbytes = byte_size();
  if (in.size() != nbytes) return false;
  if (words_ > 0) {
    Word last = 0;
    const std::size_t off = (words_ - 1) * sizeof(Word);
    std::memcpy(&last, in.data() + off, nbytes - off);
    if ((last & ~tail_mask()) != 0) return false;
  }
  for (std::size_t w = 0; w < words_; ++w) {
    Word v = 0;
    const std::size_t off = w * sizeof(Word);
    std::memcpy(&v, in.data() + off, nbytes - off < sizeof(Word) ? nbytes - off : sizeof(Word));
    data_[w].store(v, kStore);
  }
  return true;
}

}  // namespace livemig
