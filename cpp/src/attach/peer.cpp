#include "livemig/attach/peer.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "livemig/base/holes.hpp"
#include "livemig/base/uapi.hpp"

namespace livemig::attach {
namespace {

constexpr long kTmpfsMagic = 0x01021994;     // memfd and /dev/shm files
constexpr long kHugetlbfsMagic = 0x958458f6;
constexpr long kProcMagic = 0x9fa0;
constexpr std::uint64_t kUffdInitialized = 1ULL << 31;  // UFFD_FEATURE_INITIALIZED, the kernel's own bit
constexpr std::size_t kChunk = 1 << 20;                  // large bodies grow by this as bytes arrive

using Clock = std::chrono::steady_clock;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}
std::int64_t deadline_after(double secs) { return now_ns() + static_cast<std::int64_t>(secs * 1e9); }
int poll_ms(std::int64_t deadline_ns) {
  const std::int64_t left = deadline_ns - now_ns();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<std::int64_t>((left + 999999) / 1000000, 1000000));
}
std::string seconds(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g s", s);
  return b;
}
std::string hex(std::uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%" PRIx64, v);
  return b;
}

void put16(std::uint8_t* p, std::uint16_t v) { std::memcpy(p, &v, 2); }  // little-endian hosts only
void put32(std::uint8_t* p, std::uint32_t v) { std::memcpy(p, &v, 4); }
void put64(std::uint8_t* p, std::uint64_t v) { std::memcpy(p, &v, 8); }
std::uint16_t get16(const std::uint8_t* p) { std::uint16_t v; std::memcpy(&v, p, 2); return v; }
std::uint32_t get32(const std::uint8_t* p) { std::uint32_t v; std::memcpy(&v, p, 4); return v; }
std::uint64_t get64(const std::uint8_t* p) { std::uint64_t v; std::memcpy(&v, p, 8); return v; }
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the attach protocol is little-endian; so is this code");

// Waits until `fd` has `events` or the deadline passes: true when ready.
bool wait_fd(int fd, short events, std::int64_t deadline_ns) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, poll_ms(deadline_ns));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) throw_errno("poll", "attach socket");
  }
}

// Sends all of `iov` by the deadline. Throws ConnectionLost when the process is gone or stopped
// reading.
void send_all(int fd, iovec* iov, int n, std::int64_t deadline_ns, const char* what) {
  while (n > 0) {
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<std::size_t>(n);
    const ssize_t r = ::sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        if (!wait_fd(fd, POLLOUT, deadline_ns))
          throw ConnectionLost(std::string("send ") + what + ": the process did not read for the timeout");
        continue;
      }
      if (errno == EPIPE || errno == ECONNRESET)
        throw ConnectionLost(std::string("send ") + what + ": the process closed the connection");
      throw_errno("send", what);
    }
    std::size_t done = static_cast<std::size_t>(r);
    while (n > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
}

// Reads exactly `len` bytes by the deadline. Returns the bytes read before the process closed
// (== len when all came); throws ConnectionLost on a timeout.
std::size_t recv_all(int fd, std::uint8_t* buf, std::size_t len, std::int64_t deadline_ns, const std::string& what) {
  std::size_t have = 0;
  while (have < len) {
    const ssize_t r = ::recv(fd, buf + have, len - have, MSG_DONTWAIT);
    if (r > 0) {
      have += static_cast<std::size_t>(r);
      continue;
    }
    if (r == 0) return have;
    if (errno == EINTR) continue;
    if (errno == ECONNRESET) return have;
    if (errno != EAGAIN) throw_errno("recv", what);
    if (!wait_fd(fd, POLLIN, deadline_ns))
      throw ConnectionLost(what + ": the process sent " + std::to_string(have) + " of " + std::to_string(len) +
                           " bytes before the timeout (silent process)");
  }
  return have;
}

std::string readlink_fd(int fd) {
  char path[64], buf[512];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  const ssize_t n = ::readlink(path, buf, sizeof buf - 1);
  if (n < 0) return "?";
  return std::string(buf, static_cast<std::size_t>(n));
}

std::string read_file(const std::string& path, int& err) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  err = 0;
  if (!fd) {
    err = errno;
    return {};
  }
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
      return {};
    }
    if (n == 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

// One VMA of /proc/<pid>/smaps.
struct Vma {
  std::uint64_t start = 0, end = 0, offset = 0, inode = 0;
  unsigned dev_major = 0, dev_minor = 0;
  std::string perms, flags;
};

std::vector<Vma> parse_smaps(const std::string& text) {
  std::vector<Vma> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    Vma v;
    char perms[8] = {0};
    unsigned long long start, end, offset, inode;
    unsigned maj, min;
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &offset, &maj, &min, &inode) ==
        7) {
      v.start = start;
      v.end = end;
      v.perms = perms;
      v.offset = offset;
      v.dev_major = maj;
      v.dev_minor = min;
      v.inode = inode;
      out.push_back(v);
    } else if (line.rfind("VmFlags:", 0) == 0 && !out.empty()) {
      out.back().flags = line.substr(8) + " ";
    }
  }
  return out;
}

bool has_flag(const std::string& flags, const char* f) { return flags.find(std::string(" ") + f + " ") != std::string::npos; }

