// The C++ tests' helpers. CHECK(cond): an assertion that prints where and what failed and exits 1
// (also in release builds, unlike assert). wait_for: a bounded poll of a condition that other
// threads make true (a deadline, not synchronisation by sleeping). Pair: a socket pair.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "livemig/fd.hpp"

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

namespace livemig::test {

/// A connected AF_UNIX stream socket pair (a channel between the two sides of a test).
struct Pair {
  UniqueFd a, b;
  Pair() {
    int fds[2];
    CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    a.reset(fds[0]);
    b.reset(fds[1]);
  }
};

/// Polls `pred` every 200 us; fails the test (exit 1) naming `what` after `secs` seconds.
template <class Pred>
void wait_for(Pred pred, double secs, const char* what) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(secs);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) {
      std::fprintf(stderr, "timed out waiting for %s\n", what);
      std::exit(1);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace livemig::test
