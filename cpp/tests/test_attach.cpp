// The attach protocol end to end (docs/attach.md): the example workload process
// (livemig-hashtable, fork/exec) against livemig's side (livemig/attach/peer.hpp) acting as a
// minimal listener in the test. Kernel tracking through the received descriptors, the control
// conversation, hints, device state, precopy and postcopy into a destination process (placement
// with UFFDIO_COPY through its uffd, discards by punching holes), each side dying, and malformed
// messages and descriptors. A kernel without what a case needs makes it skip, never pass.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "check.hpp"
#include "livemig/attach/peer.hpp"
#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/base/holes.hpp"
#include "livemig/base/uapi.hpp"
#include "livemig/base/userfaultfd.hpp"
#include "livemig_attach.h"

#ifndef LIVEMIG_HASHTABLE
#error "LIVEMIG_HASHTABLE (the example's path) must be defined by the build"
#endif

using livemig::Mapping;
using livemig::UniqueFd;
using livemig::attach::Connection;
using livemig::attach::Event;
using livemig::test::skip;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kPage = 4096;
constexpr double kBound = 10;  // seconds: the longest any step may take before the case fails

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- kernel support ----------------------------------------------------------------------------

void require_kernel() {
  std::uint64_t f = 0;
  try {
    f = livemig::uffd_supported_features();
  } catch (const livemig::UnsupportedError& e) {
    skip(std::string("userfaultfd unavailable: ") + e.what());
  }
  const std::uint64_t need = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                             UFFD_FEATURE_MISSING_SHMEM;
  if ((f & need) != need) skip("this kernel's userfaultfd lacks WP_ASYNC/WP_UNPOPULATED/WP_HUGETLBFS_SHMEM/MISSING_SHMEM");
  UniqueFd pm(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  if (!pm || ::ioctl(pm.get(), PAGEMAP_SCAN, &arg) < 0) skip("PAGEMAP_SCAN is missing (Linux 6.7)");
}

// ---- a listening socket in a private directory -------------------------------------------------

struct Listener {
  std::string dir, path;
  UniqueFd fd;
  Listener() {
    char tmpl[] = "/tmp/livemig-attach-XXXXXX";
    CHECK(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
    path = dir + "/sock";
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    CHECK(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    CHECK(::listen(fd.get(), 8) == 0);
  }
  ~Listener() {
    ::unlink(path.c_str());
    ::rmdir(dir.c_str());
  }
  // The next connection, within `secs`.
  UniqueFd accept(double secs = kBound) {
    pollfd p{fd.get(), POLLIN, 0};
    CHECK(::poll(&p, 1, static_cast<int>(secs * 1000)) == 1);
    UniqueFd c(::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    CHECK(c);
    return c;
  }
  Connection attach(int role = 0, double timeout_s = 5) {
    livemig::attach::AcceptOptions o;
    o.expect_role = role;
    o.timeout_s = timeout_s;
    return Connection::accept(accept(), o);
  }
};

// ---- a child process with a status pipe -------------------------------------------------------

struct Child {
  pid_t pid = -1;
  UniqueFd status, pidfd;
  std::string buffered;
  std::vector<std::string> log;  // every status line, for failure messages
  int exit_code = -1;

  Child() = default;
  Child(Child&& o) noexcept { *this = std::move(o); }
  Child& operator=(Child&& o) noexcept {
    kill_and_reap();
    pid = std::exchange(o.pid, -1);
    status = std::move(o.status);
    pidfd = std::move(o.pidfd);
    buffered = std::move(o.buffered);
    log = std::move(o.log);
    exit_code = o.exit_code;
    return *this;
  }
  ~Child() { kill_and_reap(); }

  void kill_and_reap() {
    if (pid > 0 && exit_code < 0) {
      ::kill(pid, SIGKILL);
      int st = 0;
      ::waitpid(pid, &st, 0);
    }
    pid = -1;
  }
  // The next status line starting with `prefix` within `secs`; earlier lines are kept in `log`.
  std::string line(const std::string& prefix, double secs = kBound) {
    const auto t0 = Clock::now();
    for (;;) {
      std::size_t nl;
      while ((nl = buffered.find('\n')) != std::string::npos) {
        std::string l = buffered.substr(0, nl);
        buffered.erase(0, nl + 1);
        log.push_back(l);
        if (l.rfind(prefix, 0) == 0) return l;
      }
      const double left = secs - since(t0);
      pollfd p{status.get(), POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) break;
      char buf[4096];
      const ssize_t n = ::read(status.get(), buf, sizeof buf);
      if (n <= 0) break;
      buffered.append(buf, static_cast<std::size_t>(n));
    }
    std::fprintf(stderr, "no status line '%s' within %.1f s; lines so far:\n", prefix.c_str(), secs);
    for (const auto& l : log) std::fprintf(stderr, "  %s\n", l.c_str());
    std::exit(1);
  }
  // Waits (bounded) for the exit; returns the exit code (128 + signal when killed).
  int wait_exit(double secs = kBound) {
    pollfd p{pidfd.get(), POLLIN, 0};
    CHECK(::poll(&p, 1, static_cast<int>(secs * 1000)) == 1);
    int st = 0;
    CHECK(::waitpid(pid, &st, 0) == pid);
    exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return exit_code;
  }
  bool alive() const { return exit_code < 0 && ::kill(pid, 0) == 0; }
};

// Starts livemig-hashtable connecting to `sock_path` with `args` (status lines on fd 3).
Child spawn(const std::string& sock_path, const std::vector<std::string>& args) {
  int p[2];
  CHECK(::pipe2(p, O_CLOEXEC) == 0);
  std::vector<std::string> argv_s = {LIVEMIG_HASHTABLE, "--connect", sock_path, "--status-fd", "3"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a test that fails (exit without destructors) leaves no orphan
    ::dup2(p[1], 3);  // dup2 clears close-on-exec on the copy
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(p[1]);
  Child c;
  c.pid = pid;
  c.status.reset(p[0]);
  c.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  CHECK(c.pidfd);
  return c;
}

// Runs `fn` in a forked child (no exec) and returns its pid; the child exits with fn's value.
pid_t fork_run(const std::function<int()>& fn) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::_exit(fn());
  }
  return pid;
}
int reap(pid_t pid, double secs = kBound) {
  UniqueFd pfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  pollfd p{pfd.get(), POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(secs * 1000)) != 1) ::kill(pid, SIGKILL);
  int st = 0;
  CHECK(::waitpid(pid, &st, 0) == pid);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

std::uint64_t field(const std::string& line, const std::string& key) {
  const auto pos = line.find(" " + key + "=");
  CHECK(pos != std::string::npos);
  return std::strtoull(line.c_str() + pos + key.size() + 2, nullptr, 0);
}

int open_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n;
}

// ---- kernel tracking through received descriptors ----------------------------------------------

// Write-protects the whole region through the received uffd (livemig arms tracking).
void arm(const Connection& c) {
  uffdio_writeprotect wp{};
  wp.range.start = c.layout().addr;
  wp.range.len = c.layout().len;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  // UFFDIO_WRITEPROTECT through the process's uffd: acts on the process's mm, not ours.
  CHECK(::ioctl(c.uffd(), UFFDIO_WRITEPROTECT, &wp) == 0);
}

// Pages the process wrote since they were last protected; `reprotect` re-arms them in the same walk.
std::vector<std::uint64_t> written(int pagemap, std::uint64_t addr, std::uint64_t len, bool reprotect) {
  std::vector<std::uint64_t> out;
  std::vector<page_region> vec(512);
  std::uint64_t start = addr;
  const std::uint64_t end = addr + len;
  while (start < end) {
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.flags = reprotect ? PM_SCAN_WP_MATCHING : 0;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<std::uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    // PAGEMAP_SCAN on the received pagemap: the process's written pages (and re-protect them).
    const int n = ::ioctl(pagemap, PAGEMAP_SCAN, &arg);
    CHECK(n >= 0);
    for (int i = 0; i < n; ++i)
      for (std::uint64_t a = vec[static_cast<std::size_t>(i)].start; a < vec[static_cast<std::size_t>(i)].end; a += kPage)
        out.push_back((a - addr) / kPage);
    if (static_cast<std::size_t>(n) < vec.size()) break;  // walk_end is stale when vec was not filled
    start = arg.walk_end;
  }
  return out;
}

std::vector<std::uint64_t> differing(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
  std::vector<std::uint64_t> out;
  for (std::size_t p = 0; p * kPage < a.size(); ++p)
    if (std::memcmp(a.data() + p * kPage, b.data() + p * kPage, kPage) != 0) out.push_back(p);
  return out;
}

std::vector<std::uint8_t> snapshot(const Mapping& m) { return std::vector<std::uint8_t>(m.data(), m.data() + m.size()); }

std::set<std::uint64_t> hint_pages(Connection& c, std::uint32_t id, int* messages) {
  std::set<std::uint64_t> pages;
  *messages = 0;
  Event e;
  bool started = false, stopped = false;
  while (!stopped) {
    CHECK(c.next_event(e, kBound));
    CHECK(e.type == LIVEMIG_ATTACH_MSG_HINTS && e.id == id);
    if (!started) CHECK((e.flags & LIVEMIG_ATTACH_HINT_START) != 0);
    started = true;
    stopped = (e.flags & LIVEMIG_ATTACH_HINT_STOP) != 0;
    ++*messages;
    for (const auto& r : e.ranges)
      for (std::uint64_t p = r.first; p < r.first + r.npages; ++p) CHECK(pages.insert(p).second);
  }
  return pages;
}

}  // namespace

// The process's writes show up, exactly, in PAGEMAP_SCAN through the pagemap descriptor it sent.
void source_tracking() {
  require_kernel();
  Listener l;
  Child s = spawn(l.path, {"--size", "8M", "--threads", "2", "--rate", "20000", "--no-hints"});
  Connection c = l.attach(LIVEMIG_ATTACH_ROLE_SOURCE);
  const std::string ready = s.line("ready");
  CHECK(c.pid() == s.pid && c.peer_pid() == s.pid);
  CHECK(c.layout().role == livemig::attach::Role::Source && c.layout().len == (8u << 20));
  CHECK(c.layout().name == "livemig-hashtable");
  CHECK(c.memfd_path().rfind("/memfd:livemig-hashtable", 0) == 0);
  const std::uint64_t first_slot_page = field(ready, "first_slot_page");
  Mapping m = c.map_region();
  const std::uint64_t addr = c.layout().addr, len = c.layout().len;

  CHECK(c.pause(0).ok());
  arm(c);
  CHECK(written(c.pagemap(), addr, len, true).empty());  // nothing written since arming
  for (int round = 0; round < 3; ++round) {
    const auto before = snapshot(m);
    CHECK(c.resume().ok());
    const auto t0 = Clock::now();
    while (written(c.pagemap(), addr, len, false).size() < 200) CHECK(since(t0) < kBound);
    CHECK(c.pause(0).ok());
    const auto w = written(c.pagemap(), addr, len, true);
    const auto d = differing(before, snapshot(m));
    // Every changed page was reported (no write lost) ...
    CHECK(std::includes(w.begin(), w.end(), d.begin(), d.end()));
    // ... and every reported page changed, except bucket pages whose stores may cancel out (a
    // delete and a re-insert of one key leave its bucket head as it was).
    std::vector<std::uint64_t> extra;
    std::set_difference(w.begin(), w.end(), d.begin(), d.end(), std::back_inserter(extra));
    for (auto p : extra) CHECK(p >= 1 && p < first_slot_page);
    CHECK(written(c.pagemap(), addr, len, true).empty());  // paused: nothing new
    std::printf("round %d: %zu pages written, %zu changed, %zu bucket pages rewritten unchanged\n", round, w.size(),
                d.size(), extra.size());
  }
  const auto r = c.check();
  CHECK(r.failures == 0 && r.items > 0);
  CHECK(c.resume().ok());
  c.detach();
  CHECK(s.line("lost").find("error=0") != std::string::npos);
  ::kill(s.pid, SIGTERM);
  CHECK(s.line("exit").find("failures=0") != std::string::npos);
  CHECK(s.wait_exit() == 0);
}

// Pause parks every writer (nothing is written until resume), round trips are short, a lease
// expires into RESUMED, HANDOFF needs a pause, and the poll-driven API serves the same.
void pause_resume() {
  require_kernel();
  for (const bool dispatch : {false, true}) {
    Listener l;
    std::vector<std::string> args = {"--size", "8M", "--threads", "2", "--rate", "20000", "--no-hints"};
    if (dispatch) args.push_back("--dispatch");
    Child s = spawn(l.path, args);
    Connection c = l.attach();
    s.line("ready");
    const std::uint64_t addr = c.layout().addr, len = c.layout().len;
    CHECK(c.pause(0).ok());
    arm(c);
    CHECK(c.check().failures == 0);  // a round trip in which a running writer would have written
    CHECK(written(c.pagemap(), addr, len, false).empty());
    CHECK(c.resume().ok());
    const auto t0 = Clock::now();
    while (written(c.pagemap(), addr, len, false).empty()) CHECK(since(t0) < kBound);

    std::vector<double> us;
    for (int i = 0; i < 50; ++i) {
      const auto a = Clock::now();
      CHECK(c.pause(0).ok());
      CHECK(c.resume().ok());
      us.push_back(since(a) * 1e6);
    }
    std::sort(us.begin(), us.end());
    std::printf("%s: pause+resume round trip (2 threads parked) p50 %.0f us, p90 %.0f us\n",
                dispatch ? "dispatch" : "thread", us[25], us[45]);

    CHECK(!c.handoff().ok());  // not paused
    CHECK(c.pause(50).ok());   // a 50 ms lease and no HANDOFF: the process resumes itself
    Event e;
    CHECK(c.next_event(e, kBound) && e.type == LIVEMIG_ATTACH_MSG_RESUMED);
    CHECK(!c.handoff().ok());
    CHECK(c.pause(0).ok());
    CHECK(c.handoff().ok());
    CHECK(c.resume().ok());  // an explicit resume undoes a handoff
    c.detach();
    ::kill(s.pid, SIGTERM);
    CHECK(s.wait_exit() == 0);
  }
}

// A balloon round: hints arrive batched and tagged, hinted slots stay unwritten until DONE, and
// are reused after it.
void hints() {
  require_kernel();
  Listener l;
  Child s = spawn(l.path, {"--size", "16M", "--threads", "2", "--rate", "20000", "--free", "0.4"});
  Connection c = l.attach();
  s.line("ready");
  CHECK(c.capabilities() == (LIVEMIG_ATTACH_CAP_HINTS | LIVEMIG_ATTACH_CAP_CHECK));
  const std::uint64_t addr = c.layout().addr, len = c.layout().len;
  arm(c);
  const std::uint32_t round = 0x80000001U;
  c.balloon(round);
  int messages = 0;
  const auto held = hint_pages(c, round, &messages);
  CHECK(!held.empty());
  std::printf("round 0x%x: %zu pages hinted in %d message(s)\n", round, held.size(), messages);
  CHECK(messages <= 2);  // batched: never a message per page
  (void)written(c.pagemap(), addr, len, true);
  std::set<std::uint64_t> w;
  auto t0 = Clock::now();
  while (w.size() < 1000) {
    for (auto p : written(c.pagemap(), addr, len, true)) w.insert(p);
    CHECK(since(t0) < kBound);
  }
  for (auto p : w) CHECK(held.count(p) == 0);  // a hinted slot is never written while held
  auto r = c.check();
  CHECK(r.failures == 0 && r.text.find("held=" + std::to_string(held.size())) != std::string::npos);

  c.balloon(LIVEMIG_ATTACH_CMD_DONE);
  t0 = Clock::now();
  while (c.check().text.find(" held=0 ") == std::string::npos) CHECK(since(t0) < kBound);
  bool reused = false;
  t0 = Clock::now();
  while (!reused) {
    for (auto p : written(c.pagemap(), addr, len, true)) reused = reused || held.count(p) != 0;
    CHECK(since(t0) < kBound);
  }
  CHECK(c.check().failures == 0);
  c.detach();
  ::kill(s.pid, SIGTERM);
  CHECK(s.wait_exit() == 0);
}

namespace {

// A source and a destination process of one size, both attached.
struct Migration {
  Listener l;
  Child s, d;
  Connection cs, cd;
  Mapping ms, md;
  std::uint64_t pages = 0;
  Migration(const std::string& size, const std::vector<std::string>& extra)
      : s(spawn(l.path, with(size, extra, "source"))), cs(l.attach(LIVEMIG_ATTACH_ROLE_SOURCE)) {
    s.line("ready");
    d = spawn(l.path, with(size, extra, "destination"));
    cd = l.attach(LIVEMIG_ATTACH_ROLE_DESTINATION);
    d.line("ready");
    ms = cs.map_region();
    md = cd.map_region();
    pages = cs.layout().pages();
    CHECK(cd.layout().len == cs.layout().len);
  }
  static std::vector<std::string> with(const std::string& size, std::vector<std::string> extra, const char* role) {
    extra.insert(extra.end(), {"--size", size, "--role", role});
    return extra;
  }
};

void copy_pages(Migration& p, const std::vector<std::uint64_t>& pages) {
  for (auto pg : pages) std::memcpy(p.md.data() + pg * kPage, p.ms.data() + pg * kPage, kPage);
}

}  // namespace

// Precopy between two processes: rounds through the received descriptors, pause, device state,
// HANDOFF, COMPLETE, resume on the destination; its own check passes and it keeps updating.
void migrate_precopy() {
  require_kernel();
  Migration p("16M", {"--threads", "2", "--rate", "20000"});
  CHECK(::lseek(p.cd.memfd(), 0, SEEK_DATA) < 0);  // the destination starts empty
  arm(p.cs);
  std::vector<std::uint64_t> all(p.pages);
  for (std::uint64_t i = 0; i < p.pages; ++i) all[i] = i;
  copy_pages(p, all);  // round 1: everything, the source running
  for (int round = 0; round < 2; ++round)
    copy_pages(p, written(p.cs.pagemap(), p.cs.layout().addr, p.cs.layout().len, true));
  const auto t0 = Clock::now();  // let some writes pile up for the last round
  while (written(p.cs.pagemap(), p.cs.layout().addr, p.cs.layout().len, false).size() < 100) CHECK(since(t0) < kBound);
  CHECK(p.cs.pause(5000).ok());
  const auto last = written(p.cs.pagemap(), p.cs.layout().addr, p.cs.layout().len, true);
  copy_pages(p, last);
  p.cs.balloon(LIVEMIG_ATTACH_CMD_DONE);
  const auto state = p.cs.save_state();
  CHECK(p.cs.handoff().ok());
  // The generic oracle: with the source paused, the destination's bytes equal the source's.
  CHECK(std::memcmp(p.ms.data(), p.md.data(), p.ms.size()) == 0);
  CHECK(p.cd.load_state(state).ok());
  p.cd.balloon(LIVEMIG_ATTACH_CMD_DONE);
  CHECK(p.cd.complete().ok());
  CHECK(p.cd.resume().ok());
  std::printf("precopy: last round %zu pages, device state %zu bytes\n", last.size(), state.size());

  const auto r1 = p.cd.check();
  CHECK(r1.failures == 0 && r1.items > 0);
  const auto t1 = Clock::now();
  while (p.cd.check().text == r1.text) CHECK(since(t1) < kBound);  // it keeps updating
  CHECK(p.cd.check().failures == 0);
  p.cs.detach();  // handed off: the source stays paused and exits
  CHECK(p.s.line("lost").find("handed_off=1") != std::string::npos);
  CHECK(p.s.line("exit").find("failures=0") != std::string::npos);
  CHECK(p.s.wait_exit() == 0);
  p.cd.detach();
  CHECK(p.d.line("lost").find("complete=1") != std::string::npos);
  ::kill(p.d.pid, SIGTERM);
  CHECK(p.d.line("exit").find("failures=0") != std::string::npos);
  CHECK(p.d.wait_exit() == 0);
}

// Postcopy into a destination process: one precopy round that skips hinted pages and every odd
// page, discards by punching holes, then the destination runs while a fault thread serves its
// faults through its uffd (UFFDIO_COPY from the paused source; UFFDIO_ZEROPAGE for hinted pages)
// and, once it has faulted a while, the rest is pushed. Every page is placed at most once; the
// destination's own check passes.
void migrate_postcopy() {
  require_kernel();
  Migration p("16M", {"--threads", "2", "--rate", "20000", "--free", "0.4"});
  const std::uint64_t saddr = p.cs.layout().addr, slen = p.cs.layout().len, daddr = p.cd.layout().addr;
  arm(p.cs);
  const std::uint32_t round = 0x80000001U;
  p.cs.balloon(round);
  int messages = 0;
  const auto hinted = hint_pages(p.cs, round, &messages);
  // Round 1 (the source running): even pages, except the hinted ones, go into the memfd directly.
  std::vector<std::atomic<int>> placed(p.pages);
  std::vector<std::uint8_t> received(p.pages, 0);
  for (std::uint64_t i = 0; i < p.pages; ++i) {
    if (hinted.count(i) || i % 2 == 1) continue;
    std::memcpy(p.md.data() + i * kPage, p.ms.data() + i * kPage, kPage);
    received[i] = 1;
    placed[i].fetch_add(1);
  }
  CHECK(p.cs.pause(5000).ok());
  const auto dirty = written(p.cs.pagemap(), saddr, slen, true);
  p.cs.balloon(LIVEMIG_ATTACH_CMD_DONE);
  const auto state = p.cs.save_state();
  CHECK(p.cs.handoff().ok());
  // Discard: pages written since they were sent. Punching the hole drops them from the memfd and
  // from the destination's page tables, so its next touch faults.
  std::set<std::uint64_t> local;  // hinted and not written since: filled on the destination
  for (auto h : hinted) local.insert(h);
  std::uint64_t discarded = 0;
  for (auto pg : dirty) {
    local.erase(pg);
    if (!received[pg]) continue;
    CHECK(::fallocate(p.cd.memfd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(p.cd.layout().memfd_offset + pg * kPage), kPage) == 0);
    received[pg] = 0;
    placed[pg].store(0);  // dropped: it will be placed (once) again
    ++discarded;
  }
  std::uint64_t sent = 0;
  for (auto r : received) sent += r;
  CHECK(livemig::attach::count_holes(p.cd.memfd(), 0, slen, kPage) == p.pages - sent);
  CHECK(p.cd.load_state(state).ok());
  p.cd.balloon(LIVEMIG_ATTACH_CMD_DONE);

  // The fault thread: reads the destination's uffd, places each faulting page once.
  std::vector<std::atomic<std::uint8_t>> claim(p.pages);  // 1: someone places (or placed) it
  for (std::uint64_t i = 0; i < p.pages; ++i) claim[i].store(received[i]);
  std::atomic<bool> run{true};
  std::atomic<std::uint64_t> faults{0}, zero_fills{0}, copies{0}, eexist{0};
  std::vector<double> fault_us;
  auto place = [&](std::uint64_t pg, bool urgent) {
    std::uint8_t expect = 0;
    if (!claim[pg].compare_exchange_strong(expect, 1)) {
      if (urgent) {  // being placed by the other thread: its ioctl wakes the fault; wake anyway
        uffdio_range r{daddr + pg * kPage, kPage};
        // UFFDIO_WAKE: the faulting thread retries (harmless when the page is already in).
        ::ioctl(p.cd.uffd(), UFFDIO_WAKE, &r);
      }
      return;
    }
    int rc;
    if (local.count(pg)) {
      uffdio_zeropage z{};
      z.range = {daddr + pg * kPage, kPage};
      // UFFDIO_ZEROPAGE on shmem: a zeroed page enters the memfd (local fill of a hinted page).
      rc = ::ioctl(p.cd.uffd(), UFFDIO_ZEROPAGE, &z);
      if (rc == 0) zero_fills.fetch_add(1);
    } else {
      uffdio_copy cp{};
      cp.dst = daddr + pg * kPage;
      cp.src = reinterpret_cast<std::uintptr_t>(p.ms.data() + pg * kPage);
      cp.len = kPage;
      // UFFDIO_COPY through the destination's uffd: the page enters its memfd atomically and the
      // faulting thread wakes.
      rc = ::ioctl(p.cd.uffd(), UFFDIO_COPY, &cp);
      if (rc == 0) copies.fetch_add(1);
    }
    if (rc != 0) {
      CHECK(errno == EEXIST);
      eexist.fetch_add(1);
    } else {
      placed[pg].fetch_add(1);
    }
  };
  std::thread handler([&] {
    while (run.load()) {
      pollfd pf{p.cd.uffd(), POLLIN, 0};
      if (::poll(&pf, 1, 10) <= 0) continue;
      uffd_msg msg{};
      if (::read(p.cd.uffd(), &msg, sizeof msg) != static_cast<ssize_t>(sizeof msg)) continue;
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      const auto t0 = Clock::now();
      const std::uint64_t pg = ((msg.arg.pagefault.address & ~(kPage - 1)) - daddr) / kPage;
      CHECK(pg < p.pages);
      faults.fetch_add(1);
      place(pg, true);
      fault_us.push_back(since(t0) * 1e6);
    }
  });
  const auto resumed_at = Clock::now();
  CHECK(p.cd.resume().ok());  // the destination runs with pages missing
  const auto t_faults = Clock::now();
  while (faults.load() < 100) CHECK(since(t_faults) < kBound);
  for (std::uint64_t i = 0; i < p.pages; ++i)
    if (!local.count(i)) place(i, false);  // the background push
  const double push_s = since(resumed_at);
  // Every page the destination may read is in now; hinted ones it never touched read as zero
  // once it unregisters (poison 0), which is what a local fill would give.
  CHECK(p.cd.complete().ok());
  run.store(false);
  handler.join();
  for (std::uint64_t i = 0; i < p.pages; ++i) CHECK(placed[i].load() <= 1);
  std::sort(fault_us.begin(), fault_us.end());
  std::printf("postcopy: %zu hinted, %zu local, %llu discarded, %llu faults (serve p50 %.1f us), %llu copies, %llu zero "
              "fills, %llu EEXIST, push %.1f ms\n",
              hinted.size(), local.size(), static_cast<unsigned long long>(discarded),
              static_cast<unsigned long long>(faults.load()), fault_us.empty() ? 0.0 : fault_us[fault_us.size() / 2],
              static_cast<unsigned long long>(copies.load()), static_cast<unsigned long long>(zero_fills.load()),
              static_cast<unsigned long long>(eexist.load()), push_s * 1e3);

  const auto r1 = p.cd.check();
  CHECK(r1.failures == 0 && r1.items > 0);
  const auto t0 = Clock::now();
  while (p.cd.check().text == r1.text) CHECK(since(t0) < kBound);
  CHECK(p.cd.check().failures == 0);
  p.cs.detach();
  CHECK(p.s.wait_exit() == 0);
  p.cd.detach();
  ::kill(p.d.pid, SIGTERM);
  CHECK(p.d.line("exit").find("failures=0") != std::string::npos);
  CHECK(p.d.wait_exit() == 0);
}

// Shared-memory placement facts on this kernel, exactly, through a destination process's uffd.
void shmem_placement() {
  require_kernel();
  Listener l;
  Child d = spawn(l.path, {"--size", "1M", "--role", "destination", "--threads", "1"});
  Connection c = l.attach(LIVEMIG_ATTACH_ROLE_DESTINATION);
  d.line("ready");
  Mapping m = c.map_region();
  const std::uint64_t base = c.layout().addr;
  alignas(4096) static std::uint8_t src[kPage];
  std::memset(src, 0x5A, sizeof src);
  auto copy = [&](std::uint64_t pg) {
    uffdio_copy cp{};
    cp.dst = base + pg * kPage;
    cp.src = reinterpret_cast<std::uintptr_t>(src);
    cp.len = kPage;
    // UFFDIO_COPY into the process's shmem mapping.
    return ::ioctl(c.uffd(), UFFDIO_COPY, &cp) == 0 ? 0 : errno;
  };
  auto holes = [&] { return livemig::attach::count_holes(c.memfd(), 0, c.layout().len, kPage); };
  const std::uint64_t n = c.layout().pages();
  CHECK(holes() == n);
  CHECK(copy(0) == 0 && m.data()[0] == 0x5A && holes() == n - 1);
  CHECK(copy(0) == EEXIST);  // placed once
  CHECK(::fallocate(c.memfd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kPage) == 0);
  CHECK(holes() == n);       // the discard dropped it
  CHECK(copy(0) == 0);       // and it can be placed again
  uffdio_zeropage z{};
  z.range = {base + kPage, kPage};
  // UFFDIO_ZEROPAGE on shmem: allowed; a zeroed page enters the memfd.
  CHECK(::ioctl(c.uffd(), UFFDIO_ZEROPAGE, &z) == 0 && holes() == n - 2);
  CHECK(copy(1) == EEXIST);
  std::memset(m.data() + 3 * kPage, 7, kPage);  // precopy placement: a store through livemig's mapping
  CHECK(copy(3) == EEXIST && holes() == n - 3);
  // A page allocated with fallocate(mode 0) is present for userfaultfd (no fault, EEXIST) but a
  // hole to SEEK_DATA: never use it as placement, and never count on SEEK_DATA after it.
  CHECK(::fallocate(c.memfd(), 0, 5 * kPage, kPage) == 0);
  CHECK(copy(5) == EEXIST && holes() == n - 3);
  struct stat st{};
  CHECK(::fstat(c.memfd(), &st) == 0 && st.st_blocks == 4 * (kPage / 512));  // st_blocks does count it
  // file_extent, the source's hole skipping: runs of data and holes exactly as SEEK_DATA sees them
  // (page 5, allocated by fallocate mode 0, reads as zero: a hole is right for it).
  bool hole = false;
  CHECK(livemig::file_extent(c.memfd(), 0, n, kPage, hole) == 2 && !hole);                  // pages 0, 1
  CHECK(livemig::file_extent(c.memfd(), 2 * kPage, n - 2, kPage, hole) == 1 && hole);       // page 2
  CHECK(livemig::file_extent(c.memfd(), 3 * kPage, n - 3, kPage, hole) == 1 && !hole);      // page 3
  CHECK(livemig::file_extent(c.memfd(), 4 * kPage, n - 4, kPage, hole) == n - 4 && hole);   // 4 to the end
  CHECK(livemig::file_extent(c.memfd(), 4 * kPage, 2, kPage, hole) == 2 && hole);           // bounded by npages
  CHECK(livemig::file_extent(c.memfd(), 0, 1, kPage, hole) == 1 && !hole);
  // mapped_file_extent (the source's, cost bounded by the pages asked): the same runs where they
  // fit (mincore, like SEEK_DATA, counts only up-to-date pages: page 5 is a hole to both).
  const std::uint8_t* mp = m.data();
  CHECK(livemig::mapped_file_extent(c.memfd(), mp, 0, n, kPage, hole) == 2 && !hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp + 2 * kPage, 2 * kPage, n - 2, kPage, hole) == 1 && hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp + 3 * kPage, 3 * kPage, n - 3, kPage, hole) == 1 && !hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp + 4 * kPage, 4 * kPage, n - 4, kPage, hole) == n - 4 && hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp + 5 * kPage, 5 * kPage, n - 5, kPage, hole) == n - 5 && hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp + 6 * kPage, 6 * kPage, 3, kPage, hole) == 3 && hole);
  CHECK(livemig::mapped_file_extent(c.memfd(), mp, 0, 1, kPage, hole) == 1 && !hole);
  // Through a private file description: the same extents, and the received descriptor's offset
  // (the process's own, shared with it) does not move.
  CHECK(::lseek(c.memfd(), 0, SEEK_SET) == 0);
  const livemig::UniqueFd own = livemig::private_file(c.memfd());
  CHECK(own && livemig::file_extent(own.get(), 3 * kPage, n - 3, kPage, hole) == 1 && !hole);
  CHECK(livemig::file_extent(own.get(), 4 * kPage, n - 4, kPage, hole) == n - 4 && hole);
  CHECK(::lseek(c.memfd(), 0, SEEK_CUR) == 0 && livemig::attach::count_holes(c.memfd(), 0, c.layout().len, kPage) == n - 3);
  CHECK(::lseek(c.memfd(), 0, SEEK_CUR) == 0);
  c.close();  // livemig gone before the destination ran: it unregisters and exits 3
  const std::string lost = d.line("lost");
  CHECK(lost.find("registered=0") != std::string::npos && lost.find("complete=0") != std::string::npos);
  CHECK(d.wait_exit() == 3);
}

