#include "livemig/source/hint_sink.hpp"

#include "livemig/source/dirty_tracker.hpp"

namespace livemig {

bool HintSink::apply(std::uint32_t /*id*/, std::uint64_t first_page, std::uint64_t npages) noexcept {
  const std::size_t first = first_page, end = first_page + npages;
  // Reset write tracking first, then clear D: a write racing in after the reset shows up at the
  // next sync (the guest should not write pages it hinted, but if it does the page is sent).
  if (tracker_ != nullptr && !tracker_->reset(first, npages)) return false;
  if ((end - 1) / PageBitmap::kWordBits == first / PageBitmap::kWordBits) {
    // Within one word: skip the locked RMWs when they would change nothing. Each round the guest
    // hints its free pages again, so "D already clear, H already set" is the common case.
    const std::size_t wi = first / PageBitmap::kWordBits;
    const PageBitmap::Word mask = range_mask_for_word(wi, first, end);
    if ((dirty_.word(wi).load(std::memory_order_acquire) & mask) != 0)
      dirty_.word(wi).fetch_and(~mask, std::memory_order_acq_rel);
    if ((hinted_.word(wi).load(std::memory_order_acquire) & mask) != mask)
      hinted_.word(wi).fetch_or(mask, std::memory_order_acq_rel);
  } else {
    dirty_.clear_range(first, end);
    hinted_.set_range(first, end);
  }
  return true;
}

}  // namespace livemig
