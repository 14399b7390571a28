#include "livemig/session/session.hpp"

#include <sys/socket.h>

#include <algorithm>

#include "livemig/base/errors.hpp"
#include "livemig/wire/channel.hpp"

namespace livemig {

using Clock = std::chrono::steady_clock;

// ---- EventQueue ----

void EventQueue::push(SessionEvent e) {
  e.at = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
  {
    std::lock_guard lk(mu_);
    q_.push_back(std::move(e));
  }
  cv_.notify_all();
}

std::optional<SessionEvent> EventQueue::wait(std::chrono::nanoseconds timeout) {
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return !q_.empty(); })) return std::nullopt;
  SessionEvent e = std::move(q_.front());
  q_.pop_front();
  return e;
}

namespace {

SessionEvent failed_event(const std::exception& e) {
  SessionEvent ev;
  ev.kind = SessionEvent::Kind::Failed;
  ev.text = e.what();
  return ev;
}

}  // namespace

// ---- SourceSession ----

// Return-path frames: requests go straight to the scanner (no queue hop, no GIL); everything else
// becomes an event for the orchestrator.
class SourceSession::ReturnHandler final : public wire::FrameHandler {
 public:
  ReturnHandler(Source& source, EventQueue& events, SourceSession& session, bool resync, bool local_fill)
      : source_(source), events_(events), session_(session), resync_(resync), local_fill_(local_fill) {}
  std::uint8_t* page_buffer(std::uint64_t, std::uint32_t) override { throw ProtocolError("pages on the return path"); }
  void pages(std::uint64_t, std::uint32_t, const std::uint8_t*) override {}
  void zero(std::uint64_t, std::uint32_t) override { throw ProtocolError("zero pages on the return path"); }
  void request(std::uint64_t first, std::uint32_t n) override {
    if (!session_.serve_request(first, n)) source_.scanner().request(first, n);
  }
  void received_bitmap(std::span<const std::uint8_t> bits) override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::ReceivedBitmap;
    if (resync_) {
      // Here, on the return path's own thread: every request read after this frame sees the
      // resynced bits (a page lost in flight is served, not dropped as delivered).
      PageBitmap received(source_.pages());
      if (!received.import_bytes(bits)) throw ProtocolError("RECEIVED_BITMAP does not match the region");
      e.a = source_.resync_with_received(received, local_fill_);
      e.b = 1;
      source_.scanner().wake();  // a pump idling for requests has dirty pages again
    }
    e.data.assign(bits.begin(), bits.end());
    events_.push(std::move(e));
  }
  void device_state(std::span<const std::uint8_t> blob) override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::Report;
    e.data.assign(blob.begin(), blob.end());
    events_.push(std::move(e));
  }
  void ack(std::uint32_t kind, std::uint64_t value) override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::Ack;
    e.a = kind;
    e.b = value;
    events_.push(std::move(e));
  }
  void error(std::string_view message) override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::PeerError;
    e.text = std::string(message);
    events_.push(std::move(e));
  }
  void end() override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::End;
    events_.push(std::move(e));
  }

 private:
  Source& source_;
  EventQueue& events_;
  SourceSession& session_;
  bool resync_;
  bool local_fill_;
};

SourceSession::SourceSession(std::shared_ptr<Source> source, wire::FrameWriter& main,
                             std::vector<wire::FrameWriter*> extras, wire::FrameWriter* urgent, int return_fd,
                             const wire::WireConfig& cfg)
    : source_(std::move(source)), main_(main), extras_(std::move(extras)), urgent_(urgent), return_fd_(return_fd),
      cfg_(cfg) {
  if (!source_) throw std::invalid_argument("SourceSession needs a source");
  if (cfg_.region_pages != source_->pages())
    throw std::invalid_argument("the wire config's region (" + std::to_string(cfg_.region_pages) +
                                " pages) is not the source's (" + std::to_string(source_->pages()) + " pages)");
}

SourceSession::~SourceSession() {
  interrupt();
  join_return_path();
}

