// Benchmark support for the wire: raw socket baselines (bulk send/receive, ping-pong) and the same
// workloads through FrameWriter / FrameReader, all in C++ so the comparison is fair. Not used by
// migrations; bench/bench_wire.py drives these through the bindings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "livemig/wire/format.hpp"

namespace livemig::bench::wire {

using livemig::wire::WireConfig;

/// Raw baseline sender: sends `len` bytes from `data` in sendmsg calls of `chunk` bytes; returns
/// the number of sendmsg calls. Throws ConnectionLost / KernelError.
std::uint64_t raw_send(int fd, const std::uint8_t* data, std::size_t len, std::size_t chunk);
/// Raw baseline receiver: receives exactly `len` bytes into `data` in MSG_WAITALL reads of `chunk`.
std::uint64_t raw_recv(int fd, std::uint8_t* data, std::size_t len, std::size_t chunk);

/// Where a raw ping-pong's page lives: nowhere (one fixed buffer), or page (i * 7919) % pages of a
/// region for round i, the same pages request_client asks for.
struct RawRegion {
  std::uint8_t* base = nullptr;
  std::size_t page_size = 0;
  std::uint64_t pages = 0;
};

/// Raw ping-pong client: `iters` times, sends `request` bytes and waits for `reply` bytes (with a
/// region: a 24-byte header into a buffer, the rest into round i's page); returns each round trip
/// in nanoseconds.
/// With reply_fd >= 0 the replies come on that socket instead (the wire's layout: requests on
/// the return path, pages on the urgent channel).
std::vector<std::uint64_t> raw_pingpong_client(int fd, std::size_t request, std::size_t reply, std::size_t iters,
                                               RawRegion region = {}, int reply_fd = -1);
/// Raw ping-pong server: answers each `request`-byte message with `reply` bytes (with a region: a
/// 24-byte header and round i's page, one sendmsg) until end of stream; returns messages answered.
/// With reply_fd >= 0 the replies go out on that socket.
std::uint64_t raw_pingpong_server(int fd, std::size_t request, std::size_t reply, RawRegion region = {},
                                  int reply_fd = -1);

/// Wire request client (the destination's side): `iters` times, sends a REQUEST for one page on
/// the return path `ret_fd` and reads the PAGES frame that answers it on `urgent_fd` straight into
/// `region`; then sends END on the return path. Returns each round trip in nanoseconds.
std::vector<std::uint64_t> request_client(int ret_fd, int urgent_fd, const WireConfig& cfg, std::uint8_t* region,
                                          std::size_t iters);
/// Wire request server (the source's side): answers each REQUEST on `ret_fd` with the pages from
/// `region` on `urgent_fd`, flushed at once, until END; then sends END. Returns requests served.
std::uint64_t request_server(int ret_fd, int urgent_fd, const WireConfig& cfg, const std::uint8_t* region);

}  // namespace livemig::bench::wire
