// livemig's side of the attach protocol (docs/attach.md): accepting a workload process's HELLO and
// descriptors, validating every one of them, and the control conversation with bounded waits.
// The constants live in livemig_attach_protocol.h (shared with the C client library).
//
// Threads: a Connection is used by one thread at a time (the orchestrator's); nothing here starts
// threads. Descriptors: every descriptor received is owned by a UniqueFd from the moment it
// arrives, so every error path closes it.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <vector>

#include "livemig/base/errors.hpp"
#include "livemig/base/fd.hpp"
#include "livemig/base/page_range.hpp"
#include "livemig_attach_protocol.h"

namespace livemig::attach {

/// A descriptor the process sent is of the wrong kind, size, features or owner; the message names
/// the descriptor, what was expected and what was found.
class DescriptorError : public ProtocolError {
 public:
  using ProtocolError::ProtocolError;
};

enum class Role : std::uint8_t { Source = LIVEMIG_ATTACH_ROLE_SOURCE, Destination = LIVEMIG_ATTACH_ROLE_DESTINATION };

/// "source" or "destination".
const char* role_name(Role r) noexcept;

/// What the process announced in HELLO.
struct Layout {
  Role role = Role::Source;
  std::uint16_t min_version = 1, max_version = 1;
  std::uint32_t page_size = 0;
  std::uint64_t addr = 0;          ///< the region's address in the process
  std::uint64_t len = 0;           ///< bytes
  std::uint64_t memfd_offset = 0;  ///< the region's offset in the memfd
  std::uint64_t capabilities = 0;
  std::uint64_t uffd_features = 0; ///< as the process says it negotiated them
  std::uint32_t poison = 0;
  std::string name;
  std::uint64_t pages() const noexcept { return page_size ? len / page_size : 0; }
};

/// What livemig offers and accepts.
struct AcceptOptions {
  std::uint64_t capabilities = LIVEMIG_ATTACH_CAP_HINTS | LIVEMIG_ATTACH_CAP_CHECK;
  double timeout_s = 5;             ///< the whole handshake, and each request's default bound
  int expect_role = 0;              ///< 0: any; else LIVEMIG_ATTACH_ROLE_*: the other role is refused
  std::uint64_t expect_len = 0;     ///< 0: any; else the region must have exactly this many bytes
  std::uint64_t max_len = 0;        ///< 0: no limit; else a larger region is refused
};

/// A REPLY from the process.
struct Reply {
  std::uint16_t request = 0;        ///< the request type it answers
  std::uint32_t status = 0;         ///< 0 ok, else a positive errno value
  std::string text;
  std::vector<std::uint8_t> payload;
  bool ok() const noexcept { return status == 0; }
};

/// A message the process sent on its own (HINTS, RESUMED), in arrival order.
struct Event {
  std::uint16_t type = 0;
  std::uint32_t id = 0;             ///< HINTS: the balloon command id
  std::uint32_t flags = 0;          ///< HINTS: LIVEMIG_ATTACH_HINT_*
  std::vector<PageRange> ranges;    ///< HINTS: validated, inside the region
};

/// The result of a CHECK.
struct CheckResult {
  std::uint64_t items = 0, failures = 0;
  std::string text;
};

/// One accepted attachment.
class Connection {
 public:
  /// Reads HELLO and its three descriptors from `sock` (a connected AF_UNIX stream socket; owned),
  /// validates the layout and every descriptor (docs/attach.md "What livemig validates") and
  /// answers WELCOME, all within opts.timeout_s. On failure sends ERROR naming the problem (best
  /// effort), closes everything it received and throws: DescriptorError for a descriptor,
  /// ProtocolError for a message or layout, ConnectionLost for a silent or vanished process.
  static Connection accept(UniqueFd sock, const AcceptOptions& opts = {});

  /// An unconnected Connection: every request throws ConnectionLost.
  Connection() = default;
  Connection(Connection&&) noexcept = default;
  Connection& operator=(Connection&&) noexcept = default;

