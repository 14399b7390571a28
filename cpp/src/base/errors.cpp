#include "livemig/base/errors.hpp"

#include <cstring>

namespace livemig {

void throw_errno(const std::string& step, const std::string& detail, std::uint64_t address,
                 std::uint64_t bytes_done) {
  const int err = errno;
  throw KernelError(err, step, detail + ": " + std::strerror(err), address, bytes_done);
}

}  // namespace livemig
