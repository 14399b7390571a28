// Figures for the attach protocol (docs/attach.md "Figures"), each beside a same-run baseline:
//   1. PAGEMAP_SCAN harvest + re-protect through the pagemap descriptor a process sent, against
//      the same process scanning its own /proc/self/pagemap, over the same writes.
//   2. A PAUSE + RESUME round trip over the attach socket (library serving thread, trivial
//      callbacks), against a raw 64-byte ping-pong between two processes on a socketpair.
//   3. UFFDIO_COPY / UFFDIO_ZEROPAGE into a destination process's shmem through its uffd, against
//      the same into anonymous memory through our own uffd, and a memcpy through livemig's own
//      mapping of the memfd (precopy placement).
// Usage: livemig_attach_bench [--size MIB_FOR_THE_SCAN (default 1024)] [--samples N (default 15)]
// Medians; shared machines are noisy. Processes are forked (no exec); each is a real separate mm.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "livemig/attach/peer.hpp"
#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/base/uapi.hpp"
#include "livemig/base/userfaultfd.hpp"
#include "livemig_attach.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr std::size_t kPage = 4096;

double ns_since(Clock::time_point t0) { return std::chrono::duration<double, std::nano>(Clock::now() - t0).count(); }
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
double pct(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}
[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "attach_bench: %s\n", what);
  std::exit(1);
}

// A listening socket in a private directory.
struct Listener {
  std::string dir, path;
  livemig::UniqueFd fd;
  Listener() {
    char tmpl[] = "/tmp/livemig-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) die("mkdtemp");
    dir = tmpl;
    path = dir + "/sock";
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd.get(), 4) != 0) die("bind");
  }
  ~Listener() {
    ::unlink(path.c_str());
    ::rmdir(dir.c_str());
  }
  livemig::attach::Connection attach() {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) die("no process attached within 10 s");
    return livemig::attach::Connection::accept(livemig::UniqueFd(::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC)));
  }
};

// Commands to the child over a pipe; answers are u64s.
enum : char { kWrite = 'W', kScanOwn = 'S', kQuit = 'Q' };

void put(int fd, const void* p, std::size_t n) {
  if (::write(fd, p, n) != static_cast<ssize_t>(n)) die("pipe write");
}
void get(int fd, void* p, std::size_t n) {
  if (::read(fd, p, n) != static_cast<ssize_t>(n)) die("pipe read");
}

// One PAGEMAP_SCAN harvest (with re-protect) of [addr, addr + len) on `pagemap`: the pages
// reported. `vec` is reused.
std::uint64_t harvest(int pagemap, std::uint64_t addr, std::uint64_t len, std::vector<page_region>& vec) {
  std::uint64_t pages = 0, start = addr;
  const std::uint64_t end = addr + len;
  while (start < end) {
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.flags = PM_SCAN_WP_MATCHING;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<std::uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    // PAGEMAP_SCAN: report written pages and write-protect them again in the same walk.
    const int n = ::ioctl(pagemap, PAGEMAP_SCAN, &arg);
    if (n < 0) die("PAGEMAP_SCAN");
    for (int i = 0; i < n; ++i) pages += (vec[static_cast<std::size_t>(i)].end - vec[static_cast<std::size_t>(i)].start) / kPage;
    if (static_cast<std::size_t>(n) < vec.size()) break;
    start = arg.walk_end;
  }
  return pages;
}

int trivial(void*) { return 0; }
const livemig_attach_ops kTrivialOps = {trivial, trivial, nullptr, nullptr, nullptr, nullptr, nullptr};

