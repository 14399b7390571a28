// A migration's page movement on each side, joining the engines to the wire: the source pumps
// dirty pages into frame writers and serves requests arriving on the return path; the destination
// reads every channel into its region (straight in during precopy, through userfaultfd placement
// during postcopy) and sends the fault thread's requests back. All of it runs on C++ threads that
// never need the GIL; the orchestrator (Python) waits for events and decides.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "livemig/dest/region.hpp"
#include "livemig/source/source.hpp"
#include "livemig/wire/stream.hpp"

namespace livemig {

/// Something the peer said that the orchestrator acts on.
struct SessionEvent {
  enum class Kind : std::uint8_t {
    DeviceState,     ///< data: the blob (destination)
    Command,         ///< a: the command number, data: its arguments (destination)
    End,             ///< a: the channel index that ended (both)
    Ack,             ///< a: kind, b: value (source)
    ReceivedBitmap,  ///< data: the bitmap bytes; with resync on: a pages made dirty again, b 1 (source)
    Report,          ///< data: the destination's report blob (source)
    PeerError,       ///< text: the peer's error message (both)
    Failed,          ///< text: a channel failed locally (protocol error, connection lost) (both)
  };
  Kind kind = Kind::End;
  std::uint64_t a = 0;
  std::uint64_t b = 0;
  std::vector<std::uint8_t> data;
  std::string text;
  /// When it was queued: steady_clock (CLOCK_MONOTONIC) seconds, comparable with Python's
  /// time.perf_counter(); lets the orchestrator time an ack it reads later.
  double at = 0;
};

/// A blocking multi-producer queue of events. Thread-safe.
class EventQueue {
 public:
  /// Appends an event and wakes a waiter.
  void push(SessionEvent e);
  /// The oldest event, waiting up to `timeout`; nullopt when none came in time.
  std::optional<SessionEvent> wait(std::chrono::nanoseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<SessionEvent> q_;
};

/// What a send pass moved.
struct SendStats {
  std::uint64_t pages = 0;       ///< pages sent with data
  std::uint64_t zero_pages = 0;  ///< pages sent as zero runs (header only)
  std::uint64_t urgent_pages = 0;
  std::uint64_t bytes = 0;       ///< bytes on the wire, headers included
  double seconds = 0;
  bool drained = false;  ///< no dirty page was left when the pass ended
};

/// The source's side: pumps pages and reads the return path. The writers must outlive it.
class SourceSession {
 public:
  /// `main` carries pages and commands; `extras` are extra page channels for precopy; `urgent`
  /// (may be null) carries requested pages in postcopy; `return_fd` is the socket the destination's
  /// return-path frames arrive on (the main socket's other direction).
  SourceSession(std::shared_ptr<Source> source, wire::FrameWriter& main, std::vector<wire::FrameWriter*> extras,
                wire::FrameWriter* urgent, int return_fd, const wire::WireConfig& cfg);
  SourceSession(const SourceSession&) = delete;
  SourceSession& operator=(const SourceSession&) = delete;
  /// Stops the pumps and joins the return-path thread (the caller shuts the socket down first).
  ~SourceSession();

  /// Recovery (a resumed connection): a RECEIVED_BITMAP on this session's return path resyncs the
  /// source at once, before any later frame is read (Source::resync_with_received: pages not
  /// received, and with `local_fill` not filled by the destination itself, become dirty and unsent
  /// again), so no request that follows it is judged on the stale bits. Call before start_return_path.
  void resync_on_received_bitmap(bool local_fill);
  /// Reads the return path through `open` (e.g. wire::tls_input_opener) instead of the bare
  /// socket. Call before start_return_path.
  void read_through(wire::InputOpener open);
  /// Also reads requests from `fd` (the urgent channel's socket, whose other direction the
  /// destination sends them on: capability urgent-requests), on a thread of its own that serves
  /// them as it reads them, away from the main socket the background push keeps busy. Call before
  /// start_return_path; it starts with it.
  void read_requests_on(int fd);
  /// Starts the thread that reads the return path: requests go to the scanner, the rest to events.
  void start_return_path();
  /// Sends dirty pages on the main and extra channels (one thread each) until none is left, or
  /// `max_seconds` passed, or `max_pages` were taken. Taken bits go back on failure (rule 7), then
  /// the first error is rethrown.
  SendStats precopy_pass(double max_seconds, std::uint64_t max_pages);
  /// Postcopy: the background scan on main until no dirty page is left (drained) or `max_seconds`
  /// passed; requests meanwhile on the urgent channel from a thread of their own (or, without one,
  /// first on main between background batches).
  SendStats postcopy_push(double max_seconds);
  /// END on every extra page channel; later passes use main alone. Not concurrent with a pass.
  void end_extras();
  /// Ends the urgent channel (END frame) once no request is being served on it; requests after this
  /// are queued and never served there. Call when the push drained and the destination runs.
  void end_urgent();
  /// Makes a running pass return soon (from any thread).
  void interrupt() noexcept;
  /// The next event from the return path, waiting up to `timeout_s`.
  std::optional<SessionEvent> wait_event(double timeout_s) { return events_.wait(to_ns(timeout_s)); }
  /// Joins the return-path threads (after the sockets were shut down or the peer ended them).
  void join_return_path();