std::chrono::nanoseconds SourceSession::to_ns(double s) {
  if (s <= 0) return std::chrono::nanoseconds(0);
  if (s > 1e6) s = 1e6;
  return std::chrono::nanoseconds(static_cast<std::int64_t>(s * 1e9));
}

void SourceSession::resync_on_received_bitmap(bool local_fill) {
  if (return_thread_.joinable()) throw std::logic_error("resync_on_received_bitmap: the return path already started");
  resync_ = true;
  resync_local_fill_ = local_fill;
}

void SourceSession::read_through(wire::InputOpener open) {
  if (return_thread_.joinable()) throw std::logic_error("read_through: the return path already started");
  open_ = std::move(open);
}

void SourceSession::read_requests_on(int fd) {
  if (return_thread_.joinable()) throw std::logic_error("read_requests_on: the return path already started");
  request_fd_ = fd;
}

void SourceSession::start_return_path() {
  if (return_thread_.joinable()) throw std::logic_error("the return path is already being read");
  if (request_fd_ >= 0)
    request_thread_ = std::thread([this] {
      try {
        // Requests only, for the whole postcopy; it ends when the socket is shut down. Its end and
        // its errors after the urgent channel ended are no news (the main return path reports a
        // broken connection).
        const auto in = wire::open_input(open_, request_fd_, 0);
        wire::FrameReader reader(*in, cfg_, wire::Direction::kToSource);
        ReturnHandler handler(*source_, events_, *this, false, false);
        reader.run(handler);
      } catch (const std::exception& e) {
        if (serving_.load(std::memory_order_acquire)) events_.push(failed_event(e));
      }
    });
  return_thread_ = std::thread([this] {
    try {
      // The return path may stay silent for a long time (no faults): no read timeout here; the
      // orchestrator ends it by shutting the socket down.
      const auto in = wire::open_input(open_, return_fd_, 0);
      wire::FrameReader reader(*in, cfg_, wire::Direction::kToSource);
      ReturnHandler handler(*source_, events_, *this, resync_, resync_local_fill_);
      if (!reader.run(handler)) {
        SessionEvent e;
        e.kind = SessionEvent::Kind::End;
        e.a = 1;  // closed without an END frame
        events_.push(std::move(e));
      }
    } catch (const std::exception& e) {
      events_.push(failed_event(e));
    }
    source_->scanner().wake();  // a pump waiting for requests must not wait on a dead channel
  });
}

void SourceSession::join_return_path() {
  if (return_thread_.joinable()) return_thread_.join();
  if (request_thread_.joinable()) request_thread_.join();
}

void SourceSession::interrupt() noexcept {
  interrupted_.store(true, std::memory_order_release);
  source_->scanner().wake();
}

// Pages are routed to channels by a fixed partition of the region (page p always travels on
// channel (p / kRoutePages) % N), never by which thread took them: the channels are not ordered
// with respect to each other, so two copies of a page on different channels could land stale-last.
// On one channel the writer's queue keeps the order, and a later copy is read from memory no
// earlier than an earlier one.
namespace {
constexpr std::uint64_t kRoutePages = 64;
}  // namespace

void SourceSession::send_source_pages(wire::FrameWriter& w, std::uint64_t first, std::uint64_t n,
                                      const std::uint8_t* base, std::size_t ps) {
  // Holes of another process's memfd go as ZERO runs without being read (a read would allocate
  // them in the process's memory); everything else is read, zero pages found by looking.
  for (std::uint64_t p = first, end = first + n; p < end;) {
    bool hole = false;
    const std::uint64_t k = source_->extent(p, end - p, hole);
    if (hole)
      w.send_zero(p, k);
    else
      w.send_pages(p, k, base + p * ps, /*detect_zero=*/true);
    p += k;
  }
}