// The child: an attached process that writes pages and scans its own pagemap on command.
int scan_child(const std::string& path, std::size_t len, int cmd_r, int ans_w) {
  livemig_attach_config cfg;
  livemig_attach_config_init(&cfg);
  cfg.len = len;
  cfg.name = "bench-source";
  cfg.ops = &kTrivialOps;
  livemig_attach* a = nullptr;
  if (livemig_attach_create(&cfg, &a) != 0) return 1;
  auto* mem = static_cast<volatile std::uint8_t*>(livemig_attach_addr(a));
  for (std::size_t off = 0; off < len; off += kPage) mem[off] = 1;  // populated, like a running VM
  if (livemig_attach_connect(a, path.c_str()) != 0 || livemig_attach_start(a) != 0) return 2;
  livemig::UniqueFd own(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  std::vector<page_region> vec(1024);
  for (;;) {
    char c;
    get(cmd_r, &c, 1);
    if (c == kWrite) {
      std::uint64_t stride;
      get(cmd_r, &stride, 8);
      for (std::size_t off = 0; off < len; off += stride * kPage) mem[off] = static_cast<std::uint8_t>(mem[off] + 1);
      const std::uint64_t ok = 1;
      put(ans_w, &ok, 8);
    } else if (c == kScanOwn) {
      const auto t0 = Clock::now();
      const std::uint64_t pages = harvest(own.get(), reinterpret_cast<std::uintptr_t>(mem), len, vec);
      const double ns = ns_since(t0);
      put(ans_w, &ns, 8);
      put(ans_w, &pages, 8);
    } else {
      livemig_attach_destroy(a);
      return 0;
    }
  }
}

pid_t fork_child(const std::function<int()>& fn) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::_exit(fn());
  }
  return pid;
}
void reap(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
}

void bench_scan(std::size_t len, int samples) {
  Listener l;
  int cmd[2], ans[2];
  if (::pipe(cmd) != 0 || ::pipe(ans) != 0) die("pipe");
  const pid_t child = fork_child([&] { return scan_child(l.path, len, cmd[0], ans[1]); });
  auto c = l.attach();
  const std::uint64_t addr = c.layout().addr;
  uffdio_writeprotect wp{};
  wp.range = {addr, len};
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  // Arm tracking through the received uffd (what livemig does when a migration starts).
  const auto ta = Clock::now();
  if (::ioctl(c.uffd(), UFFDIO_WRITEPROTECT, &wp) != 0) die("UFFDIO_WRITEPROTECT");
  const double arm_ms = ns_since(ta) / 1e6;
  std::vector<page_region> vec(1024);
  (void)harvest(c.pagemap(), addr, len, vec);
  std::printf("\nPAGEMAP_SCAN harvest + re-protect of %zu MiB (populated memfd), medians of %d (arming: %.1f ms)\n",
              len >> 20, samples, arm_ms);
  std::printf("  %-10s %14s %14s %8s\n", "written", "received fd", "own pagemap", "ratio");
  for (const std::uint64_t stride : {0ULL, 100ULL, 10ULL, 1ULL}) {
    std::vector<double> remote, own;
    std::uint64_t pr = 0, po = 0;
    for (int s = 0; s < samples; ++s) {
      std::uint64_t ok;
      if (stride != 0) {
        put(cmd[1], "W", 1);
        put(cmd[1], &stride, 8);
        get(ans[0], &ok, 8);
      }
      const auto t0 = Clock::now();
      pr = harvest(c.pagemap(), addr, len, vec);
      remote.push_back(ns_since(t0));
      if (stride != 0) {
        put(cmd[1], "W", 1);
        put(cmd[1], &stride, 8);
        get(ans[0], &ok, 8);
      }
      double ns;
      put(cmd[1], "S", 1);
      get(ans[0], &ns, 8);
      get(ans[0], &po, 8);
      own.push_back(ns);
    }
    if (pr != po || pr != (stride ? (len / kPage + stride - 1) / stride : 0)) die("the two scans saw different pages");
    char label[32];
    std::snprintf(label, sizeof label, "%s", stride == 0 ? "0 %" : stride == 100 ? "1 %" : stride == 10 ? "10 %" : "100 %");
    std::printf("  %-10s %11.2f ms %11.2f ms %7.2fx   (%llu pages)\n", label, median(remote) / 1e6, median(own) / 1e6,
                median(remote) / median(own), static_cast<unsigned long long>(pr));
  }
  put(cmd[1], "Q", 1);
  c.close();
  reap(child);
}

