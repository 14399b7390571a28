// The C++ tests' helpers. CHECK(cond): an assertion that prints where and what failed and exits 1
// (also in release builds, unlike assert). skip(why): the kernel lacks what the case needs; the
// case exits with kSkipCode, which ctest reports as skipped (never as passed). run(): main() of a
// test program, one ctest entry per case. wait_for: a bounded poll of a condition that other
// threads make true (a deadline, not synchronisation by sleeping). Pair: a socket pair.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <thread>
#include <utility>

#include "livemig/base/fd.hpp"

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

namespace livemig::test {

/// The exit code of a skipped case (CMake's SKIP_RETURN_CODE for every C++ test).
inline constexpr int kSkipCode = 77;

/// Thrown by skip(); run() turns it into kSkipCode.
struct Skipped {
  std::string why;
};
/// Ends the running case as skipped: the kernel (or this process) lacks `why`.
[[noreturn]] inline void skip(std::string why) { throw Skipped{std::move(why)}; }

/// One named case of a test program.
using Case = std::pair<const char*, void (*)()>;

/// main() of a test program: runs the case named by argv[1] (ctest runs each case on its own), or
/// every case in order when none is named. Returns 0 when all passed, kSkipCode when the case
/// (or, running all, any case) was skipped; a failing CHECK has already exited with 1.
inline int run(int argc, char** argv, std::initializer_list<Case> cases) {
  const char* only = argc > 1 ? argv[1] : nullptr;
  int code = 0;
  bool found = false;
  for (const auto& [name, fn] : cases) {
    if (only != nullptr && std::strcmp(only, name) != 0) continue;
    found = true;
    try {
      fn();
      std::printf("%s: ok\n", name);
    } catch (const Skipped& s) {
      std::printf("%s: SKIP: %s\n", name, s.why.c_str());
      code = kSkipCode;
    }
  }
  if (!found) {
    std::fprintf(stderr, "no case named %s\n", only);
    return 1;
  }
  return code;
}

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
