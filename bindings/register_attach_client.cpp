// The workload process's side of the attach protocol for Python programs (livemig.attach.client):
// the C client library livemig_attach over a Python buffer (a MAP_SHARED mapping of the program's
// memfd), its callbacks forwarded to a Python handler object. The callbacks run on the library's
// serving thread and take the GIL there: this is the attached program's thread, never livemig's
// (livemig resolves the program's faults in its own process, without this thread).
#include <livemig_attach.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "convert.hpp"
#include "livemig/base/errors.hpp"
#include "register.hpp"

namespace livemig::py_bindings {

namespace {

/// What the library restored when the attachment ended (struct livemig_attach_lost).
struct AttachLost {
  std::string role;
  int error = 0;
  std::string why;
  bool paused = false, handed_off = false, resumed = false, complete = false, registered = false;
  std::uint64_t missing_pages = 0;
};

// The library's negative errno (message in livemig_attach_error, per thread) as livemig's exception.
[[noreturn]] void raise_attach(int rc, const std::string& step, const std::string& msg) {
  const int err = -rc;
  switch (err) {
    case ECONNREFUSED:
    case ENOENT:
    case ECONNRESET:
    case ECONNABORTED:
    case EPIPE:
    case ETIMEDOUT:
    case ENOTCONN:
      throw ConnectionLost(step + ": " + msg);
    case EPROTO:
      throw ProtocolError(step + ": " + msg);
    case EOPNOTSUPP:
      throw UnsupportedError("userfaultfd", step + ": " + msg);
    default:
      throw KernelError(err, step, msg);
  }
}

class AttachClient {
 public:
  AttachClient(py::handle buffer, int memfd, std::uint64_t memfd_offset, const std::string& role,
               std::string name, bool check, int io_timeout_ms, py::object handler)
      : region_(BufferExport::shared(buffer, BufferExport::Access::write, "the region")),
        handler_(std::move(handler)),
        name_(std::move(name)) {
    if (role != "source" && role != "destination")
      throw py::value_error("role must be 'source' or 'destination', got '" + role + "'");
    ops_.pause = &on_pause;
    ops_.resume = &on_resume;
    ops_.save_state = &on_save;
    ops_.load_state = &on_load;
    ops_.check = check ? &on_check : nullptr;
    ops_.lost = &on_lost;
    livemig_attach_config cfg;
    livemig_attach_config_init(&cfg);
    cfg.role = role == "source" ? LIVEMIG_ATTACH_SOURCE : LIVEMIG_ATTACH_DESTINATION;
    cfg.len = region_->size();
    cfg.name = name_.c_str();
    cfg.memfd = memfd;
    cfg.addr = region_->data();
    cfg.memfd_offset = memfd_offset;
    cfg.capabilities = check ? LIVEMIG_ATTACH_CAP_CHECK : 0;
    cfg.io_timeout_ms = io_timeout_ms;
    cfg.ops = &ops_;
    cfg.user = this;
    const int rc = livemig_attach_create(&cfg, &a_);
    if (rc != 0) raise_attach(rc, "create", livemig_attach_error(nullptr));
  }
  AttachClient(const AttachClient&) = delete;
  AttachClient& operator=(const AttachClient&) = delete;
  ~AttachClient() { close(); }

  /// HELLO with the descriptors, WELCOME (bounded), then serving from the library's thread.
  void connect(const std::string& path) {
    int rc = 0;
    std::string msg;
    {
      py::gil_scoped_release rel;
      rc = livemig_attach_connect(need(), path.c_str());
      if (rc == 0) rc = livemig_attach_start(a_);
      if (rc != 0) msg = livemig_attach_error(a_);
    }
    if (rc != 0) raise_attach(rc, "attach to livemig at " + path, msg);
  }

  /// DETACH and restore; the callbacks are done when it returns.
  void detach() { call_released("detach", [this] { return livemig_attach_detach(need()); }); }
  /// A destination that lost livemig with pages missing gives them up (they read as zero).
  void release() { call_released("release", [this] { return livemig_attach_release(need()); }); }
  /// A completed destination becomes a source for the next migration.
  void become_source() {
    call_released("become_source", [this] { return livemig_attach_become_source(need()); });
  }

  /// Detaches, closes the userfaultfd and socket; the region's buffer is let go. Idempotent.
  void close() {
    if (a_ == nullptr) return;
    livemig_attach* a = a_;
    {
      // The serving thread may be waiting for the GIL inside a callback: let it finish.
      py::gil_scoped_release rel;
      livemig_attach_destroy(a);
    }
    a_ = nullptr;
    region_.reset();
  }

  bool closed() const noexcept { return a_ == nullptr; }
  std::uint64_t capabilities() const { return a_ == nullptr ? 0 : livemig_attach_capabilities(a_); }
  std::size_t nbytes() const { return a_ == nullptr ? 0 : livemig_attach_len(a_); }

 private:
  livemig_attach* need() const {
    if (a_ == nullptr) throw py::value_error("the attach client is closed");
    return a_;
  }
  template <class Fn>
  void call_released(const char* step, Fn fn) {
    int rc = 0;
    std::string msg;
    {
      py::gil_scoped_release rel;
      rc = fn();
      if (rc != 0) msg = livemig_attach_error(a_);
    }
    if (rc != 0) raise_attach(rc, step, msg);
  }