// The process dies: livemig's next request fails at once with ConnectionLost, it still holds the
// memory (its mapping of the memfd), the dead process's uffd refuses work, nothing leaks.
void process_dies() {
  require_kernel();
  const int fds_before = open_fds();
  {
    Listener l;
    Child s = spawn(l.path, {"--size", "8M", "--threads", "2", "--rate", "20000", "--no-hints"});
    Connection c = l.attach();
    s.line("ready");
    Mapping m = c.map_region();
    CHECK(c.pause(0).ok());
    const auto snap = snapshot(m);
    ::kill(s.pid, SIGKILL);
    CHECK(s.wait_exit() == 128 + SIGKILL);
    const auto t0 = Clock::now();
    bool lost = false;
    try {
      (void)c.resume(kBound);
    } catch (const livemig::ConnectionLost& e) {
      lost = true;
      std::printf("source died: '%s' after %.1f ms\n", e.what(), since(t0) * 1e3);
      CHECK(std::string(e.what()).find("closed the connection") != std::string::npos);
    }
    CHECK(lost && since(t0) < 1.0);
    CHECK(std::memcmp(snap.data(), m.data(), snap.size()) == 0);  // livemig still holds every page
    uffdio_writeprotect wp{};
    wp.range = {c.layout().addr, kPage};
    wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    CHECK(::ioctl(c.uffd(), UFFDIO_WRITEPROTECT, &wp) != 0);
    std::printf("UFFDIO_WRITEPROTECT after the process died: %s\n", std::strerror(errno));
  }
  {
    Listener l;
    Child d = spawn(l.path, {"--size", "1M", "--role", "destination"});
    Connection c = l.attach();
    d.line("ready");
    ::kill(d.pid, SIGKILL);
    CHECK(d.wait_exit() == 128 + SIGKILL);
    alignas(4096) static std::uint8_t src[kPage];
    uffdio_copy cp{};
    cp.dst = c.layout().addr;
    cp.src = reinterpret_cast<std::uintptr_t>(src);
    cp.len = kPage;
    CHECK(::ioctl(c.uffd(), UFFDIO_COPY, &cp) != 0);
    std::printf("UFFDIO_COPY after the destination died: %s\n", std::strerror(errno));
    Event e;
    bool lost = false;
    try {
      (void)c.next_event(e, kBound);
    } catch (const livemig::ConnectionLost&) {
      lost = true;
    }
    CHECK(lost);
  }
  CHECK(open_fds() == fds_before);
}