// The ERROR body: code, reserved, text.
std::vector<std::uint8_t> error_body(std::uint32_t code, const std::string& text) {
  const std::size_t n = std::min<std::size_t>(text.size(), LIVEMIG_ATTACH_MAX_ERROR_TEXT);
  std::vector<std::uint8_t> b(LIVEMIG_ATTACH_ERROR_FIXED + n, 0);
  put32(b.data(), code);
  std::memcpy(b.data() + LIVEMIG_ATTACH_ERROR_FIXED, text.data(), n);
  return b;
}

// Sends a header and body, best effort, within 200 ms (used before closing on a failure).
void send_error_best_effort(int fd, std::uint16_t version, std::uint32_t code, const std::string& text) {
  if (fd < 0) return;
  auto body = error_body(code, text);
  std::uint8_t h[LIVEMIG_ATTACH_HEADER_SIZE];
  put32(h, LIVEMIG_ATTACH_MAGIC);
  put16(h + 4, version);
  put16(h + 6, LIVEMIG_ATTACH_MSG_ERROR);
  put32(h + 8, 0);
  put32(h + 12, static_cast<std::uint32_t>(body.size()));
  iovec iov[2] = {{h, sizeof h}, {body.data(), body.size()}};
  try {
    send_all(fd, iov, 2, deadline_after(0.2), "ERROR");
  } catch (const Error&) {  // the process is gone: nothing to tell
  }
}

}  // namespace

const char* role_name(Role r) noexcept { return r == Role::Source ? "source" : "destination"; }

std::uint64_t uffd_fd_features(int uffd) {
  const std::string link = readlink_fd(uffd);
  if (link != "anon_inode:[userfaultfd]")
    throw DescriptorError("uffd: descriptor 2 is " + link + ", not a userfaultfd");
  int err = 0;
  const std::string info = read_file("/proc/self/fdinfo/" + std::to_string(uffd), err);
  const auto pos = info.find("API:\t");
  unsigned long long api = 0, features = 0;
  if (err != 0 || pos == std::string::npos || std::sscanf(info.c_str() + pos, "API:\t%llx:%llx:", &api, &features) != 2)
    throw DescriptorError("uffd: cannot read its features from /proc/self/fdinfo (" +
                          std::string(err ? std::strerror(err) : "no API line") + ")");
  return features;
}

std::uint64_t count_holes(int memfd, std::uint64_t offset, std::uint64_t len, std::uint64_t page_size) {
  const UniqueFd own = private_file(memfd);
  if (own) memfd = own.get();
  std::uint64_t holes = 0;
  const std::uint64_t n = len / page_size;
  for (std::uint64_t p = 0; p < n;) {
    bool hole = false;
    const std::uint64_t k = file_extent(memfd, offset + p * page_size, n - p, page_size, hole);
    if (hole) holes += k;
    p += k;
  }
  return holes;
}

// ------------------------------------------------------------------------------------------------
// accept