  // Runs a handler method with the GIL; a Python exception becomes -EIO (its text on stderr).
  template <class Fn>
  static int with_handler(void* user, Fn fn) noexcept {
    if (Py_IsInitialized() == 0) return -ESHUTDOWN;
    py::gil_scoped_acquire gil;
    try {
      return fn(static_cast<AttachClient*>(user)->handler_);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("livemig.attach.client callback");
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      PyErr_WriteUnraisable(nullptr);
    }
    return -EIO;
  }
  static int on_pause(void* user) {
    return with_handler(user, [](py::object& h) { return h.attr("pause")().cast<int>(); });
  }
  static int on_resume(void* user) {
    return with_handler(user, [](py::object& h) { return h.attr("resume")().cast<int>(); });
  }
  static int on_save(void* user, void** state, std::size_t* len) {
    return with_handler(user, [&](py::object& h) {
      const std::string s = h.attr("save_state")().cast<py::bytes>();
      void* buf = std::malloc(s.empty() ? 1 : s.size());
      if (buf == nullptr) return -ENOMEM;
      std::memcpy(buf, s.data(), s.size());
      *state = buf;  // the library free()s it
      *len = s.size();
      return 0;
    });
  }
  static int on_load(void* user, const void* state, std::size_t len) {
    return with_handler(user, [&](py::object& h) {
      return h.attr("load_state")(py::bytes(static_cast<const char*>(state), len)).cast<int>();
    });
  }
  static int on_check(void* user, std::uint64_t* items, std::uint64_t* failures, char* text, std::size_t size) {
    return with_handler(user, [&](py::object& h) {
      const auto r = h.attr("check")().cast<py::tuple>();
      *items = r[0].cast<std::uint64_t>();
      *failures = r[1].cast<std::uint64_t>();
      const std::string t = r[2].cast<std::string>();
      std::snprintf(text, size, "%s", t.c_str());
      return 0;
    });
  }
  static void on_lost(void* user, const livemig_attach_lost* info) {
    (void)with_handler(user, [&](py::object& h) {
      AttachLost l;
      l.role = info->role == LIVEMIG_ATTACH_SOURCE ? "source" : "destination";
      l.error = info->error;
      l.why = info->why != nullptr ? info->why : "";
      l.paused = info->paused != 0;
      l.handed_off = info->handed_off != 0;
      l.resumed = info->resumed != 0;
      l.complete = info->complete != 0;
      l.registered = info->registered != 0;
      l.missing_pages = info->missing_pages;
      h.attr("lost")(l);
      return 0;
    });
  }

  std::shared_ptr<BufferExport> region_;  // exported while the library may use the memory
  py::object handler_;
  std::string name_;
  livemig_attach_ops ops_{};
  livemig_attach* a_ = nullptr;
};

}  // namespace

void register_attach_client(py::module_& m) {
  py::class_<AttachLost>(m, "AttachLost", "What the attach library restored when the attachment ended.")
      .def_readonly("role", &AttachLost::role)
      .def_readonly("error", &AttachLost::error, "0: a clean DETACH; else a positive errno value.")
      .def_readonly("why", &AttachLost::why)
      .def_readonly("paused", &AttachLost::paused, "The workload is paused now.")
      .def_readonly("handed_off", &AttachLost::handed_off, "Source: the workload may run elsewhere: it stays paused.")
      .def_readonly("resumed", &AttachLost::resumed, "The library resumed the workload.")
      .def_readonly("complete", &AttachLost::complete, "Destination: every page had arrived.")
      .def_readonly("registered", &AttachLost::registered, "Destination: missing pages still wait for livemig.")
      .def_readonly("missing_pages", &AttachLost::missing_pages);
  py::class_<AttachClient>(m, "AttachClient",
                           "The process's side of one attachment (the C library livemig_attach); callbacks go to "
                           "`handler`'s pause, resume, save_state, load_state, check and lost.")
      .def(py::init<py::handle, int, std::uint64_t, const std::string&, std::string, bool, int, py::object>(),
           py::arg("buffer"), py::arg("memfd"), py::arg("memfd_offset"), py::arg("role"), py::arg("name"),
           py::arg("check"), py::arg("io_timeout_ms"), py::arg("handler"),
           "The region: `buffer`, the program's MAP_SHARED mapping of `memfd` at `memfd_offset` (kept exported).")
      .def("connect", &AttachClient::connect, py::arg("path"),
           "Attaches to livemig at the Unix socket `path` and serves it from a library thread. ConnectionLost, "
           "ProtocolError or KernelError naming the step (livemig's refusal text included).")
      .def("detach", &AttachClient::detach, "DETACH and restore the memory (a no-op when not attached).")
      .def("release", &AttachClient::release, "A destination that lost livemig gives up its missing pages.")
      .def("become_source", &AttachClient::become_source, "A completed destination becomes a source.")
      .def("close", &AttachClient::close, "Detaches and frees the attachment; idempotent.")
      .def_property_readonly("closed", &AttachClient::closed)
      .def_property_readonly("capabilities", &AttachClient::capabilities, "What both sides announced.")
      .def_property_readonly("nbytes", &AttachClient::nbytes);
}

}  // namespace livemig::py_bindings