// livemig dies: a source unprotects and unregisters its memory and runs on (resumed if paused and
// not handed off); a handed-off source stays paused; a destination that never ran gives its memory
// back and exits 3; one that ran keeps its registration (threads on missing pages wait) until it
// releases.
void listener_dies() {
  require_kernel();
  {  // a paused source, no handoff
    Listener l;
    Child s = spawn(l.path, {"--size", "8M", "--threads", "2", "--rate", "20000"});
    int pm_own = -1;
    {
      Connection c = l.attach();
      s.line("ready");
      arm(c);
      c.balloon(0x80000001U);
      int messages = 0;
      (void)hint_pages(c, 0x80000001U, &messages);
      CHECK(c.pause(0).ok());
      pm_own = ::open(("/proc/" + std::to_string(s.pid) + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC);
      CHECK(pm_own >= 0);
      pm_scan_arg arg{};
      arg.size = sizeof arg;
      arg.start = c.layout().addr;
      arg.end = c.layout().addr + c.layout().len;
      arg.category_mask = PAGE_IS_WPALLOWED;
      arg.return_mask = PAGE_IS_WPALLOWED;
      page_region r{};
      arg.vec = reinterpret_cast<std::uintptr_t>(&r);
      arg.vec_len = 1;
      CHECK(::ioctl(pm_own, PAGEMAP_SCAN, &arg) == 1);  // armed now
      // The Connection goes: socket and every received descriptor close, as if livemig died.
    }
    const std::string lost = s.line("lost");
    CHECK(lost.find("resumed=1") != std::string::npos && lost.find("handed_off=0") != std::string::npos);
    UniqueFd pm(pm_own);
    // No page of the process is write-protected or registered any more.
    std::string smaps;
    {
      UniqueFd f(::open(("/proc/" + std::to_string(s.pid) + "/smaps").c_str(), O_RDONLY | O_CLOEXEC));
      char buf[65536];
      ssize_t n;
      while ((n = ::read(f.get(), buf, sizeof buf)) > 0) smaps.append(buf, static_cast<std::size_t>(n));
    }
    CHECK(smaps.find(" uw") == std::string::npos && smaps.find(" um") == std::string::npos);
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.start = 0;
    arg.end = 0x7ffffffff000ULL;
    arg.category_mask = PAGE_IS_WPALLOWED;
    arg.return_mask = PAGE_IS_WPALLOWED;
    page_region r{};
    arg.vec = reinterpret_cast<std::uintptr_t>(&r);
    arg.vec_len = 1;
    CHECK(::ioctl(pm.get(), PAGEMAP_SCAN, &arg) == 0);
    // It runs on (its writers resumed by the library), its driver got DONE (held slots freed),
    // its table checks out.
    ::kill(s.pid, SIGUSR1);
    const std::string c1 = s.line("check");
    CHECK(c1.find("failures=0") != std::string::npos);
    const auto t0 = Clock::now();
    for (;;) {
      ::kill(s.pid, SIGUSR1);
      const std::string c2 = s.line("check");
      CHECK(c2.find("failures=0") != std::string::npos);
      if (field(c2, "ops") > field(c1, "ops") && c2.find(" held=0 ") != std::string::npos) break;
      CHECK(since(t0) < kBound);
    }
    ::kill(s.pid, SIGTERM);
    CHECK(s.wait_exit() == 0);
  }
  {  // a handed-off source stays paused (its workload may run elsewhere) and exits 0
    Listener l;
    Child s = spawn(l.path, {"--size", "8M", "--threads", "2", "--rate", "20000", "--no-hints"});
    {
      Connection c = l.attach();
      s.line("ready");
      CHECK(c.pause(0).ok());
      CHECK(c.handoff().ok());
    }
    const std::string lost = s.line("lost");
    CHECK(lost.find("handed_off=1") != std::string::npos && lost.find("resumed=0") != std::string::npos);
    CHECK(s.line("exit").find("failures=0") != std::string::npos);
    CHECK(s.wait_exit() == 0);
  }
  {  // a destination that never ran
    Listener l;
    Child d = spawn(l.path, {"--size", "1M", "--role", "destination"});
    { Connection c = l.attach(); d.line("ready"); }
    CHECK(d.line("lost").find("registered=0") != std::string::npos);
    CHECK(d.wait_exit() == 3);
  }
  {  // a destination that ran with pages missing
    Listener l;
    Child s = spawn(l.path, {"--size", "4M", "--threads", "2", "--rate", "20000", "--no-hints"});
    Connection cs = l.attach();
    s.line("ready");
    Child d = spawn(l.path, {"--size", "4M", "--threads", "2", "--rate", "20000", "--no-hints", "--role", "destination"});
    {
      Connection cd = l.attach();
      d.line("ready");
      Mapping ms = cs.map_region(), md = cd.map_region();
      CHECK(cs.pause(0).ok());
      const auto state = cs.save_state();
      // Only the first half arrives before livemig "dies".
      std::memcpy(md.data(), ms.data(), ms.size() / 2);
      CHECK(cd.load_state(state).ok());
      CHECK(cd.resume().ok());
    }
    const std::string lost = d.line("lost");
    CHECK(lost.find("registered=1") != std::string::npos && field(lost, "missing") == (4u << 20) / kPage / 2);
    CHECK(d.alive());
    ::kill(d.pid, SIGTERM);
    CHECK(d.line("exit").find("code=4") != std::string::npos);
    CHECK(d.wait_exit() == 4);
    cs.detach();
    ::kill(s.pid, SIGTERM);
    CHECK(s.wait_exit() == 0);
  }
}

namespace {

// A header with the given fields, then `body`.
std::vector<std::uint8_t> raw(std::uint32_t magic, std::uint16_t version, std::uint16_t type, std::uint32_t tag,
                              std::uint32_t length, const std::vector<std::uint8_t>& body = {}) {
  std::uint8_t h[16];
  std::memcpy(h, &magic, 4);
  std::memcpy(h + 4, &version, 2);
  std::memcpy(h + 6, &type, 2);
  std::memcpy(h + 8, &tag, 4);
  std::memcpy(h + 12, &length, 4);
  std::string b(reinterpret_cast<const char*>(h), sizeof h);
  b.append(reinterpret_cast<const char*>(body.data()), body.size());
  return std::vector<std::uint8_t>(b.begin(), b.end());
}

}  // namespace

// Malformed messages from livemig: the process answers ERROR naming the problem, ends the
// attachment and touches no memory (a destination's memfd stays empty; a source runs on).
void bad_messages() {
  require_kernel();
  struct Case {
    const char* what;
    std::vector<std::uint8_t> bytes;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"unknown type", raw(LIVEMIG_ATTACH_MAGIC, 1, 99, 1, 0), "unknown message type 99"},
      {"bad length", raw(LIVEMIG_ATTACH_MAGIC, 1, LIVEMIG_ATTACH_MSG_PAUSE, 1, 3, {0, 0, 0}), "PAUSE with a 3-byte body"},
      {"over the limit", raw(LIVEMIG_ATTACH_MAGIC, 1, LIVEMIG_ATTACH_MSG_LOAD_STATE, 1, 200u << 20), "at most"},
      {"bad magic", raw(0x12345678, 1, LIVEMIG_ATTACH_MSG_PAUSE, 1, 8, std::vector<std::uint8_t>(8)), "bad magic"},
      {"bad version", raw(LIVEMIG_ATTACH_MAGIC, 7, LIVEMIG_ATTACH_MSG_RESUME, 1, 0), "version 7"},
      {"no tag", raw(LIVEMIG_ATTACH_MAGIC, 1, LIVEMIG_ATTACH_MSG_RESUME, 0, 0), "tag 0"},
      {"wrong role", raw(LIVEMIG_ATTACH_MAGIC, 1, LIVEMIG_ATTACH_MSG_HANDOFF, 1, 0), "HANDOFF sent to a destination"},
  };
  for (const auto& k : cases) {
    Listener l;
    Child d = spawn(l.path, {"--size", "1M", "--role", "destination"});
    Connection c = l.attach();
    d.line("ready");
    c.send_raw(k.bytes);
    std::string err;
    try {
      Event e;
      (void)c.next_event(e, kBound);
    } catch (const livemig::ProtocolError& e) {
      err = e.what();
    }
    std::printf("%-14s -> %s\n", k.what, err.c_str());
    CHECK(err.find(k.expect) != std::string::npos);
    CHECK(d.line("lost").find("error=71") != std::string::npos);  // EPROTO
    CHECK(d.wait_exit() == 3);
    struct stat st{};
    CHECK(::fstat(c.memfd(), &st) == 0 && st.st_blocks == 0);  // untouched
  }
  {  // a source: the attachment ends, the process runs on with ordinary memory
    Listener l;
    Child s = spawn(l.path, {"--size", "8M", "--threads", "2", "--rate", "20000", "--no-hints"});
    Connection c = l.attach();
    s.line("ready");
    arm(c);
    c.send_raw(raw(LIVEMIG_ATTACH_MAGIC, 1, 99, 1, 0));
    bool refused = false;
    try {
      Event e;
      (void)c.next_event(e, kBound);
    } catch (const livemig::ProtocolError&) {
      refused = true;
    }
    CHECK(refused);
    CHECK(s.line("lost").find("protocol error: unknown message type 99") != std::string::npos);
    ::kill(s.pid, SIGUSR1);
    CHECK(s.line("check").find("failures=0") != std::string::npos);
    ::kill(s.pid, SIGTERM);
    CHECK(s.wait_exit() == 0);
  }
}