Connection Connection::accept(UniqueFd sock, const AcceptOptions& opts) {
  Connection c;
  c.sock_ = std::move(sock);
  c.timeout_s_ = opts.timeout_s;
  const int fd = c.sock_.get();
  const std::int64_t deadline = deadline_after(opts.timeout_s);
  std::uint16_t reply_version = LIVEMIG_ATTACH_VERSION;

  // Every refusal: ERROR to the process (best effort), then the exception; received descriptors
  // are UniqueFds and close as `c` goes.
  auto refuse = [&](std::uint32_t code, const std::string& text) -> void {
    send_error_best_effort(fd, reply_version, code, text);
    if (code == LIVEMIG_ATTACH_ERR_DESCRIPTOR) throw DescriptorError("attach: " + text);
    if (code == LIVEMIG_ATTACH_ERR_TIMEOUT) throw ConnectionLost("attach: " + text);
    throw ProtocolError("attach: " + text);
  };

  int one = 1;
  // SO_PASSCRED: the kernel hands over the SCM_CREDENTIALS the process attached to HELLO.
  if (::setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) != 0) throw_errno("setsockopt", "SO_PASSCRED");
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) throw_errno("fcntl", "O_NONBLOCK on the attach socket");
  ucred peer{};
  socklen_t plen = sizeof peer;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &plen) != 0) throw_errno("getsockopt", "SO_PEERCRED");
  c.peer_pid_ = peer.pid;

  // ---- the HELLO header, with the descriptors and credentials on its first bytes ----
  std::uint8_t hb[LIVEMIG_ATTACH_HEADER_SIZE];
  std::size_t have = 0;
  std::vector<UniqueFd> fds;
  bool have_creds = false, truncated = false;
  ucred creds{};
  while (have < sizeof hb) {
    union {
      char buf[CMSG_SPACE(sizeof(int) * 16) + CMSG_SPACE(sizeof(ucred))];
      cmsghdr align;
    } control;
    iovec iov{hb + have, sizeof hb - have};
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = control.buf;
    m.msg_controllen = sizeof control.buf;
    const ssize_t r = ::recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) {
      if (!wait_fd(fd, POLLIN, deadline))
        refuse(LIVEMIG_ATTACH_ERR_TIMEOUT, "no whole HELLO within " + seconds(opts.timeout_s) + " (silent process)");
      continue;
    }
    if (r < 0) throw_errno("recvmsg", "HELLO");
    if (r == 0) throw ConnectionLost("attach: the process closed the connection before HELLO");
    for (cmsghdr* h = CMSG_FIRSTHDR(&m); h != nullptr; h = CMSG_NXTHDR(&m, h)) {
      if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
        const std::size_t n = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < n; ++i) {
          int got;
          std::memcpy(&got, CMSG_DATA(h) + i * sizeof(int), sizeof got);
          fds.emplace_back(got);
        }
      } else if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_CREDENTIALS) {
        std::memcpy(&creds, CMSG_DATA(h), sizeof creds);
        have_creds = true;
      }
    }
    truncated = truncated || (m.msg_flags & MSG_CTRUNC) != 0;
    have += static_cast<std::size_t>(r);
  }
  Header h{get32(hb), get16(hb + 4), get16(hb + 6), get32(hb + 8), get32(hb + 12)};
  if (h.magic != LIVEMIG_ATTACH_MAGIC) refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "bad magic " + hex(h.magic) + " (not the attach protocol)");
  if (h.type != LIVEMIG_ATTACH_MSG_HELLO)
    refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, std::string("the first message is ") + livemig_attach_type_name(h.type) +
                                            " (type " + std::to_string(h.type) + "), not HELLO");
  if (h.length < LIVEMIG_ATTACH_HELLO_FIXED || h.length > livemig_attach_max_body(LIVEMIG_ATTACH_MSG_HELLO))
    refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO with a " + std::to_string(h.length) + "-byte body (" +
                                            std::to_string(LIVEMIG_ATTACH_HELLO_FIXED) + " to " +
                                            std::to_string(livemig_attach_max_body(LIVEMIG_ATTACH_MSG_HELLO)) + ")");
  if (h.tag != 0) refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO with tag " + std::to_string(h.tag));
  std::uint8_t body[LIVEMIG_ATTACH_HELLO_FIXED + LIVEMIG_ATTACH_MAX_NAME];
  if (recv_all(fd, body, h.length, deadline, "HELLO body") != h.length)
    throw ConnectionLost("attach: the process closed the connection in the middle of HELLO");

  // ---- version and layout ----
  Layout& L = c.layout_;
  L.max_version = h.version;
  L.min_version = get16(body);
  if (L.min_version == 0 || L.min_version > L.max_version || L.min_version > LIVEMIG_ATTACH_VERSION)
    refuse(LIVEMIG_ATTACH_ERR_VERSION, "unsupported attach protocol versions " + std::to_string(L.min_version) + ".." +
                                           std::to_string(L.max_version) + "; livemig speaks version " +
                                           std::to_string(LIVEMIG_ATTACH_VERSION));
  c.version_ = std::min<std::uint16_t>(L.max_version, LIVEMIG_ATTACH_VERSION);
  reply_version = c.version_;
  const std::uint8_t role = body[2], nfds = body[3];
  L.page_size = get32(body + 4);
  L.addr = get64(body + 8);
  L.len = get64(body + 16);
  L.memfd_offset = get64(body + 24);
  L.capabilities = get64(body + 32);
  L.uffd_features = get64(body + 40);
  L.poison = get32(body + 48);
  const std::uint16_t name_len = get16(body + 52);
  if (get16(body + 54) != 0) refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO: reserved bytes 54..55 are not zero");
  if (name_len > LIVEMIG_ATTACH_MAX_NAME || h.length != LIVEMIG_ATTACH_HELLO_FIXED + name_len)
    refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO: name length " + std::to_string(name_len) + " does not match a " +
                                            std::to_string(h.length) + "-byte body");
  L.name.assign(reinterpret_cast<const char*>(body) + LIVEMIG_ATTACH_HELLO_FIXED, name_len);
  if (role != LIVEMIG_ATTACH_ROLE_SOURCE && role != LIVEMIG_ATTACH_ROLE_DESTINATION)
    refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO: role " + std::to_string(role) + " is neither 1 (source) nor 2 (destination)");
  L.role = static_cast<Role>(role);
  if (opts.expect_role != 0 && opts.expect_role != role)
    refuse(LIVEMIG_ATTACH_ERR_REFUSED, std::string("this livemig takes a ") +
                                           role_name(static_cast<Role>(opts.expect_role)) + ", not a " + role_name(L.role));
  const auto ps = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  if (L.page_size != ps)
    refuse(LIVEMIG_ATTACH_ERR_REFUSED, "page size " + std::to_string(L.page_size) + ": livemig supports the system page size " +
                                           std::to_string(ps) + " only (no huge pages)");
  if (L.len == 0 || L.len % ps != 0 || L.addr % ps != 0 || L.memfd_offset % ps != 0 || L.addr + L.len < L.addr ||
      L.memfd_offset + L.len < L.memfd_offset)
    refuse(LIVEMIG_ATTACH_ERR_PROTOCOL, "HELLO: region of " + std::to_string(L.len) + " bytes at " + hex(L.addr) +
                                            ", memfd offset " + hex(L.memfd_offset) +
                                            ": not a positive, page-aligned, non-wrapping range");
  if (opts.expect_len != 0 && L.len != opts.expect_len)
    refuse(LIVEMIG_ATTACH_ERR_REFUSED, "region of " + std::to_string(L.len) + " bytes; this migration moves exactly " +
                                           std::to_string(opts.expect_len));
  if (opts.max_len != 0 && L.len > opts.max_len)
    refuse(LIVEMIG_ATTACH_ERR_REFUSED, "region of " + std::to_string(L.len) + " bytes is over the limit of " +
                                           std::to_string(opts.max_len));

  // ---- descriptors: count, credentials ----
  if (truncated || nfds != LIVEMIG_ATTACH_HELLO_FDS || fds.size() != LIVEMIG_ATTACH_HELLO_FDS)
    refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "HELLO must carry exactly 3 descriptors (memfd, uffd, pagemap); it announced " +
                                              std::to_string(nfds) + " and " + std::to_string(fds.size()) + " arrived" +
                                              (truncated ? " (more were cut off)" : ""));
  if (!have_creds || creds.pid <= 0)
    refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "HELLO carried no SCM_CREDENTIALS: livemig cannot tell which process owns the memory");
  if (creds.uid != peer.uid)
    refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "HELLO's credentials name uid " + std::to_string(creds.uid) +
                                              " but the connecting process runs as uid " + std::to_string(peer.uid));
  c.pid_ = creds.pid;
  c.memfd_ = std::move(fds[0]);
  c.uffd_ = std::move(fds[1]);
  c.pagemap_ = std::move(fds[2]);
  const bool source = L.role == Role::Source;

  // ---- memfd ----
  {
    const int m = c.memfd_.get();
    c.memfd_path_ = readlink_fd(m);
    struct stat st{};
    struct statfs sf{};
    if (::fstat(m, &st) != 0 || ::fstatfs(m, &sf) != 0) throw_errno("fstat", "the received memfd");
    if (!S_ISREG(st.st_mode) || (sf.f_type != kTmpfsMagic && sf.f_type != kHugetlbfsMagic))
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: descriptor 1 is " + c.memfd_path_ +
                                                ", not a memfd or shared-memory file (tmpfs)");
    if (sf.f_type == kHugetlbfsMagic)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: " + c.memfd_path_ + " is on hugetlbfs; livemig supports 4 KiB pages only");
    const int seals = ::fcntl(m, F_GET_SEALS);
    if (seals < 0)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: " + c.memfd_path_ + " is not a shared-memory file (F_GET_SEALS: " +
                                                std::strerror(errno) + ")");
    const int acc = ::fcntl(m, F_GETFL) & O_ACCMODE;
    if (acc != O_RDWR && !(source && acc == O_RDONLY))
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, std::string("memfd: opened ") + (acc == O_RDONLY ? "read-only" : "write-only") +
                                                "; a destination's must be read-write, a source's readable");
    if (static_cast<std::uint64_t>(st.st_size) < L.memfd_offset + L.len)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: " + std::to_string(st.st_size) + " bytes, smaller than the region's end (offset " +
                                                std::to_string(L.memfd_offset) + " + " + std::to_string(L.len) + " bytes)");
    if (!source) {
      if ((seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) != 0)
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: a destination's memfd is sealed against writes");
      // Empty: no page at all when the region is the whole file (st_blocks also counts pages
      // allocated by fallocate, which SEEK_DATA calls holes); else no data inside the region.
      const bool whole = L.memfd_offset == 0 && static_cast<std::uint64_t>(st.st_size) <= L.len;
      const UniqueFd own = whole ? UniqueFd() : private_file(m);  // the process's offset stays put
      const off_t data = whole ? 0 : ::lseek(own ? own.get() : m, static_cast<off_t>(L.memfd_offset), SEEK_DATA);
      if (whole ? st.st_blocks != 0 : (data >= 0 && static_cast<std::uint64_t>(data) < L.memfd_offset + L.len))
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "memfd: the destination's memfd already holds " +
                                                  (whole ? std::to_string(st.st_blocks / 2) + " KiB"
                                                         : "data at offset " + hex(static_cast<std::uint64_t>(data))) +
                                                  "; a destination starts empty (pages present before livemig "
                                                  "places them would never fault)");
    }
  }

  // ---- uffd ----
  {
    const int u = c.uffd_.get();
    std::uint64_t features = 0;
    try {
      features = uffd_fd_features(u);
    } catch (const DescriptorError& e) {
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, e.what());
    }
    uffdio_api api{};
    api.api = UFFD_API;
    // UFFDIO_API on a userfaultfd the process initialised fails with EINVAL and leaves it as it was;
    // success would mean the process never negotiated its features (the fd is now useless to it).
    if (::ioctl(u, UFFDIO_API, &api) == 0 || (features & kUffdInitialized) == 0)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "uffd: the process never initialised its userfaultfd (UFFDIO_API)");
    c.uffd_features_ = features & ~kUffdInitialized;
    const std::uint64_t need = source ? (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
                                      : static_cast<std::uint64_t>(UFFD_FEATURE_MISSING_SHMEM);
    if ((c.uffd_features_ & need) != need)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, std::string("uffd: features ") + hex(c.uffd_features_) + " lack " +
                                                hex(need & ~c.uffd_features_) + " (a " + role_name(L.role) + " needs " +
                                                (source ? "WP_ASYNC, WP_UNPOPULATED and WP_HUGETLBFS_SHMEM"
                                                        : "MISSING_SHMEM") + ")");
    if (c.uffd_features_ != L.uffd_features)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "uffd: HELLO says features " + hex(L.uffd_features) + ", the descriptor has " +
                                                hex(c.uffd_features_) + " (another userfaultfd?)");
    const int ufl = ::fcntl(u, F_GETFL);
    // The fault thread reads it without blocking; the flag belongs to the shared open file, and
    // the process never reads its own uffd while attached.
    if (!source && (ufl & O_NONBLOCK) == 0 && ::fcntl(u, F_SETFL, ufl | O_NONBLOCK) != 0)
      throw_errno("fcntl", "O_NONBLOCK on the received uffd");
  }

  // ---- pagemap ----
  {
    const int p = c.pagemap_.get();
    const std::string link = readlink_fd(p);
    struct statfs sf{};
    int owner = 0;
    char tail[16] = {0};
    if (::fstatfs(p, &sf) != 0 || sf.f_type != kProcMagic || std::sscanf(link.c_str(), "/proc/%d/%15s", &owner, tail) != 2 ||
        std::strcmp(tail, "pagemap") != 0)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "pagemap: descriptor 3 is " + link + ", not /proc/<pid>/pagemap");
    if (owner != c.pid_)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "pagemap: it belongs to process " + std::to_string(owner) +
                                                ", not to the process that sent HELLO (" + std::to_string(c.pid_) + ")");
    if (source) {
      pm_scan_arg arg{};
      arg.size = sizeof arg;
      arg.flags = PM_SCAN_CHECK_WPASYNC;
      arg.start = L.addr;
      arg.end = L.addr + L.len;
      // PAGEMAP_SCAN with no output and PM_SCAN_CHECK_WPASYNC: walks the process's range and fails
      // (EPERM) where a mapping lacks asynchronous write-protect; changes nothing.
      if (::ioctl(p, PAGEMAP_SCAN, &arg) < 0) {
        if (errno == ENOTTY || errno == EINVAL)
          refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "pagemap: PAGEMAP_SCAN is missing on this kernel (Linux 6.7)");
        // EFAULT: the range is not a valid user range of the process (e.g. past its address space).
        if (errno == EFAULT)
          refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "mapping: the process maps nothing at " + hex(L.addr) +
                                                    " inside its region " + hex(L.addr) + " + " + std::to_string(L.len) +
                                                    " (not a valid address range there)");
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "pagemap: the region at " + hex(L.addr) +
                                                  " is not registered for asynchronous write-protect in the process (" +
                                                  std::strerror(errno) + ")");
      }
    }
  }

  // ---- the process's mapping: the memfd, shared, registered in the role's mode ----
  {
    int err = 0;
    const std::string path = "/proc/" + std::to_string(c.pid_) + "/smaps";
    const std::string text = read_file(path, err);
    if (err != 0)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "cannot read " + path + " (" + std::strerror(err) +
                                                "): livemig must see the process's mappings (same user and dumpable, or "
                                                "CAP_SYS_PTRACE)");
    struct stat st{};
    ::fstat(c.memfd_.get(), &st);
    std::uint64_t at = L.addr;
    const std::uint64_t end = L.addr + L.len;
    for (const Vma& v : parse_smaps(text)) {
      if (v.end <= at || v.start >= end) continue;
      if (v.start > at) break;  // a gap (smaps is sorted)
      const std::uint64_t off_here = v.offset + (at - v.start);
      if (v.inode != st.st_ino || v.dev_major != major(st.st_dev) || v.dev_minor != minor(st.st_dev) ||
          off_here != L.memfd_offset + (at - L.addr))
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "mapping: " + hex(at) + " in the process maps inode " + std::to_string(v.inode) +
                                                  " at offset " + hex(off_here) + ", not the memfd (inode " +
                                                  std::to_string(st.st_ino) + ") at offset " +
                                                  hex(L.memfd_offset + (at - L.addr)));
      if (v.perms.size() < 4 || v.perms[3] != 's' || v.perms[0] != 'r' || v.perms[1] != 'w')
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "mapping: " + hex(at) + " is mapped " + v.perms + "; it must be shared and read-write");
      if (!has_flag(v.flags, source ? "uw" : "um"))
        refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "mapping: " + hex(at) + " is not registered with userfaultfd in " +
                                                  (source ? "write-protect" : "missing") + " mode (VmFlags:" + v.flags + ")");
      at = std::min(v.end, end);
      if (at == end) break;
    }
    if (at != end)
      refuse(LIVEMIG_ATTACH_ERR_DESCRIPTOR, "mapping: the process maps nothing at " + hex(at) + " inside its region " +
                                                hex(L.addr) + " + " + std::to_string(L.len));
  }

  // ---- WELCOME ----
  c.caps_ = L.capabilities & opts.capabilities;
  std::uint8_t welcome[LIVEMIG_ATTACH_WELCOME_SIZE] = {0};
  put64(welcome, c.caps_);
  c.send(LIVEMIG_ATTACH_MSG_WELCOME, 0, welcome);
  return c;
}