void SourceSession::pump(std::span<wire::FrameWriter* const> writers, Clock::time_point deadline,
                         std::uint64_t max_pages, std::atomic<std::uint64_t>& budget_used) {
  constexpr std::size_t kBatchPages = 256;  // 1 MiB of 4 KiB pages per batch
  const std::size_t ps = source_->page_size();
  const std::uint64_t n = writers.size();
  std::uint8_t* base = source_->data();
  std::vector<PageRun> runs;
  std::vector<bool> touched(n);
  for (;;) {
    if (interrupted_.load(std::memory_order_acquire) || Clock::now() >= deadline) break;
    const std::uint64_t used = budget_used.fetch_add(kBatchPages, std::memory_order_relaxed);
    if (used >= max_pages) break;
    runs.clear();
    if (source_->scanner().next_batch(std::min<std::uint64_t>(kBatchPages, max_pages - used), runs) == 0) break;
    try {
      std::fill(touched.begin(), touched.end(), false);
      for (const PageRun& r : runs) {
        for (std::uint64_t p = r.first, end = r.first + r.npages; p < end;) {
          const std::uint64_t piece_end = std::min(end, (p / kRoutePages + 1) * kRoutePages);
          const std::uint64_t c = n == 1 ? 0 : (p / kRoutePages) % n;
          send_source_pages(*writers[c], p, piece_end - p, base, ps);
          touched[c] = true;
          p = piece_end;
        }
      }
      // Flush per batch so a failure can put back exactly the runs that may not have gone (rule 7).
      for (std::uint64_t c = 0; c < n; ++c)
        if (touched[c]) writers[c]->flush();
    } catch (...) {
      source_->scanner().send_failed(runs);
      throw;
    }
  }
}

SendStats SourceSession::precopy_pass(double max_seconds, std::uint64_t max_pages) {
  interrupted_.store(false, std::memory_order_release);
  const auto t0 = Clock::now();
  const auto deadline = t0 + to_ns(max_seconds);
  std::atomic<std::uint64_t> budget{0};
  std::vector<wire::FrameWriter*> writers{&main_};
  writers.insert(writers.end(), extras_.begin(), extras_.end());
  std::vector<wire::WireStats> before;
  for (auto* w : writers) before.push_back(w->stats());
  std::vector<std::exception_ptr> errors(writers.size());
  std::vector<std::thread> threads;
  // One pumping thread per channel; each routes its pages by the partition above.
  for (std::size_t i = 1; i < writers.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        pump(writers, deadline, max_pages, budget);
      } catch (...) {
        errors[i] = std::current_exception();
        interrupt();
      }
    });
  }
  try {
    pump(writers, deadline, max_pages, budget);
  } catch (...) {
    errors[0] = std::current_exception();
    interrupt();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  SendStats total;
  for (std::size_t i = 0; i < writers.size(); ++i) {
    const wire::WireStats after = writers[i]->stats();
    total.pages += after.pages - before[i].pages;
    total.zero_pages += after.zero_pages - before[i].zero_pages;
    total.bytes += after.bytes - before[i].bytes;
  }
  total.drained = source_->dirty()->none(0, source_->pages());
  total.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return total;
}

// With an urgent channel, requests are served on the return-path thread as they are read: the
// pages go out on the urgent socket at once, with no hand-off to another thread and never behind
// the background push, whose flush blocks while the main socket is full. The push and the return
// thread both take pages through the scanner, which test-and-clears each page's D bit once, so a
// page goes out once whichever takes it. Without an urgent channel, requests are queued and go
// first on main, between background batches.
void SourceSession::send_taken(wire::FrameWriter& w, std::span<const PageRun> runs) {
  // The destination places a frame once all of it arrived; a fault on a page the push already
  // took waits for the rest of that page's frame, so postcopy frames are kept to 64 KiB.
  constexpr std::uint64_t kFramePages = 16;
  const std::size_t ps = source_->page_size();
  std::uint8_t* base = source_->data();
  try {
    for (const PageRun& r : runs)
      for (std::uint64_t p = r.first, end = r.first + r.npages; p < end; p += kFramePages)
        send_source_pages(w, p, std::min(kFramePages, end - p), base, ps);
    w.flush();  // per batch, so a failure puts back exactly the runs that may not have gone
  } catch (...) {
    source_->scanner().send_failed(runs);  // rule 7
    throw;
  }
}