  const Layout& layout() const noexcept { return layout_; }
  /// The process (kernel-checked SCM_CREDENTIALS of HELLO; owner of the pagemap and the mapping).
  pid_t pid() const noexcept { return pid_; }
  /// Who connected (SO_PEERCRED); differs from pid() only for a socket handed on to the process.
  pid_t peer_pid() const noexcept { return peer_pid_; }
  std::uint64_t capabilities() const noexcept { return caps_; }
  /// The features enabled on the received uffd (read from its fdinfo).
  std::uint64_t uffd_features() const noexcept { return uffd_features_; }
  int memfd() const noexcept { return memfd_.get(); }
  int uffd() const noexcept { return uffd_.get(); }
  int pagemap() const noexcept { return pagemap_.get(); }
  int socket() const noexcept { return sock_.get(); }
  /// The memfd's name as /proc shows it, e.g. "/memfd:vm (deleted)".
  const std::string& memfd_path() const noexcept { return memfd_path_; }

  /// Maps the region's part of the memfd into livemig: read-only for a source (livemig never
  /// writes a source's memory), read-write for a destination. Throws KernelError("mmap").
  Mapping map_region() const;

  // ---- requests: each waits for its REPLY within `timeout_s` (< 0: the accept timeout) ----
  /// Sends request `type` with `body` and returns its REPLY. One-way messages that arrive first are
  /// kept for next_event(). Throws ConnectionLost (closed, silent past the bound, or detached),
  /// ProtocolError (a malformed message: ERROR is sent, the connection closed).
  Reply request(std::uint16_t type, std::span<const std::uint8_t> body = {}, double timeout_s = -1);
  Reply pause(std::uint32_t lease_ms, double timeout_s = -1);
  Reply resume(double timeout_s = -1);
  /// The state bytes; throws ProtocolError when the process refused (its status and text).
  std::vector<std::uint8_t> save_state(double timeout_s = -1);
  Reply load_state(std::span<const std::uint8_t> state, double timeout_s = -1);
  CheckResult check(double timeout_s = -1);
  Reply handoff(double timeout_s = -1);
  Reply complete(double timeout_s = -1);
  /// DETACH and its reply, then closes the socket (the process restores its memory).
  void detach(double timeout_s = -1);

  /// BALLOON (one-way): the command id livemig's balloon device shows.
  void balloon(std::uint32_t cmd_id);
  /// The next one-way message, waiting up to `timeout_s` (0: only what has arrived); false when
  /// none came. Throws like request().
  bool next_event(Event& out, double timeout_s);

  /// Sends `bytes` as they are (tests of malformed input).
  void send_raw(std::span<const std::uint8_t> bytes);
  /// Closes the socket (the process sees livemig gone).
  void close() noexcept;
  /// close(), and the process's descriptors too (memfd, userfaultfd, pagemap): the attachment is
  /// over. Mappings made by map_region() stay valid (they hold the memfd's memory themselves).
  void release() noexcept;

 private:
  struct Header {
    std::uint32_t magic;
    std::uint16_t version, type;
    std::uint32_t tag, length;
  };
  void send(std::uint16_t type, std::uint32_t tag, std::span<const std::uint8_t> a,
            std::span<const std::uint8_t> b = {});
  // Reads and validates one message from the process by `deadline` (steady clock, ns); false on
  // timeout when `may_time_out`, else ConnectionLost.
  bool read_message(Header& h, std::vector<std::uint8_t>& body, std::int64_t deadline_ns);
  [[noreturn]] void fail_protocol(const std::string& what);
  Event parse_hints(const std::vector<std::uint8_t>& body);

  Layout layout_;
  pid_t pid_ = 0, peer_pid_ = 0;
  std::uint64_t caps_ = 0, uffd_features_ = 0;
  std::uint16_t version_ = LIVEMIG_ATTACH_VERSION;
  std::uint32_t next_tag_ = 1;
  double timeout_s_ = 5;
  std::string memfd_path_;
  UniqueFd sock_, memfd_, uffd_, pagemap_;
  std::deque<Event> events_;
};

/// The userfaultfd features enabled on `uffd` (any process's), from /proc/self/fdinfo: bit 31
/// (UFFD_FEATURE_INITIALIZED, the kernel's own) is set once UFFDIO_API ran. Throws DescriptorError
/// when `uffd` is not a userfaultfd.
std::uint64_t uffd_fd_features(int uffd);

/// Pages of [offset, offset + len) of a shmem file that are holes (SEEK_HOLE/SEEK_DATA): what a
/// MISSING-registered mapping of them would fault on.
std::uint64_t count_holes(int memfd, std::uint64_t offset, std::uint64_t len, std::uint64_t page_size);

}  // namespace livemig::attach