Mapping Connection::map_region() const {
  const int prot = layout_.role == Role::Source ? PROT_READ : PROT_READ | PROT_WRITE;
  void* p = ::mmap(nullptr, layout_.len, prot, MAP_SHARED, memfd_.get(), static_cast<off_t>(layout_.memfd_offset));
  if (p == MAP_FAILED) throw_errno("mmap", "the attached memfd, " + std::to_string(layout_.len) + " bytes");
  return Mapping(p, layout_.len);
}

// ------------------------------------------------------------------------------------------------
// the conversation

void Connection::send(std::uint16_t type, std::uint32_t tag, std::span<const std::uint8_t> a,
                      std::span<const std::uint8_t> b) {
  if (!sock_) throw ConnectionLost(std::string("send ") + livemig_attach_type_name(type) + ": not connected");
  std::uint8_t h[LIVEMIG_ATTACH_HEADER_SIZE];
  put32(h, LIVEMIG_ATTACH_MAGIC);
  put16(h + 4, version_);
  put16(h + 6, type);
  put32(h + 8, tag);
  put32(h + 12, static_cast<std::uint32_t>(a.size() + b.size()));
  iovec iov[3] = {{h, sizeof h},
                  {const_cast<std::uint8_t*>(a.data()), a.size()},
                  {const_cast<std::uint8_t*>(b.data()), b.size()}};
  try {
    send_all(sock_.get(), iov, 3, deadline_after(timeout_s_), livemig_attach_type_name(type));
  } catch (const ConnectionLost&) {
    close();
    throw;
  }
}

