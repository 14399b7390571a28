#include "livemig/bitmap/page_bitmap.hpp"

#include <bit>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

namespace {

// Popcount of n whole words. The scalar kernel reads each word with an acquire load; the SIMD
// kernels read the same words with plain vector loads. That is a per-word snapshot as well on x86
// (aligned 8-byte elements are read whole, and loads are not reordered with older loads), but it
// is a data race to ThreadSanitizer, so under TSan only the scalar kernel is built.
std::size_t popcount_scalar(const std::atomic<Word>* p, std::size_t n) noexcept {
  std::size_t c0 = 0, c1 = 0;  // two chains: popcnt has a false output dependency on some CPUs
  std::size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    c0 += static_cast<std::size_t>(std::popcount(p[i].load(kLoad)));
    c1 += static_cast<std::size_t>(std::popcount(p[i + 1].load(kLoad)));
  }
  if (i < n) c0 += static_cast<std::size_t>(std::popcount(p[i].load(kLoad)));
  return c0 + c1;
}

#if !defined(__SANITIZE_THREAD__) && defined(__x86_64__)
#define LIVEMIG_BITMAP_SIMD 1

// AVX-512: VPOPCNTQ on 8 words per vector, four independent accumulators, masked tail.
__attribute__((target("avx512f,avx512vpopcntdq"))) std::size_t popcount_avx512(const Word* p,
                                                                                std::size_t n) noexcept {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i)));
    a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i + 8)));
    a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i + 16)));
    a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i + 24)));
  }
  for (; i + 8 <= n; i += 8) a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_loadu_si512(p + i)));
  if (i < n) {
    const auto tail = static_cast<__mmask8>((1U << (n - i)) - 1);
    a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_maskz_loadu_epi64(tail, p + i)));
  }
  const __m512i sum = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  // Summed through memory: gcc 12's _mm512_reduce_add_epi64 trips -Wuninitialized in its header.
  alignas(64) Word lanes[8];
  _mm512_store_si512(lanes, sum);
  Word c = 0;
  for (const Word l : lanes) c += l;
  return static_cast<std::size_t>(c);
}

// AVX2: nibble lookup (VPSHUFB) per byte, summed to 64-bit lanes by VPSADBW.
__attribute__((target("avx2"))) inline __m256i popcount_lanes_avx2(__m256i v) noexcept {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

// AVX2 kernel: two accumulators, scalar tail.
__attribute__((target("avx2"))) std::size_t popcount_avx2(const Word* p, std::size_t n) noexcept {
  const __m256i zero = _mm256_setzero_si256();
  __m256i a0 = zero, a1 = zero;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_add_epi64(a0, popcount_lanes_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))));
    a1 = _mm256_add_epi64(a1, popcount_lanes_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4))));
  }
  const __m256i sum = _mm256_add_epi64(a0, a1);
  std::size_t c = static_cast<std::size_t>(_mm256_extract_epi64(sum, 0) + _mm256_extract_epi64(sum, 1) +
                                           _mm256_extract_epi64(sum, 2) + _mm256_extract_epi64(sum, 3));
  for (; i < n; ++i) c += static_cast<std::size_t>(std::popcount(p[i]));
  return c;
}
#endif

bool cpu_runs(CountKernel k) noexcept {
#if defined(LIVEMIG_BITMAP_SIMD)
  __builtin_cpu_init();  // cheap, and makes the checks valid even from another TU's static init
#endif
  switch (k) {
    case CountKernel::kScalar:
      return true;
#if defined(LIVEMIG_BITMAP_SIMD)
    case CountKernel::kAvx2:
      return __builtin_cpu_supports("avx2");
    case CountKernel::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
    default:
      return false;
  }
}

CountKernel resolve(CountKernel k) noexcept {
  if (k == CountKernel::kAuto) {
    static const CountKernel best = cpu_runs(CountKernel::kAvx512) ? CountKernel::kAvx512
                                    : cpu_runs(CountKernel::kAvx2) ? CountKernel::kAvx2
                                                                   : CountKernel::kScalar;
    return best;
  }
  return cpu_runs(k) ? k : CountKernel::kScalar;
}

std::size_t popcount_words(const std::atomic<Word>* p, std::size_t n, CountKernel k) noexcept {
#if defined(LIVEMIG_BITMAP_SIMD)
  const Word* raw = reinterpret_cast<const Word*>(p);
  if (k == CountKernel::kAvx512) return popcount_avx512(raw, n);
  if (k == CountKernel::kAvx2) return popcount_avx2(raw, n);
#else
  (void)k;
#endif
  return popcount_scalar(p, n);
}

}  // namespace