bool SourceSession::serve_request(std::uint64_t first, std::uint32_t n) {
  if (urgent_ == nullptr || !serving_.load(std::memory_order_acquire)) return false;
  std::lock_guard lk(urgent_mu_);
  if (!serving_.load(std::memory_order_relaxed)) return false;  // ended meanwhile: queue it
  PageScanner& scanner = source_->scanner();
  if (!scanner.take_request(first, n, served_runs_)) return true;  // outside the region: counted, dropped
  if (served_runs_.empty()) return true;                            // delivered already (rule 2)
  send_taken(*urgent_, served_runs_);
  for (const PageRun& r : served_runs_) urgent_served_.fetch_add(r.npages, std::memory_order_relaxed);
  return true;
}

void SourceSession::end_extras() {
  std::vector<wire::FrameWriter*> ended;
  ended.swap(extras_);  // passes from here on use main alone, even when an END below fails
  for (auto* w : ended) w->send_end();
}

void SourceSession::end_urgent() {
  if (urgent_ == nullptr) return;
  std::lock_guard lk(urgent_mu_);
  serving_.store(false, std::memory_order_release);
  urgent_ended_ = true;
  urgent_->send_end();
}

SendStats SourceSession::postcopy_push(double max_seconds) {
  interrupted_.store(false, std::memory_order_release);
  // Without an urgent channel a request waits for the batch being written to finish: 16 pages
  // (64 KiB) keep that wait short at some 30% of the push's bandwidth; with one, 64 pages.
  const std::size_t batch_pages = urgent_ != nullptr ? 64 : 16;
  const auto t0 = Clock::now();
  const auto deadline = t0 + to_ns(max_seconds);
  PageScanner& scanner = source_->scanner();
  if (urgent_ != nullptr) {
    std::lock_guard lk(urgent_mu_);
    if (!urgent_ended_) serving_.store(true, std::memory_order_release);
  }
  const wire::WireStats main0 = main_.stats();
  SendStats st;
  std::vector<PageRun> runs;
  while (!interrupted_.load(std::memory_order_acquire) && Clock::now() < deadline) {
    runs.clear();
    // Queued requests first (all of them without an urgent channel; with one, those that came
    // before the return thread began serving), then the background scan.
    if (scanner.next_batch(batch_pages, runs) == 0) {
      st.drained = source_->dirty()->none(0, source_->pages());
      if (st.drained) break;
      continue;
    }
    const bool urgent = runs.front().urgent();
    wire::FrameWriter& w = urgent && urgent_ != nullptr ? *urgent_ : main_;
    {
      std::unique_lock<std::mutex> lk;
      if (&w == urgent_) lk = std::unique_lock(urgent_mu_);  // beside serve_request and end_urgent
      send_taken(w, runs);
    }
    if (urgent)
      for (const PageRun& r : runs) st.urgent_pages += r.npages;
  }
  if (urgent_ != nullptr) {
    // A serve that took the last dirty pages (and so ended this push) counts them under the lock:
    // wait for it, so this push reports them.
    std::lock_guard lk(urgent_mu_);
  }
  // Served on the return thread since the last push returned (between pushes too).
  st.urgent_pages += urgent_served_.exchange(0, std::memory_order_relaxed);
  const wire::WireStats main1 = main_.stats();
  st.pages = main1.pages - main0.pages;
  st.zero_pages = main1.zero_pages - main0.zero_pages;
  st.bytes = main1.bytes - main0.bytes;
  if (urgent_ != nullptr) {  // everything since the last push returned (the return thread serves between pushes)
    const wire::WireStats urg1 = urgent_->stats();
    st.pages += urg1.pages - urgent_reported_.pages;
    st.zero_pages += urg1.zero_pages - urgent_reported_.zero_pages;
    st.bytes += urg1.bytes - urgent_reported_.bytes;
    urgent_reported_ = urg1;
  }
  st.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return st;
}