void Connection::send_raw(std::span<const std::uint8_t> bytes) {
  iovec iov{const_cast<std::uint8_t*>(bytes.data()), bytes.size()};
  send_all(sock_.get(), &iov, 1, deadline_after(timeout_s_), "raw bytes");
}

void Connection::close() noexcept {
  if (sock_) ::shutdown(sock_.get(), SHUT_RDWR);
  sock_.reset();
}

void Connection::release() noexcept {
  close();
  memfd_.reset();
  uffd_.reset();
  pagemap_.reset();
}

void Connection::fail_protocol(const std::string& what) {
  send_error_best_effort(sock_.get(), version_, LIVEMIG_ATTACH_ERR_PROTOCOL, what);
  close();
  throw ProtocolError("attached process " + std::to_string(pid_) + ": " + what);
}

bool Connection::read_message(Header& h, std::vector<std::uint8_t>& body, std::int64_t deadline_ns) {
  if (!sock_) throw ConnectionLost("attached process: not connected");
  const int fd = sock_.get();
  if (!wait_fd(fd, POLLIN, deadline_ns)) return false;
  std::uint8_t hb[LIVEMIG_ATTACH_HEADER_SIZE];
  // Once a message has begun, all of it must come within the timeout.
  const std::int64_t msg_deadline = deadline_after(timeout_s_);
  std::size_t got = 0;
  try {
    got = recv_all(fd, hb, sizeof hb, msg_deadline, "message header");
  } catch (const ConnectionLost&) {
    close();
    throw;
  }
  if (got == 0) {
    close();
    throw ConnectionLost("attached process " + std::to_string(pid_) + " closed the connection (it exited or detached)");
  }
  if (got != sizeof hb) {
    close();
    throw ConnectionLost("attached process " + std::to_string(pid_) + " closed the connection in the middle of a header");
  }
  h = Header{get32(hb), get16(hb + 4), get16(hb + 6), get32(hb + 8), get32(hb + 12)};
  if (h.magic != LIVEMIG_ATTACH_MAGIC) fail_protocol("bad magic " + hex(h.magic));
  if (h.version != version_)
    fail_protocol("version " + std::to_string(h.version) + " in a conversation of version " + std::to_string(version_));
  if (!livemig_attach_known_type(h.type)) fail_protocol("unknown message type " + std::to_string(h.type));
  switch (h.type) {
    case LIVEMIG_ATTACH_MSG_ERROR:
    case LIVEMIG_ATTACH_MSG_REPLY:
    case LIVEMIG_ATTACH_MSG_DETACH:
    case LIVEMIG_ATTACH_MSG_HINTS:
    case LIVEMIG_ATTACH_MSG_RESUMED:
      break;
    default:
      fail_protocol(std::string(livemig_attach_type_name(h.type)) + " is not sent by a process");
  }
  if (h.length > livemig_attach_max_body(h.type))
    fail_protocol(std::string(livemig_attach_type_name(h.type)) + " with a " + std::to_string(h.length) +
                  "-byte body (at most " + std::to_string(livemig_attach_max_body(h.type)) + ")");
  if ((h.type == LIVEMIG_ATTACH_MSG_DETACH) != (h.tag != 0) && h.type != LIVEMIG_ATTACH_MSG_REPLY)
    fail_protocol(std::string(livemig_attach_type_name(h.type)) + " with tag " + std::to_string(h.tag));
  // The body grows as its bytes arrive: a lying length costs nothing until the bytes come.
  body.clear();
  std::size_t done = 0;
  while (done < h.length) {
    const std::size_t step = std::min<std::size_t>(h.length - done, kChunk);
    body.resize(done + step);
    std::size_t n = 0;
    try {
      n = recv_all(fd, body.data() + done, step, msg_deadline,
                   std::string(livemig_attach_type_name(h.type)) + " body");
    } catch (const ConnectionLost&) {
      close();
      throw;
    }
    done += n;
    if (n != step) {
      close();
      throw ConnectionLost("attached process " + std::to_string(pid_) + " closed the connection in the middle of a " +
                           livemig_attach_type_name(h.type) + " (" + std::to_string(done) + " of " +
                           std::to_string(h.length) + " body bytes)");
    }
  }
  return true;
}