bool PageBitmap::kernel_available(CountKernel kernel) noexcept {
  return kernel != CountKernel::kAuto && cpu_runs(kernel);
}

std::size_t PageBitmap::count(std::size_t begin, std::size_t end) const noexcept {
  return count_with(begin, end, CountKernel::kAuto);
}

std::size_t PageBitmap::count_with(std::size_t begin, std::size_t end, CountKernel kernel) const noexcept {
  if (begin >= end) return 0;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  if (wb == we) return static_cast<std::size_t>(std::popcount(data_[wb].load(kLoad) & range_mask_for_word(wb, begin, end)));
  std::size_t n = static_cast<std::size_t>(std::popcount(data_[wb].load(kLoad) & range_mask_for_word(wb, begin, end)));
  n += popcount_words(data_.get() + wb + 1, we - wb - 1, resolve(kernel));
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

namespace {

#if defined(__x86_64__) && defined(__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16) && !defined(__SANITIZE_THREAD__)
// Dense harvests take word pairs with one lock cmpxchg16b, which costs about as much as one locked
// exchange, so half as many locked instructions. Not under TSan: it cannot check a 16-byte atomic
// over words that other threads change with 8-byte atomics, so TSan builds check the 8-byte path.
#define LIVEMIG_BITMAP_CAS16 1

struct alignas(16) WordPair {
  Word lo, hi;
};

// If the 16-byte-aligned pair at p holds {lo, hi}, zero it and return true; otherwise load its
// value into {lo, hi} and return false. Atomic against every locked access to either word (x86
// locks the whole aligned 16 bytes); a locked instruction is a full barrier, so at least acq_rel.
inline bool cas_pair_to_zero(std::atomic<Word>* p, Word& lo, Word& hi) noexcept {
  bool swapped = false;
  asm volatile("lock cmpxchg16b %1"
               : "=@ccz"(swapped), "+m"(*reinterpret_cast<WordPair*>(p)), "+a"(lo), "+d"(hi)
               : "b"(Word{0}), "c"(Word{0})
               : "memory");
  return swapped;
}
#endif

}  // namespace

std::size_t PageBitmap::harvest(std::size_t begin, std::size_t end, std::span<Word> taken) noexcept {
  if (begin >= end) return 0;
  const std::size_t wb = begin / kBits, we = (end - 1) / kBits;
  // Edge words: only the bits inside the range are taken.
  const auto take_masked = [&](std::size_t w) -> Word {
    const Word mask = range_mask_for_word(w, begin, end);
    return (data_[w].load(kLoad) & mask) != 0 ? data_[w].fetch_and(~mask, kRmw) & mask : 0;
  };
  // Whole words. Skip the locked instruction for words that read as empty: a bit set after this
  // load is left for the next harvest, as if it had been set after the whole call.
  const auto take_word = [&](std::size_t w) -> Word {
    return data_[w].load(kLoad) != 0 ? data_[w].exchange(0, kRmw) : 0;
  };
  std::size_t n = 0;
  const auto keep = [&](std::size_t w, Word got) {  // into taken[], and counted
    taken[w - wb] = got;
    n += static_cast<std::size_t>(std::popcount(got));
  };
  keep(wb, take_masked(wb));
  if (we == wb) return n;
  std::size_t w = wb + 1;
#if defined(LIVEMIG_BITMAP_CAS16)
  if (w < we && reinterpret_cast<std::uintptr_t>(&data_[w]) % sizeof(WordPair) != 0) {
    keep(w, take_word(w));
    ++w;
  }
  for (; w + 1 < we; w += 2) {
    Word lo = data_[w].load(kLoad), hi = data_[w + 1].load(kLoad);
    if (lo == 0 || hi == 0) {
      // At most one word to take (sparse bitmaps): one xchg is cheaper than a cmpxchg16b.
      lo = lo != 0 ? data_[w].exchange(0, kRmw) : 0;
      hi = hi != 0 ? data_[w + 1].exchange(0, kRmw) : 0;
    } else if (!cas_pair_to_zero(&data_[w], lo, hi) && !cas_pair_to_zero(&data_[w], lo, hi)) {
      // Writers changed the pair twice under us: take the words one at a time, which cannot fail,
      // so a harvest stays wait-free however hot the words are.
      lo = data_[w].exchange(0, kRmw);
      hi = data_[w + 1].exchange(0, kRmw);
    }
    keep(w, lo);
    keep(w + 1, hi);
  }
#endif
  for (; w < we; ++w) keep(w, take_word(w));
  keep(we, take_masked(we));
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
