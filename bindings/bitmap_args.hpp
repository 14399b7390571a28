// Argument checks shared by every binding that takes page indices or ranges: a page out of range
// is an IndexError, start > end a ValueError. Also declares the bitmap view helper.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <string>

#include "livemig/page_bitmap.hpp"

namespace livemig::py_bindings {

struct CheckedRange {
  std::size_t begin;
  std::size_t end;
};

/// i as a page index of a space of `size` pages; IndexError when out of range.
inline std::size_t check_page(std::size_t size, pybind11::ssize_t i) {
  if (i < 0 || static_cast<std::size_t>(i) >= size)
    throw pybind11::index_error("page " + std::to_string(i) + " out of range [0, " + std::to_string(size) + ")");
  return static_cast<std::size_t>(i);
}

inline std::size_t check_index(const PageBitmap& b, pybind11::ssize_t i) { return check_page(b.size(), i); }

/// [start, end) within a space of `size` pages (end None means size); IndexError past the end,
/// ValueError when start > end.
inline CheckedRange check_page_range(std::size_t size, pybind11::ssize_t start, std::optional<pybind11::ssize_t> end) {
  const pybind11::ssize_t e = end.value_or(static_cast<pybind11::ssize_t>(size));
  if (start < 0 || e < 0 || static_cast<std::size_t>(start) > size || static_cast<std::size_t>(e) > size)
    throw pybind11::index_error("range [" + std::to_string(start) + ", " + std::to_string(e) + ") out of range [0, " +
                                std::to_string(size) + ")");
  if (start > e)
    throw pybind11::value_error("range start " + std::to_string(start) + " is past its end " + std::to_string(e));
  return {static_cast<std::size_t>(start), static_cast<std::size_t>(e)};
}

inline CheckedRange check_range(const PageBitmap& b, pybind11::ssize_t start, std::optional<pybind11::ssize_t> end) {
  return check_page_range(b.size(), start, end);
}

/// Releases the GIL for ranges big enough that the release pays for itself (over 64 words).
class ReleaseIfLarge {
 public:
  explicit ReleaseIfLarge(CheckedRange r) {
    if (r.end - r.begin > 64 * PageBitmap::kWordBits) release_.emplace();
  }

 private:
  std::optional<pybind11::gil_scoped_release> release_;
};

/// A zero-copy, read-only numpy view of a bitmap's words that keeps `owner` alive.
pybind11::array_t<PageBitmap::Word> words_view(const std::shared_ptr<PageBitmap>& bm, pybind11::handle owner);

}  // namespace livemig::py_bindings