Event Connection::parse_hints(const std::vector<std::uint8_t>& body) {
  if ((caps_ & LIVEMIG_ATTACH_CAP_HINTS) == 0) fail_protocol("HINTS without the hints capability");
  if (body.size() < LIVEMIG_ATTACH_HINTS_FIXED) fail_protocol("HINTS with a " + std::to_string(body.size()) + "-byte body");
  Event e;
  e.type = LIVEMIG_ATTACH_MSG_HINTS;
  e.id = get32(body.data());
  e.flags = get32(body.data() + 4);
  const std::uint32_t count = get32(body.data() + 8);
  if (get32(body.data() + 12) != 0 || (e.flags & ~(LIVEMIG_ATTACH_HINT_START | LIVEMIG_ATTACH_HINT_STOP)) != 0)
    fail_protocol("HINTS with unknown flags " + hex(e.flags) + " or reserved bits set");
  if (count > LIVEMIG_ATTACH_MAX_HINT_RANGES || body.size() != LIVEMIG_ATTACH_HINTS_FIXED + 16ULL * count)
    fail_protocol("HINTS: " + std::to_string(count) + " ranges in a " + std::to_string(body.size()) + "-byte body");
  const std::uint64_t pages = layout_.pages();
  e.ranges.reserve(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    const std::uint64_t first = get64(body.data() + 16 + 16ULL * i), n = get64(body.data() + 24 + 16ULL * i);
    if (n == 0 || first >= pages || n > pages - first)
      fail_protocol("HINTS: range " + std::to_string(i) + " (" + std::to_string(first) + " + " + std::to_string(n) +
                    " pages) is empty or outside the region's " + std::to_string(pages) + " pages");
    e.ranges.push_back(PageRange{first, n});
  }
  return e;
}

