#include "livemig/base/page_size.hpp"
#include "livemig/bench/dest.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "livemig/base/errors.hpp"
#include "livemig/base/uapi.hpp"

namespace livemig::bench::dest {
namespace {

// Fills `m` with a non-zero pattern so it is populated (warm) and not deduplicated.
void warm(Mapping& m) {
  (void)::madvise(m.data(), m.size(), MADV_NOHUGEPAGE);
  for (std::size_t i = 0; i < m.size(); i += sizeof(std::uint64_t)) {
    const std::uint64_t v = i * 0x9E3779B97F4A7C15ULL + 1;
    std::memcpy(m.data() + i, &v, sizeof v);
  }
}

void drop(Mapping& m) {
  if (::madvise(m.data(), m.size(), MADV_DONTNEED) != 0) throw_errno("madvise", "drop bench region");
}

}  // namespace

std::uint64_t now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ULL + static_cast<std::uint64_t>(ts.tv_nsec);
}

RawCopy::RawCopy(std::size_t bytes)
    : region_(Mapping::anonymous(bytes)), src_(Mapping::anonymous(bytes)), uffd_(Userfaultfd::open(0, 0, true)) {
  (void)::madvise(region_.data(), bytes, MADV_NOHUGEPAGE);
  warm(src_);
  uffd_.register_range(region_.data(), bytes, UFFDIO_REGISTER_MODE_MISSING);
}

RawCopy::~RawCopy() {
  try {
    uffd_.unregister_range(region_.data(), region_.size());
  } catch (...) {
  }
}

double RawCopy::run(std::size_t run_pages) {
  const std::size_t ps = system_page_size(), len = run_pages * ps;
  const std::uint64_t t0 = now_ns();
  for (std::size_t off = 0; off < region_.size(); off += len) {
    uffdio_copy a{};
    a.dst = reinterpret_cast<std::uintptr_t>(region_.data() + off);
    a.src = reinterpret_cast<std::uintptr_t>(src_.data() + off);
    a.len = std::min(len, region_.size() - off);
    a.mode = 0;
    // UFFDIO_COPY, the plain loop the engine is measured against.
    if (::ioctl(uffd_.fd(), UFFDIO_COPY, &a) != 0) throw_errno("copy", "raw UFFDIO_COPY", a.dst);
  }
  const double s = static_cast<double>(now_ns() - t0) / 1e9;
  drop(region_);
  return s;
}

double engine_place(DestRegion& r, const std::uint8_t* src, std::size_t run_pages) {
  const std::uint64_t t0 = now_ns();
  for (std::size_t p = 0; p < r.pages(); p += run_pages)
    r.place(p, std::min(run_pages, r.pages() - p), src + p * r.page_bytes());
  return static_cast<double>(now_ns() - t0) / 1e9;
}

StagedTimes staged_place(DestRegion& r, const std::uint8_t* wire, std::size_t run_pages, bool move) {
  const std::size_t ps = r.page_bytes();
  Mapping staging = Mapping::anonymous(run_pages * ps);
  (void)::madvise(staging.data(), staging.size(), MADV_NOHUGEPAGE);
  std::memset(staging.data(), 1, staging.size());  // warm: the COPY path keeps reusing these pages
  StagedTimes t;
  for (std::size_t p = 0; p < r.pages(); p += run_pages) {
    const std::size_t n = std::min(run_pages, r.pages() - p);
    const std::uint64_t t0 = now_ns();
    std::memcpy(staging.data(), wire + p * ps, n * ps);
    const std::uint64_t t1 = now_ns();
    t.pages += move ? r.place_move(p, n, staging.data()) : r.place(p, n, staging.data());
    const std::uint64_t t2 = now_ns();
    t.fill_s += static_cast<double>(t1 - t0) / 1e9;
    t.place_s += static_cast<double>(t2 - t1) / 1e9;
  }
  return t;
}

std::vector<std::uint64_t> touch_pages(const std::uint8_t* base, std::size_t npages) {
  const std::size_t ps = system_page_size();
  std::vector<std::uint64_t> out(npages);
  for (std::size_t i = 0; i < npages; ++i) {
    const std::uint64_t t0 = now_ns();
    // A volatile read: the fault happens here, inside the timed interval.
    (void)*static_cast<const volatile std::uint8_t*>(base + i * ps);
    out[i] = now_ns() - t0;
  }
  return out;
}

std::vector<std::uint8_t> touch_threads(const std::uint8_t* base, const std::uint64_t* pages, std::size_t rows,
                                        std::size_t cols) {
  const std::size_t ps = system_page_size();
  std::vector<std::uint8_t> out(rows * cols);
  std::vector<std::thread> ts;
  ts.reserve(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    ts.emplace_back([&, r] {
      for (std::size_t c = 0; c < cols; ++c)
        out[r * cols + c] = *static_cast<const volatile std::uint8_t*>(base + pages[r * cols + c] * ps);
    });
  }
  for (auto& t : ts) t.join();
  return out;
}

void LoopbackSink::request(std::uint64_t first_page, std::uint32_t npages) noexcept {
  try {
    region_->place(first_page, npages, src_ + first_page * region_->page_bytes());
  } catch (...) {
    // A benchmark sink: a failed placement shows up as a hang in touch_pages, not here.
  }
}

RawHandler::RawHandler(std::size_t bytes)
    : region_(Mapping::anonymous(bytes)),
      src_(Mapping::anonymous(bytes)),
      uffd_(Userfaultfd::open(0, 0, true)),
      stop_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!stop_) throw_errno("eventfd", "raw handler");
  (void)::madvise(region_.data(), bytes, MADV_NOHUGEPAGE);
  warm(src_);
  uffd_.register_range(region_.data(), bytes, UFFDIO_REGISTER_MODE_MISSING);
  th_ = std::thread([this] { loop(); });
}

RawHandler::~RawHandler() {
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t w = ::write(stop_.get(), &one, sizeof one);
  th_.join();
  try {
    uffd_.unregister_range(region_.data(), region_.size());
  } catch (...) {
  }
}

std::size_t RawHandler::pages() const noexcept { return region_.size() / system_page_size(); }

std::vector<std::uint64_t> RawHandler::round_trips() {
  auto out = touch_pages(region_.data(), pages());
  drop(region_);
  return out;
}

void RawHandler::loop() noexcept {
  const std::size_t ps = system_page_size();
  for (;;) {
    pollfd fds[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) continue;
    if ((fds[1].revents & POLLIN) != 0) return;
    uffd_msg m{};
    if (::read(uffd_.fd(), &m, sizeof m) != static_cast<ssize_t>(sizeof m)) continue;
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    const std::uint64_t addr = m.arg.pagefault.address & ~static_cast<std::uint64_t>(ps - 1);
    uffdio_copy a{};
    a.dst = addr;
    a.src = reinterpret_cast<std::uintptr_t>(src_.data()) + (addr - reinterpret_cast<std::uintptr_t>(region_.data()));
    a.len = ps;
    a.mode = 0;
    // UFFDIO_COPY one page and wake the faulting thread.
    (void)::ioctl(uffd_.fd(), UFFDIO_COPY, &a);
  }
}

}  // namespace livemig::bench::dest