// ---- DestSession ----

// The fault thread's requests, as REQUEST frames on the return path (wire::RequestSender keeps
// the first failure and sends nothing after it); a failure is reported once as an event, and the
// guest's faulting threads then wait until the migration is recovered or torn down. Recovery
// rebinds it to a new return path; while unbound (paused) requests are not sent: the region keeps
// them in its requested bitmap and reattach() asks again.
class DestSession::WireRequestSink final : public RequestSink {
 public:
  explicit WireRequestSink(EventQueue& events) : events_(events) {}
  void request(std::uint64_t first_page, std::uint32_t npages) noexcept override {
    // The mutex keeps detach() from returning while a request is on its way to the old socket
    // (whose fd number may be reused by the next connection once closed).
    std::lock_guard lk(mu_);
    if (!sender_ || sender_->request(first_page, npages) || reported_) return;
    reported_ = true;
    try {
      SessionEvent e;
      e.kind = SessionEvent::Kind::Failed;
      e.a = channel_;
      e.text = "return path: " + sender_->error();
      events_.push(std::move(e));
    } catch (...) {  // out of memory: the failure stays visible through the channel readers
    }
  }
  /// Routes requests to `w` (nullptr: drop them), the socket of channel `channel` (its failure
  /// event names it). Waits for a request being sent.
  void bind(wire::FrameWriter* w, std::uint64_t channel) {
    std::unique_ptr<wire::RequestSender> next = w != nullptr ? std::make_unique<wire::RequestSender>(*w) : nullptr;
    std::lock_guard lk(mu_);
    sender_ = std::move(next);
    channel_ = channel;
    reported_ = false;
  }
  void unbind() noexcept {
    std::lock_guard lk(mu_);
    sender_.reset();
  }

 private:
  EventQueue& events_;
  std::mutex mu_;
  std::unique_ptr<wire::RequestSender> sender_;  // guarded by mu_
  std::uint64_t channel_ = wire::kMainChannel;   // guarded by mu_
  bool reported_ = false;                        // guarded by mu_
};

// One channel's frames into the region: while the region is in precopy, the wire's RegionReceiver
// reads pages straight into place; once postcopy started, its StagingReceiver hands them to the
// userfaultfd placement, which never places a page twice (rule 1). Control frames are ours.
class DestSession::ChannelHandler final : public wire::FrameHandler {
 public:
  ChannelHandler(DestSession& s, std::uint64_t index, bool is_extra)
      : s_(s),
        index_(index),
        is_extra_(is_extra),
        in_place_(s.region_->data(), s.region_->page_bytes(), *s.region_->received()),
        staged_(
            s.cfg_, [r = s.region_.get()](std::uint64_t first, std::uint32_t n, const std::uint8_t* data) {
              r->place(first, n, data);
            },
            [r = s.region_.get()](std::uint64_t first, std::uint32_t n) { r->place_zero(first, n); }) {}