Reply Connection::request(std::uint16_t type, std::span<const std::uint8_t> body, double timeout_s) {
  if (!livemig_attach_is_request(type)) throw std::invalid_argument("request: not a request type");
  const double bound = timeout_s < 0 ? timeout_s_ : timeout_s;
  const std::uint32_t tag = next_tag_++;
  if (next_tag_ == 0) next_tag_ = 1;
  send(type, tag, body);
  const std::int64_t deadline = deadline_after(bound);
  Header h{};
  std::vector<std::uint8_t> b;
  for (;;) {
    if (!read_message(h, b, deadline)) {
      const std::string what = std::string("the process did not answer ") + livemig_attach_type_name(type) + " within " +
                               seconds(bound);
      send_error_best_effort(sock_.get(), version_, LIVEMIG_ATTACH_ERR_TIMEOUT, what);
      close();
      throw ConnectionLost("attached process " + std::to_string(pid_) + ": " + what);
    }
    switch (h.type) {
      case LIVEMIG_ATTACH_MSG_HINTS:
        events_.push_back(parse_hints(b));
        continue;
      case LIVEMIG_ATTACH_MSG_RESUMED:
        if (!b.empty()) fail_protocol("RESUMED with a body");
        events_.push_back(Event{LIVEMIG_ATTACH_MSG_RESUMED, 0, 0, {}});
        continue;
      case LIVEMIG_ATTACH_MSG_ERROR: {
        const std::string text = b.size() >= LIVEMIG_ATTACH_ERROR_FIXED
                                     ? std::string(b.begin() + LIVEMIG_ATTACH_ERROR_FIXED, b.end())
                                     : std::string();
        const std::uint32_t code = b.size() >= 4 ? get32(b.data()) : 0;
        close();
        throw ProtocolError("attached process " + std::to_string(pid_) + " reported error " + std::to_string(code) + ": " + text);
      }
      case LIVEMIG_ATTACH_MSG_DETACH: {
        if (!b.empty()) fail_protocol("DETACH with a body");
        std::uint8_t fixed[LIVEMIG_ATTACH_REPLY_FIXED] = {0};
        put16(fixed, LIVEMIG_ATTACH_MSG_DETACH);
        try {
          send(LIVEMIG_ATTACH_MSG_REPLY, h.tag, fixed);
        } catch (const ConnectionLost&) {  // gone already: detached all the same
        }
        close();
        throw ConnectionLost("attached process " + std::to_string(pid_) + " detached");
      }
      default:
        break;  // REPLY
    }
    if (b.size() < LIVEMIG_ATTACH_REPLY_FIXED) fail_protocol("REPLY with a " + std::to_string(b.size()) + "-byte body");
    Reply r;
    r.request = get16(b.data());
    r.status = get32(b.data() + 4);
    const std::uint32_t tlen = get32(b.data() + 8);
    if (h.tag != tag || r.request != type)
      fail_protocol("REPLY to " + std::string(livemig_attach_type_name(r.request)) + " tag " + std::to_string(h.tag) +
                    ", expected " + livemig_attach_type_name(type) + " tag " + std::to_string(tag));
    if (get16(b.data() + 2) != 0 || get32(b.data() + 12) != 0) fail_protocol("REPLY with reserved bits set");
    if (tlen > LIVEMIG_ATTACH_MAX_REPLY_TEXT || tlen > b.size() - LIVEMIG_ATTACH_REPLY_FIXED)
      fail_protocol("REPLY text of " + std::to_string(tlen) + " bytes");
    r.text.assign(reinterpret_cast<const char*>(b.data()) + LIVEMIG_ATTACH_REPLY_FIXED, tlen);
    r.payload.assign(b.begin() + LIVEMIG_ATTACH_REPLY_FIXED + tlen, b.end());
    const std::size_t want = !r.ok() ? 0
                             : type == LIVEMIG_ATTACH_MSG_CHECK ? LIVEMIG_ATTACH_CHECK_RESULT_SIZE
                                                                : r.payload.size();
    if (r.payload.size() != want || (type != LIVEMIG_ATTACH_MSG_SAVE_STATE && type != LIVEMIG_ATTACH_MSG_CHECK && !r.payload.empty()))
      fail_protocol("REPLY to " + std::string(livemig_attach_type_name(type)) + " with a " +
                    std::to_string(r.payload.size()) + "-byte payload");
    if (type == LIVEMIG_ATTACH_MSG_SAVE_STATE && r.payload.size() > LIVEMIG_ATTACH_MAX_STATE)
      fail_protocol("device state past the limit");
    return r;
  }
}

