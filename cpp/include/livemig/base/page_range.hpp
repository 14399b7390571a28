// A run of pages: the unit of every range list livemig passes around (discard sets, local-fill
// sets, requests, wire frames).
#pragma once

#include <cstdint>

namespace livemig {

/// The half-open page range [first, first + npages).
struct PageRange {
  std::uint64_t first = 0;
  std::uint64_t npages = 0;
  friend bool operator==(const PageRange&, const PageRange&) = default;
};

}  // namespace livemig