  std::uint8_t* page_buffer(std::uint64_t first, std::uint32_t n) override {
    // The mode cannot change between a frame's buffer and its pages(): it changes only on the
    // main channel's own thread, at the postcopy command.
    return receiver().page_buffer(first, n);
  }
  void pages(std::uint64_t first, std::uint32_t n, const std::uint8_t* data) override {
    const bool in_place = s_.region_->state() == DestRegion::State::precopy;
    receiver().pages(first, n, data);
    if (in_place) s_.region_->wrote_in_place(first, n);  // digests (when kept), from warm cache
    s_.pages_received_.fetch_add(n, std::memory_order_relaxed);
  }
  void zero(std::uint64_t first, std::uint32_t n) override {
    const bool in_place = s_.region_->state() == DestRegion::State::precopy;
    receiver().zero(first, n);
    if (in_place) s_.region_->wrote_in_place(first, n);
    s_.pages_received_.fetch_add(n, std::memory_order_relaxed);
  }
  void discard(std::span<const wire::Range> ranges) override {
    control_frame();
    // Rule 3: discards come before the guest runs. Once it runs, a discard would drop what it wrote.
    if (s_.region_->state() != DestRegion::State::precopy)
      throw ProtocolError("DISCARD after postcopy started: the destination guest runs, its pages are its own");
    s_.region_->discard(ranges);
  }
  void local_fill(std::span<const wire::Range> ranges, std::uint32_t value) override {
    control_frame();
    s_.region_->set_local_fill(ranges, value);
  }
  void device_state(std::span<const std::uint8_t> blob) override {
    control_frame();
    SessionEvent e;
    e.kind = SessionEvent::Kind::DeviceState;
    e.data.assign(blob.begin(), blob.end());
    s_.events_.push(std::move(e));
  }
  void command(wire::Command cmd, std::span<const std::uint8_t> args) override {
    // POSTCOPY_NEXT comes at the start of a precopy round, while the extra channels still carry
    // pages: it waits for nothing (it bounds main's queue, which must happen before that round's
    // pages fill the window, not after the extras END). Every other command orders after them.
    if (cmd == wire::Command::kPostcopyNext && is_extra_) throw ProtocolError("control frame on an extra page channel");
    if (cmd != wire::Command::kPostcopyNext) control_frame();
    // Postcopy starts here, in stream order: every page before this frame was written in place,
    // every page after it is placed through userfaultfd.
    if (cmd == wire::Command::kPostcopyStart) s_.region_->start_postcopy();
    // The prefault ends where precopy does: at COMMAND 1 the pages it populated and that were not
    // received are made missing again (before the ack, so outside the downtime); at COMMAND 3
    // every page arrived and its threads only compete with the guest: they are told to end, not
    // waited for (this is inside the downtime; the region's stop() joins them).
    if (cmd == wire::Command::kSwitchover) s_.region_->settle_prefault();
    if (cmd == wire::Command::kComplete) s_.region_->stop_prefault();
    SessionEvent e;
    e.kind = SessionEvent::Kind::Command;
    e.a = static_cast<std::uint64_t>(cmd);
    e.data.assign(args.begin(), args.end());
    s_.events_.push(std::move(e));
  }
  void end() override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::End;
    e.a = index_;
    s_.events_.push(std::move(e));
  }
  void error(std::string_view message) override {
    SessionEvent e;
    e.kind = SessionEvent::Kind::PeerError;
    e.text = std::string(message);
    s_.events_.push(std::move(e));
  }

 private:
  wire::FrameHandler& receiver() {
    if (s_.region_->state() == DestRegion::State::precopy) return in_place_;
    return staged_;
  }
  // Control frames come on the main channel only, after the extra page channels ended.
  void control_frame() {
    if (is_extra_) throw ProtocolError("control frame on an extra page channel");
    s_.wait_extras_done();
  }

  DestSession& s_;
  std::uint64_t index_;
  bool is_extra_;
  wire::RegionReceiver in_place_;
  wire::StagingReceiver staged_;
};

DestSession::DestSession(std::shared_ptr<DestRegion> region, int main_fd, std::vector<int> extra_fds, int urgent_fd,
                         wire::FrameWriter& return_path, const wire::WireConfig& cfg)
    : region_(std::move(region)), main_fd_(main_fd), extra_fds_(std::move(extra_fds)), urgent_fd_(urgent_fd),
      return_path_(&return_path), cfg_(cfg), sink_(std::make_shared<WireRequestSink>(events_)) {
  if (!region_) throw std::invalid_argument("DestSession needs a region");
  if (cfg_.region_pages != region_->pages())
    throw std::invalid_argument("the wire config's region (" + std::to_string(cfg_.region_pages) +
                                " pages) is not the destination's (" + std::to_string(region_->pages()) + " pages)");
}

DestSession::~DestSession() { join(); }

void DestSession::read_through(wire::InputOpener open) {
  for (auto& t : threads_)
    if (t.joinable()) throw std::logic_error("read_through: join() the readers first");
  open_ = std::move(open);
}