Reply Connection::pause(std::uint32_t lease_ms, double timeout_s) {
  std::uint8_t b[LIVEMIG_ATTACH_PAUSE_SIZE] = {0};
  put32(b, lease_ms);
  return request(LIVEMIG_ATTACH_MSG_PAUSE, b, timeout_s);
}
Reply Connection::resume(double timeout_s) { return request(LIVEMIG_ATTACH_MSG_RESUME, {}, timeout_s); }
std::vector<std::uint8_t> Connection::save_state(double timeout_s) {
  Reply r = request(LIVEMIG_ATTACH_MSG_SAVE_STATE, {}, timeout_s);
  if (!r.ok())
    throw ProtocolError("attached process " + std::to_string(pid_) + " did not save its state (" +
                        std::strerror(static_cast<int>(r.status)) + "): " + r.text);
  return std::move(r.payload);
}
Reply Connection::load_state(std::span<const std::uint8_t> state, double timeout_s) {
  if (state.size() > LIVEMIG_ATTACH_MAX_STATE) throw std::invalid_argument("load_state: state past 128 MiB");
  return request(LIVEMIG_ATTACH_MSG_LOAD_STATE, state, timeout_s);
}
CheckResult Connection::check(double timeout_s) {
  Reply r = request(LIVEMIG_ATTACH_MSG_CHECK, {}, timeout_s);
  if (!r.ok())
    throw ProtocolError("attached process " + std::to_string(pid_) + " could not run its check (" +
                        std::strerror(static_cast<int>(r.status)) + "): " + r.text);
  return CheckResult{get64(r.payload.data()), get64(r.payload.data() + 8), r.text};
}
Reply Connection::handoff(double timeout_s) { return request(LIVEMIG_ATTACH_MSG_HANDOFF, {}, timeout_s); }
Reply Connection::complete(double timeout_s) { return request(LIVEMIG_ATTACH_MSG_COMPLETE, {}, timeout_s); }
void Connection::detach(double timeout_s) {
  try {
    (void)request(LIVEMIG_ATTACH_MSG_DETACH, {}, timeout_s);
  } catch (const ConnectionLost&) {  // it went first: detached all the same
  }
  close();
}

void Connection::balloon(std::uint32_t cmd_id) {
  std::uint8_t b[LIVEMIG_ATTACH_BALLOON_SIZE] = {0};
  put32(b, cmd_id);
  send(LIVEMIG_ATTACH_MSG_BALLOON, 0, b);
}

bool Connection::next_event(Event& out, double timeout_s) {
  const std::int64_t deadline = deadline_after(timeout_s);
  for (;;) {
    if (!events_.empty()) {
      out = std::move(events_.front());
      events_.pop_front();
      return true;
    }
    Header h{};
    std::vector<std::uint8_t> b;
    if (!read_message(h, b, deadline)) return false;
    switch (h.type) {
      case LIVEMIG_ATTACH_MSG_HINTS:
        events_.push_back(parse_hints(b));
        break;
      case LIVEMIG_ATTACH_MSG_RESUMED:
        if (!b.empty()) fail_protocol("RESUMED with a body");
        events_.push_back(Event{LIVEMIG_ATTACH_MSG_RESUMED, 0, 0, {}});
        break;
      case LIVEMIG_ATTACH_MSG_ERROR: {
        const std::string text = b.size() >= LIVEMIG_ATTACH_ERROR_FIXED
                                     ? std::string(b.begin() + LIVEMIG_ATTACH_ERROR_FIXED, b.end())
                                     : std::string();
        close();
        throw ProtocolError("attached process " + std::to_string(pid_) + " reported an error: " + text);
      }
      case LIVEMIG_ATTACH_MSG_DETACH: {
        std::uint8_t fixed[LIVEMIG_ATTACH_REPLY_FIXED] = {0};
        put16(fixed, LIVEMIG_ATTACH_MSG_DETACH);
        try {
          send(LIVEMIG_ATTACH_MSG_REPLY, h.tag, fixed);
        } catch (const ConnectionLost&) {
        }
        close();
        throw ConnectionLost("attached process " + std::to_string(pid_) + " detached");
      }
      default:
        fail_protocol(std::string("unexpected ") + livemig_attach_type_name(h.type) + " (tag " + std::to_string(h.tag) + ")");
    }
  }
}

}  // namespace livemig::attach