 private:
  class ReturnHandler;
  static std::chrono::nanoseconds to_ns(double s);
  // On the return-path thread: sends a request's pages on the urgent channel at once; false when
  // not serving (no urgent channel, postcopy not started, or the channel ended): queue it instead.
  bool serve_request(std::uint64_t first, std::uint32_t n);
  // Sends pages the scanner took on `w` and flushes; on failure puts them back (rule 7), rethrows.
  void send_taken(wire::FrameWriter& w, std::span<const PageRun> runs);
  // Pages [first, first + n) read at `base`, or as ZERO runs where the source's file has holes.
  void send_source_pages(wire::FrameWriter& w, std::uint64_t first, std::uint64_t n, const std::uint8_t* base,
                         std::size_t ps);
  void pump(std::span<wire::FrameWriter* const> writers, std::chrono::steady_clock::time_point deadline,
            std::uint64_t max_pages, std::atomic<std::uint64_t>& budget_used);

  std::shared_ptr<Source> source_;
  wire::FrameWriter& main_;
  std::vector<wire::FrameWriter*> extras_;
  wire::FrameWriter* urgent_;
  int return_fd_;
  wire::InputOpener open_;  // set before the return thread starts (its creation orders it)
  wire::WireConfig cfg_;
  EventQueue events_;
  std::thread return_thread_;
  int request_fd_ = -1;         // read_requests_on (set before the threads start)
  std::thread request_thread_;  // reads request_fd_
  std::atomic<bool> interrupted_{false};
  // Requests served on the return-path thread (see serve_request). urgent_mu_ orders every send on
  // the urgent channel and its END; serving_ is also read without it as a fast "no".
  std::mutex urgent_mu_;
  std::atomic<bool> serving_{false};
  bool urgent_ended_ = false;           // guarded by urgent_mu_
  std::vector<PageRun> served_runs_;    // guarded by urgent_mu_
  std::atomic<std::uint64_t> urgent_served_{0};  // pages, since the last push returned
  wire::WireStats urgent_reported_;             // the urgent writer's stats at the last push's return
  // Set before the return thread starts (its creation orders them); read only by that thread.
  bool resync_ = false;
  bool resync_local_fill_ = false;
};

/// The destination's side: one reader thread per channel into the region; the region's fault
/// thread asks for pages through the return-path writer. The writer must outlive it.
class DestSession {
 public:
  DestSession(std::shared_ptr<DestRegion> region, int main_fd, std::vector<int> extra_fds, int urgent_fd,
              wire::FrameWriter& return_path, const wire::WireConfig& cfg);
  DestSession(const DestSession&) = delete;
  DestSession& operator=(const DestSession&) = delete;
  /// Joins the reader threads (the caller shuts the sockets down first).
  ~DestSession();

  /// Reads the channels' sockets through `open` (e.g. wire::tls_input_opener over this
  /// connection's TLS channels) instead of the bare sockets. Call before start(), and again with
  /// the new connection's channels before reattach(), never while readers run.
  void read_through(wire::InputOpener open);
  /// Sends the fault thread's requests on `w` (the urgent channel's writer: capability
  /// urgent-requests) instead of the return path, so they never wait for the main socket, which
  /// the main channel's reader keeps busy. Call before start(); reattach() goes back to the
  /// return path (a resumed connection's requests must follow its received bitmap on main).
  void send_requests_on(wire::FrameWriter* w);
  /// Installs the request sink and starts the reader threads.
  void start();
  /// Recovery, when the connection broke in postcopy: from now on the fault thread's requests are
  /// not sent (the region keeps them in its requested bitmap; the guest's faulting threads wait).
  /// Returns once no request is being sent on the old return path (shut the old sockets down
  /// first, so a send blocked on a stalled peer fails at once); then join() and close them. Any
  /// thread.
  void detach() noexcept;
  /// Recovery: continues over a new connection after detach() and join(): with `resync`, sends the
  /// received bitmap on `return_path` (nothing is placed meanwhile but local fills, which the
  /// source never resends), then routes requests there and asks again for every page requested
  /// and not yet received; then starts readers on the new sockets. Without `resync` (a completed
  /// migration whose report is resent) it only starts the readers. The writer must outlive the session.
  void reattach(int main_fd, std::vector<int> extra_fds, int urgent_fd, wire::FrameWriter& return_path,
                bool resync = true);
  /// The next event, waiting up to `timeout_s`.
  std::optional<SessionEvent> wait_event(double timeout_s);
  /// Joins every reader thread.
  void join();
  /// Pages read per channel kind so far: (precopy pages written in place, postcopy pages placed).
  std::uint64_t pages_received() const noexcept { return pages_received_.load(std::memory_order_relaxed); }

 private:
  class ChannelHandler;
  class WireRequestSink;
  void read_channel(int fd, std::uint64_t index, bool is_extra) noexcept;
  void start_readers();
  void extra_done() noexcept;
  void wait_extras_done();

  std::shared_ptr<DestRegion> region_;
  int main_fd_;
  std::vector<int> extra_fds_;
  int urgent_fd_;
  wire::InputOpener open_;  // set while no reader runs (thread creation orders it)
  wire::FrameWriter* return_path_;
  wire::FrameWriter* request_path_ = nullptr;  // send_requests_on; null: the return path
  wire::WireConfig cfg_;
  EventQueue events_;
  std::shared_ptr<WireRequestSink> sink_;
  std::vector<std::thread> threads_;
  std::mutex extras_mu_;
  std::condition_variable extras_cv_;
  std::size_t extras_active_ = 0;
  std::atomic<std::uint64_t> pages_received_{0};
};

}  // namespace livemig
