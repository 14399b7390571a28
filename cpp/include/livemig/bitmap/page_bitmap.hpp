// PageBitmap: one bit per page, lock-free and safe to mutate from any number of threads.
//
// Units: every index is a page number (not a byte offset); ranges are half-open [begin, end).
// Storage: 64-bit words, little-endian bit order (page i is bit i % 64 of word i / 64). Bits past
// size() in the last word are always zero.
//
// Memory order: every read-modify-write is acq_rel and every load is acquire, so a thread that sees
// a bit set also sees what the setter wrote before setting it (a page placed before its received bit).
// On x86-64 these cost the same as relaxed: a locked instruction or a plain load. Two exceptions,
// both x86-only and both off under ThreadSanitizer (which cannot check them): count() reads the
// middle words with vector loads (still a per-word snapshot), and harvest() takes aligned word
// pairs with one lock cmpxchg16b (a full barrier, atomic against the 8-byte RMWs on either word).
//
// Range operations are atomic per word, not as a whole: a concurrent reader may see a range half set.
// Each bit still changes exactly once per racing set/clear, so test_and_set and harvest hand every
// bit to exactly one caller.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace livemig {

/// The popcount kernels behind PageBitmap::count(); kAuto picks the widest this CPU runs.
enum class CountKernel { kAuto, kScalar, kAvx2, kAvx512 };

class PageBitmap {
 public:
  static constexpr std::size_t kWordBits = 64;
  using Word = std::uint64_t;

  /// An empty-handed find returns npos.
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  /// A bitmap of `size` pages, all clear (or all set when `all_set`). Allocation may throw bad_alloc.
  explicit PageBitmap(std::size_t size, bool all_set = false);
  PageBitmap(const PageBitmap&) = delete;
  PageBitmap& operator=(const PageBitmap&) = delete;
  PageBitmap(PageBitmap&&) noexcept = default;
  PageBitmap& operator=(PageBitmap&&) noexcept = default;
  ~PageBitmap() = default;

  /// Number of pages.
  std::size_t size() const noexcept { return size_; }
  /// Number of 64-bit words, ceil(size / 64).
  std::size_t word_count() const noexcept { return words_; }
  /// Number of 64-bit words that cover [begin, end) on the word grid; 0 for an empty range.
  static std::size_t words_spanned(std::size_t begin, std::size_t end) noexcept;

  // Single pages. Precondition: i < size() (checked by the bindings, not here).
  /// Reads bit i.
  bool test(std::size_t i) const noexcept;
  /// Sets bit i.
  void set(std::size_t i) noexcept;
  /// Clears bit i.
  void clear(std::size_t i) noexcept;
  /// Sets bit i and returns its old value; among racing callers exactly one sees false.
  bool test_and_set(std::size_t i) noexcept;
  /// Clears bit i and returns its old value; among racing callers exactly one sees true.
  bool test_and_clear(std::size_t i) noexcept;

  // Ranges. Precondition: begin <= end <= size(). Whole words in the middle, masks at the edges.
  /// Sets [begin, end).
  void set_range(std::size_t begin, std::size_t end) noexcept;
  /// Clears [begin, end).
  void clear_range(std::size_t begin, std::size_t end) noexcept;
  /// Counts set bits in [begin, end).
  std::size_t count(std::size_t begin, std::size_t end) const noexcept;
  /// Counts all set bits.
  std::size_t count() const noexcept { return count(0, size_); }
  /// count(begin, end) with a given kernel (for tests and benchmarks); one this CPU or build cannot
  /// run falls back to scalar.
  std::size_t count_with(std::size_t begin, std::size_t end, CountKernel kernel) const noexcept;
  /// True when count_with(..., kernel) really runs `kernel` here (never for SIMD under TSan).
  static bool kernel_available(CountKernel kernel) noexcept;
  /// True when no bit in [begin, end) is set.
  bool none(std::size_t begin, std::size_t end) const noexcept;

  /// First set bit at or after `from`, or npos. `from` may be >= size().
  std::size_t find_next_set(std::size_t from) const noexcept;
  /// First clear bit at or after `from`, or npos.
  std::size_t find_next_clear(std::size_t from) const noexcept;
  /// First set bit in [from, end), or npos.
  std::size_t find_next_set(std::size_t from, std::size_t end) const noexcept;
  /// First clear bit in [from, end), or npos.
  std::size_t find_next_clear(std::size_t from, std::size_t end) const noexcept;

  /// Calls fn(page) for each set bit in [begin, end), ascending; each word is loaded once.
  template <class Fn>
  void for_each_set(std::size_t begin, std::size_t end, Fn&& fn) const;

  /// Calls fn(start, length) for each maximal run of set bits in [begin, end), in order.
  /// fn returns void, or bool where false stops the walk. Reads are per word: a run that
  /// concurrent writers change while it is walked is reported as it was seen.
  template <class Fn>
  void for_each_run(std::size_t begin, std::size_t end, Fn&& fn) const;
  /// The maximal runs of set bits in [begin, end) as (start, length) pairs.
  std::vector<std::pair<std::size_t, std::size_t>> runs(std::size_t begin, std::size_t end) const;

  // Harvest and merge back. `taken` is on the bitmap's word grid: taken[k] holds the bits of word
  // begin / 64 + k that lie in [begin, end). Precondition: taken.size() >= words_spanned(begin, end).
  /// Atomically takes and clears [begin, end) word by word (get-and-clear), writing the taken bits
  /// to `taken`; returns how many bits were taken. A bit set concurrently is either taken or left.
  std::size_t harvest(std::size_t begin, std::size_t end, std::span<Word> taken) noexcept;
  /// ORs bits taken by harvest back in (for a failed send); bits outside [begin, end) are ignored.
  void merge(std::size_t begin, std::size_t end, std::span<const Word> taken) noexcept;