void bench_pause(int rounds) {
  Listener l;
  const pid_t child = fork_child([&] {
    livemig_attach_config cfg;
    livemig_attach_config_init(&cfg);
    cfg.len = 1 << 20;
    cfg.ops = &kTrivialOps;
    livemig_attach* a = nullptr;
    if (livemig_attach_create(&cfg, &a) != 0 || livemig_attach_connect(a, l.path.c_str()) != 0 ||
        livemig_attach_start(a) != 0)
      return 1;
    for (;;) ::pause();  // killed by the parent
  });
  auto c = l.attach();
  std::vector<double> us;
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = Clock::now();
    if (!c.pause(0).ok() || !c.resume().ok()) die("pause/resume refused");
    us.push_back(ns_since(t0) / 1e3);
  }
  ::kill(child, SIGKILL);
  reap(child);
  // Baseline: the same two request/response exchanges, 16 + 16 bytes each way, raw.
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0) die("socketpair");
  const pid_t echo = fork_child([&] {
    ::close(sp[0]);  // or its own copy would keep the stream open after the parent closes it
    char b[32];
    for (;;) {
      if (::read(sp[1], b, sizeof b) <= 0) return 0;
      if (::write(sp[1], b, sizeof b) != static_cast<ssize_t>(sizeof b)) return 0;
    }
  });
  ::close(sp[1]);
  std::vector<double> raw_us;
  char b[32] = {0};
  for (int i = 0; i < rounds; ++i) {
    const auto t0 = Clock::now();
    for (int k = 0; k < 2; ++k)
      if (::write(sp[0], b, sizeof b) != static_cast<ssize_t>(sizeof b) || ::read(sp[0], b, sizeof b) != static_cast<ssize_t>(sizeof b))
        die("echo");
    raw_us.push_back(ns_since(t0) / 1e3);
  }
  ::close(sp[0]);
  reap(echo);
  std::printf("\nPAUSE + RESUME round trip over the attach socket (trivial callbacks), %d rounds\n", rounds);
  std::printf("  attach protocol:            p50 %6.1f us  p99 %6.1f us\n", median(us), pct(us, 0.99));
  std::printf("  raw 2 x 32 B ping-pong:     p50 %6.1f us  p99 %6.1f us\n", median(raw_us), pct(raw_us, 0.99));
}

