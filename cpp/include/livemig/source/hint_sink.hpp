// HintSink: where the guest's free page hints land in the source's page state. The source's balloon
// device (balloon::Device) accepts a hint only while its round runs and then calls apply(): the
// kernel's write tracking of the pages is reset, their dirty bits cleared and their hinted bits set.
// It never touches memory (docs/design.md rule 5).
#pragma once

#include <cstdint>

#include "livemig/balloon/device.hpp"
#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig {

class DirtyTracker;

class HintSink final : public balloon::HintTarget {
 public:
  /// A sink that applies hints to `dirty` and `hinted` (same size) and resets write tracking in
  /// `tracker` (may be null: then only the bitmaps change). All must outlive the sink.
  HintSink(PageBitmap& dirty, PageBitmap& hinted, DirtyTracker* tracker) noexcept
      : dirty_(dirty), hinted_(hinted), tracker_(tracker) {}
  /// Applies one accepted hint (any thread, lock-free): false when the kernel refused to reset
  /// the pages' write tracking (then D and H are untouched).
  bool apply(std::uint32_t id, std::uint64_t first, std::uint64_t npages) noexcept override;

 private:
  PageBitmap& dirty_;
  PageBitmap& hinted_;
  DirtyTracker* tracker_;
};

}  // namespace livemig