void DestSession::send_requests_on(wire::FrameWriter* w) {
  if (!threads_.empty()) throw std::logic_error("send_requests_on: the session already started");
  request_path_ = w;
}

void DestSession::start() {
  if (!threads_.empty()) throw std::logic_error("the session already started");
  if (request_path_ != nullptr)
    sink_->bind(request_path_, wire::kUrgentChannel);
  else
    sink_->bind(return_path_, wire::kMainChannel);
  region_->set_request_sink(sink_);
  start_readers();
}

void DestSession::detach() noexcept { sink_->unbind(); }

void DestSession::reattach(int main_fd, std::vector<int> extra_fds, int urgent_fd, wire::FrameWriter& return_path,
                           bool resync) {
  for (auto& t : threads_)
    if (t.joinable()) throw std::logic_error("reattach: join() the old connection's readers first");
  if (return_path.config().region_pages != cfg_.region_pages)
    throw std::invalid_argument("reattach: the new return path's region differs from the session's");
  threads_.clear();
  main_fd_ = main_fd;
  extra_fds_ = std::move(extra_fds);
  urgent_fd_ = urgent_fd;
  return_path_ = &return_path;
  request_path_ = nullptr;
  if (!resync) {
    start_readers();
    return;
  }
  // The bitmap first: the source resyncs on it before it reads any request that follows.
  return_path.send_received_bitmap(*region_->received());
  sink_->bind(&return_path, wire::kMainChannel);
  // Faults taken while paused were marked requested but not sent: ask again (a request the source
  // also got before the break is served once; placement drops a duplicate, rule 1).
  const PageBitmap& requested = *region_->requested();
  const PageBitmap& received = *region_->received();
  requested.for_each_run(0, requested.size(), [&](std::size_t first, std::size_t n) {
    for (std::size_t p = first; p < first + n; ++p)
      if (!received.test(p)) sink_->request(p, 1);
  });
  start_readers();
}

void DestSession::start_readers() {
  extras_active_ = extra_fds_.size();
  threads_.emplace_back([this] { read_channel(main_fd_, 0, false); });
  if (urgent_fd_ >= 0) threads_.emplace_back([this] { read_channel(urgent_fd_, 1, false); });
  for (std::size_t i = 0; i < extra_fds_.size(); ++i)
    threads_.emplace_back([this, i] { read_channel(extra_fds_[i], 2 + i, true); });
}

void DestSession::read_channel(int fd, std::uint64_t index, bool is_extra) noexcept {
  try {
    // No read timeout: in postcopy a channel may be quiet for long; the orchestrator ends a
    // session by shutting its sockets down.
    const auto in = wire::open_input(open_, fd, 0);
    wire::FrameReader reader(*in, cfg_, wire::Direction::kToDestination);
    ChannelHandler handler(*this, index, is_extra);
    if (!reader.run(handler)) {
      SessionEvent e;
      e.kind = SessionEvent::Kind::Failed;
      e.a = index;
      e.text = "channel " + std::to_string(index) + " closed without an END frame";
      events_.push(std::move(e));
    }
  } catch (const std::exception& e) {
    SessionEvent ev = failed_event(e);
    ev.a = index;
    events_.push(std::move(ev));
  }
  if (is_extra) extra_done();
}

void DestSession::extra_done() noexcept {
  {
    std::lock_guard lk(extras_mu_);
    --extras_active_;
  }
  extras_cv_.notify_all();
}

void DestSession::wait_extras_done() {
  std::unique_lock lk(extras_mu_);
  extras_cv_.wait(lk, [&] { return extras_active_ == 0; });
}

std::optional<SessionEvent> DestSession::wait_event(double timeout_s) {
  const double s = timeout_s <= 0 ? 0 : (timeout_s > 1e6 ? 1e6 : timeout_s);
  return events_.wait(std::chrono::nanoseconds(static_cast<std::int64_t>(s * 1e9)));
}

void DestSession::join() {
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

}  // namespace livemig