namespace {

// A hand-made workload process for bad descriptors: maps a memfd, makes a uffd, and sends HELLO
// with whatever descriptors `pick` chooses. Exits 0 when livemig answered ERROR with `code`.
int hand_made_client(const std::string& path, int role, std::uint64_t memfd_size, std::uint64_t features,
                     const std::function<std::vector<int>(int memfd, int uffd, int pagemap)>& pick, std::uint32_t code,
                     bool dirty = false, std::uint64_t addr_shift = 0) {
  const std::uint64_t len = 1 << 20;
  const int memfd = ::memfd_create("hand-made", MFD_CLOEXEC);
  if (memfd < 0 || ::ftruncate(memfd, static_cast<off_t>(memfd_size)) != 0) return 10;
  void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (mem == MAP_FAILED) return 11;
  if (dirty) std::memset(mem, 1, kPage);
  auto u = livemig::Userfaultfd::open(features, 0, true);
  try {  // a registration the features do not allow fails; livemig must refuse the uffd anyway
    u.register_range(mem, len, role == LIVEMIG_ATTACH_ROLE_SOURCE ? UFFDIO_REGISTER_MODE_WP : UFFDIO_REGISTER_MODE_MISSING);
  } catch (const livemig::Error&) {
  }
  const int pm = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  const int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  if (::connect(sock, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return 12;
  std::vector<std::uint8_t> body(LIVEMIG_ATTACH_HELLO_FIXED, 0);
  const std::uint16_t v1 = 1;
  const std::uint32_t ps = kPage;
  const std::uint64_t addr = reinterpret_cast<std::uintptr_t>(mem) + addr_shift, zero = 0;
  const std::vector<int> fds = pick(memfd, u.fd(), pm);
  std::memcpy(body.data(), &v1, 2);
  body[2] = static_cast<std::uint8_t>(role);
  body[3] = static_cast<std::uint8_t>(fds.size());
  std::memcpy(body.data() + 4, &ps, 4);
  std::memcpy(body.data() + 8, &addr, 8);
  std::memcpy(body.data() + 16, &len, 8);
  std::memcpy(body.data() + 24, &zero, 8);
  const std::uint64_t f = u.features();
  std::memcpy(body.data() + 40, &f, 8);
  auto msg = raw(LIVEMIG_ATTACH_MAGIC, 1, LIVEMIG_ATTACH_MSG_HELLO, 0, static_cast<std::uint32_t>(body.size()), body);
  union {
    char buf[CMSG_SPACE(sizeof(int) * 4) + CMSG_SPACE(sizeof(ucred))];
    cmsghdr align;
  } control{};
  iovec iov{msg.data(), msg.size()};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = control.buf;
  m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size()) + CMSG_SPACE(sizeof(ucred));
  cmsghdr* c = CMSG_FIRSTHDR(&m);
  if (c == nullptr) return 16;
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  c = CMSG_NXTHDR(&m, c);
  if (c == nullptr) return 16;
  ucred uc{::getpid(), ::getuid(), ::getgid()};
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_CREDENTIALS;
  c->cmsg_len = CMSG_LEN(sizeof uc);
  std::memcpy(CMSG_DATA(c), &uc, sizeof uc);
  if (::sendmsg(sock, &m, MSG_NOSIGNAL) != static_cast<ssize_t>(msg.size())) return 13;
  std::uint8_t h[16 + 8];
  pollfd p{sock, POLLIN, 0};
  if (::poll(&p, 1, 10000) != 1 || ::recv(sock, h, sizeof h, MSG_WAITALL) != static_cast<ssize_t>(sizeof h)) return 14;
  std::uint16_t type;
  std::uint32_t got_code;
  std::memcpy(&type, h + 6, 2);
  std::memcpy(&got_code, h + 16, 4);
  return type == LIVEMIG_ATTACH_MSG_ERROR && got_code == code ? 0 : 15;
}

}  // namespace

// Descriptors of the wrong kind, size, features or owner, and silent or unresponsive processes:
// each a clear error within a bound, nothing leaked on livemig's side.
void bad_descriptors() {
  require_kernel();
  const std::uint64_t wp = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
  const pid_t parent = ::getpid();
  const int fds_before = open_fds();
  struct Case {
    const char* what;
    int role;
    std::uint64_t memfd_size, features;
    std::function<std::vector<int>(int, int, int)> pick;
    const char* expect;
    bool dirty = false;
    std::uint64_t shift = 0;
  };
  auto normal = [](int m, int u, int p) { return std::vector<int>{m, u, p}; };
  const std::vector<Case> cases = {
      {"swapped", 1, 1 << 20, wp, [](int m, int u, int p) { return std::vector<int>{p, u, m}; }, "not a memfd"},
      {"two fds", 1, 1 << 20, wp, [](int m, int u, int) { return std::vector<int>{m, u}; }, "exactly 3 descriptors"},
      {"small memfd", 1, 1 << 19, wp, normal, "smaller than the region"},
      {"no WP_ASYNC", 1, 1 << 20, UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, normal, "lack 0x8000"},
      {"no uffd", 1, 1 << 20, wp, [](int m, int, int p) { return std::vector<int>{m, m, p}; }, "not a userfaultfd"},
      {"foreign pagemap", 1, 1 << 20, wp,
       [parent](int m, int u, int) {
         return std::vector<int>{m, u, ::open(("/proc/" + std::to_string(parent) + "/pagemap").c_str(), O_RDONLY)};
       },
       "belongs to process"},
      {"dirty destination", 2, 1 << 20, UFFD_FEATURE_MISSING_SHMEM, normal, "already holds", true},
      {"not mapped there", 1, 1 << 20, wp, normal, "maps nothing", false, 64ULL << 30},
      {"missing, not wp", 1, 1 << 20, UFFD_FEATURE_MISSING_SHMEM, normal, "lack"},
  };
  for (const auto& k : cases) {
    Listener l;
    const pid_t child = fork_run([&] {
      return hand_made_client(l.path, k.role, k.memfd_size, k.features, k.pick, LIVEMIG_ATTACH_ERR_DESCRIPTOR, k.dirty,
                              k.shift);
    });
    std::string err;
    try {
      (void)l.attach();
    } catch (const livemig::attach::DescriptorError& e) {
      err = e.what();
    }
    std::printf("%-18s -> %s\n", k.what, err.c_str());
    CHECK(err.find(k.expect) != std::string::npos);
    CHECK(reap(child) == 0);  // the process got ERROR with the descriptor code
  }
  {  // a process that connects and says nothing
    Listener l;
    const pid_t child = fork_run([&] {
      const int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un a{};
      a.sun_family = AF_UNIX;
      std::snprintf(a.sun_path, sizeof a.sun_path, "%s", l.path.c_str());
      if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return 1;
      char b;
      return ::read(s, &b, 1) >= 0 ? 0 : 1;  // returns when livemig gives up and closes
    });
    const auto t0 = Clock::now();
    bool lost = false;
    try {
      (void)l.attach(0, 0.3);
    } catch (const livemig::ConnectionLost& e) {
      lost = std::string(e.what()).find("silent") != std::string::npos;
    }
    CHECK(lost && since(t0) < 2);
    CHECK(reap(child) == 0);
  }
  {  // a process that never answers PAUSE (its pause callback hangs)
    Listener l;
    const pid_t child = fork_run([&] {
      static const livemig_attach_ops ops = {
          [](void*) {
            for (;;) ::pause();  // never parks: the behaviour under test
            return 0;
          },
          nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
      livemig_attach_config cfg;
      livemig_attach_config_init(&cfg);
      cfg.len = 1 << 20;
      cfg.ops = &ops;
      livemig_attach* a = nullptr;
      if (livemig_attach_create(&cfg, &a) != 0 || livemig_attach_connect(a, l.path.c_str()) != 0) return 1;
      (void)livemig_attach_dispatch(a, -1);
      return 0;
    });
    Connection c = l.attach();
    const auto t0 = Clock::now();
    std::string err;
    try {
      (void)c.pause(0, 0.3);
    } catch (const livemig::ConnectionLost& e) {
      err = e.what();
    }
    std::printf("hung pause -> %s (%.2f s)\n", err.c_str(), since(t0));
    CHECK(err.find("did not answer PAUSE within 0.3 s") != std::string::npos && since(t0) < 2);
    ::kill(child, SIGKILL);
    (void)reap(child);
  }
  CHECK(open_fds() == fds_before);
}

// The few-line integration of docs/attach.md (examples/minimal.c; the build tree's, or the one
// attach_install.sh built against an installed tree, named by LIVEMIG_MINIMAL): it attaches, its
// writes are tracked, it pauses and resumes, and it detaches and exits on SIGINT.
void minimal_example() {
  require_kernel();
  const char* env = std::getenv("LIVEMIG_MINIMAL");
  const std::string bin = env != nullptr ? env : LIVEMIG_MINIMAL;
  Listener l;
  const pid_t pid = ::fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::execl(bin.c_str(), bin.c_str(), l.path.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  Connection c = l.attach(LIVEMIG_ATTACH_ROLE_SOURCE);
  CHECK(c.pid() == pid && c.layout().name == "minimal" && c.capabilities() == 0);
  arm(c);
  const auto t0 = Clock::now();
  while (written(c.pagemap(), c.layout().addr, c.layout().len, true).empty()) CHECK(since(t0) < kBound);
  CHECK(c.pause(0).ok());
  (void)written(c.pagemap(), c.layout().addr, c.layout().len, true);
  CHECK(c.pause(0).ok());  // a round trip while paused: nothing written in it
  CHECK(written(c.pagemap(), c.layout().addr, c.layout().len, true).empty());
  CHECK(c.resume().ok());
  const auto t1 = Clock::now();
  while (written(c.pagemap(), c.layout().addr, c.layout().len, true).empty()) CHECK(since(t1) < kBound);
  ::kill(pid, SIGINT);  // it detaches (DETACH, answered here) and exits
  std::string err;
  try {
    Event e;
    (void)c.next_event(e, kBound);
  } catch (const livemig::ConnectionLost& e) {
    err = e.what();
  }
  CHECK(err.find("detached") != std::string::npos);
  CHECK(reap(pid) == 0);
}

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  return livemig::test::run(argc, argv,
                            {{"source_tracking", source_tracking},
                             {"pause_resume", pause_resume},
                             {"hints", hints},
                             {"migrate_precopy", migrate_precopy},
                             {"migrate_postcopy", migrate_postcopy},
                             {"shmem_placement", shmem_placement},
                             {"process_dies", process_dies},
                             {"listener_dies", listener_dies},
                             {"bad_messages", bad_messages},
                             {"bad_descriptors", bad_descriptors},
                             {"minimal_example", minimal_example}});
}