  // Whole-bitmap operations. Precondition: other.size() == size() (checked by the bindings).
  // Atomic per word in `this`; `other` is read word by word.
  /// this |= other.
  void or_with(const PageBitmap& other) noexcept;
  /// this &= ~other.
  void and_not(const PageBitmap& other) noexcept;
  /// this &= other.
  void and_with(const PageBitmap& other) noexcept;
  /// this = ~this (tail bits past size() stay zero).
  void complement() noexcept;
  /// Sets every bit.
  void fill() noexcept { set_range(0, size_); }
  /// Clears every bit.
  void reset() noexcept { clear_range(0, size_); }

  // Bytes: little-endian, ceil(size / 8) bytes, page i is bit i % 8 of byte i / 8.
  /// Number of bytes export_bytes writes.
  std::size_t byte_size() const noexcept { return (size_ + 7) / 8; }
  /// Copies the bitmap out. Precondition: out.size() == byte_size().
  void export_bytes(std::span<std::uint8_t> out) const noexcept;
  /// Replaces the bitmap (atomically per word). Returns false, changing nothing, when in.size() !=
  /// byte_size() or a bit past size() is set.
  bool import_bytes(std::span<const std::uint8_t> in) noexcept;

  /// The words, for read-only views. Each word is a lock-free std::atomic<uint64_t>, laid out as a
  /// plain uint64_t (checked in the .cpp); readers that bypass the atomic see a word as it was at
  /// some moment.
  const Word* raw_words() const noexcept;
  /// Direct word access for the core (scanners, senders): atomic word i.
  std::atomic<Word>& word(std::size_t i) noexcept { return data_[i]; }
  const std::atomic<Word>& word(std::size_t i) const noexcept { return data_[i]; }

 private:
  Word tail_mask() const noexcept;

  std::size_t size_ = 0;
  std::size_t words_ = 0;
  std::unique_ptr<std::atomic<Word>[]> data_;
};

// Mask of the bits of word `w` that lie in [begin, end); requires the word to overlap the range.
inline PageBitmap::Word range_mask_for_word(std::size_t w, std::size_t begin, std::size_t end) noexcept {
  const std::size_t lo = w * PageBitmap::kWordBits;
  const std::size_t b = begin > lo ? begin - lo : 0;
  const std::size_t e = end - lo >= PageBitmap::kWordBits ? PageBitmap::kWordBits : end - lo;
  const PageBitmap::Word hi_mask = e == PageBitmap::kWordBits ? ~PageBitmap::Word{0} : (PageBitmap::Word{1} << e) - 1;
  return hi_mask & (~PageBitmap::Word{0} << b);
}

// find_next_* are inline: they are the inner loop of every scanner.
inline std::size_t PageBitmap::find_next_set(std::size_t from) const noexcept { return find_next_set(from, size_); }
inline std::size_t PageBitmap::find_next_clear(std::size_t from) const noexcept { return find_next_clear(from, size_); }

inline std::size_t PageBitmap::find_next_set(std::size_t from, std::size_t end) const noexcept {
  if (end > size_) end = size_;
  if (from >= end) return npos;
  std::size_t w = from / kWordBits;
  Word x = data_[w].load(std::memory_order_acquire) & (~Word{0} << (from % kWordBits));
  const std::size_t last = (end - 1) / kWordBits;
  for (;;) {
    if (x != 0) {
      const std::size_t pos = w * kWordBits + static_cast<std::size_t>(std::countr_zero(x));
      return pos < end ? pos : npos;
    }
    if (++w > last) return npos;
    x = data_[w].load(std::memory_order_acquire);
  }
}

inline std::size_t PageBitmap::find_next_clear(std::size_t from, std::size_t end) const noexcept {
  if (end > size_) end = size_;
  if (from >= end) return npos;
  std::size_t w = from / kWordBits;
  Word x = ~data_[w].load(std::memory_order_acquire) & (~Word{0} << (from % kWordBits));
  const std::size_t last = (end - 1) / kWordBits;
  for (;;) {
    if (x != 0) {
      const std::size_t pos = w * kWordBits + static_cast<std::size_t>(std::countr_zero(x));
      return pos < end ? pos : npos;
    }
    if (++w > last) return npos;
    x = ~data_[w].load(std::memory_order_acquire);
  }
}

template <class Fn>
void PageBitmap::for_each_set(std::size_t begin, std::size_t end, Fn&& fn) const {
  if (end > size_) end = size_;
  if (begin >= end) return;
  const std::size_t wb = begin / kWordBits, we = (end - 1) / kWordBits;
  for (std::size_t w = wb; w <= we; ++w) {
    Word x = data_[w].load(std::memory_order_acquire);
    if (x == 0) continue;
    if (w == wb || w == we) x &= range_mask_for_word(w, begin, end);
    while (x != 0) {
      fn(w * kWordBits + static_cast<std::size_t>(std::countr_zero(x)));
      x &= x - 1;
    }
  }
}

template <class Fn>
void PageBitmap::for_each_run(std::size_t begin, std::size_t end, Fn&& fn) const {
  std::size_t pos = begin;
  while (pos < end) {
    const std::size_t start = find_next_set(pos, end);
    if (start == npos) return;
    std::size_t stop = find_next_clear(start, end);
    if (stop == npos) stop = end;
    if constexpr (std::is_same_v<decltype(fn(start, stop - start)), bool>) {
      if (!fn(start, stop - start)) return;
    } else {
      fn(start, stop - start);
    }
    pos = stop;
  }
}

}  // namespace livemig