void bench_placement(int samples) {
  constexpr std::size_t kLen = 64 << 20, kPages = kLen / kPage;
  Listener l;
  const pid_t child = fork_child([&] {
    livemig_attach_config cfg;
    livemig_attach_config_init(&cfg);
    cfg.role = LIVEMIG_ATTACH_DESTINATION;
    cfg.len = kLen;
    cfg.ops = &kTrivialOps;
    livemig_attach* a = nullptr;
    if (livemig_attach_create(&cfg, &a) != 0 || livemig_attach_connect(a, l.path.c_str()) != 0 ||
        livemig_attach_start(a) != 0)
      return 1;
    for (;;) ::pause();
  });
  auto c = l.attach();
  livemig::Mapping shm = c.map_region();
  livemig::Mapping anon = livemig::Mapping::anonymous(kLen);
  livemig::Userfaultfd own = livemig::Userfaultfd::open(0);
  own.register_range(anon.data(), kLen, UFFDIO_REGISTER_MODE_MISSING);
  livemig::Mapping src = livemig::Mapping::anonymous(kLen);
  std::memset(src.data(), 0x5A, kLen);

  auto reset_shm = [&] {
    if (::fallocate(c.memfd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kLen) != 0) die("punch");
  };
  auto reset_anon = [&] {
    if (::madvise(anon.data(), kLen, MADV_DONTNEED) != 0) die("madvise");
  };
  // ns per page of placing the whole region with `batch` pages per ioctl into `dst` via `uffd`.
  auto place = [&](int uffd, std::uint64_t dst, std::size_t batch, bool zero) {
    const auto t0 = Clock::now();
    for (std::size_t p = 0; p < kPages; p += batch) {
      if (zero) {
        uffdio_zeropage z{};
        z.range = {dst + p * kPage, batch * kPage};
        // UFFDIO_ZEROPAGE: zeroed pages in place, faulting threads woken.
        if (::ioctl(uffd, UFFDIO_ZEROPAGE, &z) != 0) die("UFFDIO_ZEROPAGE");
      } else {
        uffdio_copy cp{};
        cp.dst = dst + p * kPage;
        cp.src = reinterpret_cast<std::uintptr_t>(src.data() + p * kPage);
        cp.len = batch * kPage;
        // UFFDIO_COPY: the pages enter the mapping atomically, faulting threads woken.
        if (::ioctl(uffd, UFFDIO_COPY, &cp) != 0) die("UFFDIO_COPY");
      }
    }
    return ns_since(t0) / kPages;
  };
  struct Row {
    const char* what;
    std::function<double()> run;
    std::function<void()> reset;
  };
  const std::uint64_t daddr = c.layout().addr, aaddr = reinterpret_cast<std::uintptr_t>(anon.data());
  const std::vector<Row> rows = {
      {"UFFDIO_COPY 1 page, shmem via received uffd", [&] { return place(c.uffd(), daddr, 1, false); }, reset_shm},
      {"UFFDIO_COPY 1 page, anonymous via own uffd", [&] { return place(own.fd(), aaddr, 1, false); }, reset_anon},
      {"UFFDIO_COPY 64 pages, shmem via received uffd", [&] { return place(c.uffd(), daddr, 64, false); }, reset_shm},
      {"UFFDIO_COPY 64 pages, anonymous via own uffd", [&] { return place(own.fd(), aaddr, 64, false); }, reset_anon},
      {"UFFDIO_ZEROPAGE 1 page, shmem via received uffd", [&] { return place(c.uffd(), daddr, 1, true); }, reset_shm},
      {"UFFDIO_ZEROPAGE 1 page, anonymous via own uffd", [&] { return place(own.fd(), aaddr, 1, true); }, reset_anon},
      {"memcpy into livemig's mapping of the memfd",
       [&] {
         const auto t0 = Clock::now();
         std::memcpy(shm.data(), src.data(), kLen);
         return ns_since(t0) / kPages;
       },
       reset_shm},
  };
  std::printf("\nPlacement into a fresh 64 MiB region, ns per 4 KiB page, medians of %d\n", samples);
  for (const auto& r : rows) {
    std::vector<double> v;
    for (int s = 0; s < samples; ++s) {
      r.reset();
      v.push_back(r.run());
    }
    r.reset();
    const double m = median(v);
    std::printf("  %-50s %7.0f ns  (%.2f GB/s)\n", r.what, m, kPage / m);
  }
  c.close();
  ::kill(child, SIGKILL);
  reap(child);
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t size = 1ULL << 30;
  int samples = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--size") == 0) size = std::strtoull(argv[i + 1], nullptr, 10) << 20;
    else if (std::strcmp(argv[i], "--samples") == 0) samples = std::atoi(argv[i + 1]);
    else die("usage: livemig_attach_bench [--size MiB] [--samples N]");
  }
  try {
    (void)livemig::uffd_supported_features();
  } catch (const livemig::Error& e) {
    std::printf("attach_bench: skipped: %s\n", e.what());
    return 0;
  }
  ::signal(SIGPIPE, SIG_IGN);
  bench_scan(size, samples);
  bench_pause(2000);
  bench_placement(samples);
  return 0;
}
