// Page sizes. A page size belongs to a region, its tracker and the wire (the handshake negotiates
// it); nothing in the core assumes one process-wide value. What this build supports today is the
// system's base page size; check_page_size() says so for anything else (huge pages come later).
#pragma once

#include <cstddef>

namespace livemig {

/// The system's base page size in bytes (sysconf(_SC_PAGESIZE)).
std::size_t system_page_size() noexcept;

/// Checks that `page_size` can be the page size of a region here: std::invalid_argument for a value
/// that is not a power of two of at least 64 bytes, UnsupportedError("huge pages") for any other
/// size than the system's base page size.
void check_page_size(std::size_t page_size);

}  // namespace livemig
