// Attach bindings (docs/attach.md): livemig's side of an attachment (AttachConnection), livemig's
// mapping of the process's memfd (AttachMapping, a buffer), and the engines over another process's
// memory (Source.attached, DestRegion.attached). The Connection is used by one thread at a time:
// the Python workload serialises its calls. Requests and waits release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "convert.hpp"
#include "livemig/attach/peer.hpp"
#include "livemig/balloon/device.hpp"
#include "livemig/base/digest.hpp"
#include "livemig/base/holes.hpp"
#include "livemig/dest/region.hpp"
#include "livemig/source/source.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using attach::Connection;

// livemig's mapping of the region's part of the process's memfd (read-only for a source).
struct AttachMapping {
  Mapping map;
  bool writable = false;
};

struct PyAttachEvent {
  std::string type;  // "hints" or "resumed"
  std::uint32_t cmd_id = 0;
  std::uint32_t flags = 0;
  py::array_t<std::uint64_t> ranges;
};

struct PyReply {
  std::uint32_t status = 0;
  std::string text;
};

PyReply reply(const attach::Reply& r) { return PyReply{r.status, r.text}; }

RemoteMemory remote_of(const Connection& c) {
  RemoteMemory m;
  m.addr = c.layout().addr;
  m.uffd = c.uffd();
  m.uffd_features = c.uffd_features();
  m.pagemap = c.pagemap();
  m.memfd = c.memfd();
  m.memfd_offset = c.layout().memfd_offset;
  return m;
}

int parse_role(const std::optional<std::string>& role) {
  if (!role) return 0;
  if (*role == "source") return LIVEMIG_ATTACH_ROLE_SOURCE;
  if (*role == "destination") return LIVEMIG_ATTACH_ROLE_DESTINATION;
  throw py::value_error("role must be 'source', 'destination' or None, got '" + *role + "'");
}

void require_mapping_of(const Connection& c, const AttachMapping& m) {
  if (m.map.size() != c.layout().len) throw py::value_error("the mapping is not this attachment's region");
}

void register_types(py::module_& m) {
  py::class_<AttachMapping, std::shared_ptr<AttachMapping>>(m, "AttachMapping", py::buffer_protocol(),
                                                             "livemig's mapping of an attached process's region.")
      .def_buffer([](AttachMapping& a) {
        return py::buffer_info(a.map.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(a.map.size())}, {py::ssize_t{1}}, !a.writable);
      })
      .def_property_readonly("nbytes", [](const AttachMapping& a) { return a.map.size(); })
      .def_property_readonly("writable", [](const AttachMapping& a) { return a.writable; })
      .def_property_readonly("address", [](const AttachMapping& a) { return reinterpret_cast<std::uintptr_t>(a.map.data()); });
  py::class_<PyAttachEvent>(m, "AttachEvent", "A message the process sent on its own.")
      .def_readonly("type", &PyAttachEvent::type, "'hints' or 'resumed'.")
      .def_readonly("cmd_id", &PyAttachEvent::cmd_id, "HINTS: the balloon command id they answer.")
      .def_readonly("flags", &PyAttachEvent::flags, "HINTS: 1 START, 2 STOP.")
      .def_readonly("ranges", &PyAttachEvent::ranges, "HINTS: (n, 2) rows of (first_page, npages).");
  py::class_<PyReply>(m, "AttachReply", "A REPLY from the process.")
      .def_readonly("status", &PyReply::status, "0, or a positive errno value.")
      .def_readonly("text", &PyReply::text)
      .def_property_readonly("ok", [](const PyReply& r) { return r.status == 0; });
  py::class_<attach::CheckResult>(m, "AttachCheck", "The process's check of its own memory.")
      .def_readonly("items", &attach::CheckResult::items)
      .def_readonly("failures", &attach::CheckResult::failures)
      .def_readonly("text", &attach::CheckResult::text);
}

void register_connection(py::module_& m) {
  py::class_<Connection, std::shared_ptr<Connection>>(m, "AttachConnection",
                                                      "livemig's side of one attachment (docs/attach.md).")
      .def_static(
          "accept",
          [](int sock, std::optional<std::string> role, std::uint64_t expect_len, std::uint64_t max_len,
             double timeout) {
            attach::AcceptOptions o;
            o.expect_role = parse_role(role);
            o.expect_len = expect_len;
            o.max_len = max_len;
            o.timeout_s = timeout;
            UniqueFd fd(sock);
            py::gil_scoped_release rel;
            return std::make_shared<Connection>(Connection::accept(std::move(fd), o));
          },
          py::arg("sock"), py::arg("role") = py::none(), py::arg("expect_len") = 0, py::arg("max_len") = 0,
          py::arg("timeout") = 5.0,
          "Reads HELLO and the three descriptors from the connected Unix socket `sock` (owned from now on, "
          "closed on failure), validates them and answers WELCOME within `timeout` s. Raises ProtocolError "
          "(a descriptor or message named), ConnectionLost.")
      .def_property_readonly("role", [](const Connection& c) { return attach::role_name(c.layout().role); })
      .def_property_readonly("name", [](const Connection& c) { return c.layout().name; })
      .def_property_readonly("address", [](const Connection& c) { return c.layout().addr; },
                             "The region's address in the process.")
      .def_property_readonly("nbytes", [](const Connection& c) { return c.layout().len; })
      .def_property_readonly("page_size", [](const Connection& c) { return c.layout().page_size; })
      .def_property_readonly("memfd_offset", [](const Connection& c) { return c.layout().memfd_offset; })
      .def_property_readonly("poison", [](const Connection& c) { return c.layout().poison; })
      .def_property_readonly("pid", &Connection::pid)
      .def_property_readonly("peer_pid", &Connection::peer_pid)
      .def_property_readonly("capabilities", &Connection::capabilities)
      .def_property_readonly("uffd_features", &Connection::uffd_features)
      .def_property_readonly("memfd_path", &Connection::memfd_path)
      .def_property_readonly("socket", &Connection::socket, "The socket's descriptor (-1 once closed).")
      .def("map_region",
           [](const Connection& c) {
             auto a = std::make_shared<AttachMapping>();
             a->map = c.map_region();
             a->writable = c.layout().role == attach::Role::Destination;
             return a;
           })
      .def("pause", [](Connection& c, std::uint32_t lease_ms, double t) { return reply(c.pause(lease_ms, t)); },
           py::arg("lease_ms"), py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("resume", [](Connection& c, double t) { return reply(c.resume(t)); }, py::arg("timeout") = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "save_state",
          [](Connection& c, double t) {
            std::vector<std::uint8_t> s;
            {
              py::gil_scoped_release rel;
              s = c.save_state(t);
            }
            return py::bytes(reinterpret_cast<const char*>(s.data()), s.size());
          },
          py::arg("timeout") = -1.0)
      .def(
          "load_state",
          [](Connection& c, const py::bytes& state, double t) {
            const std::string s = state;
            py::gil_scoped_release rel;
            return reply(c.load_state({reinterpret_cast<const std::uint8_t*>(s.data()), s.size()}, t));
          },
          py::arg("state"), py::arg("timeout") = -1.0)
      .def("check", &Connection::check, py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("handoff", [](Connection& c, double t) { return reply(c.handoff(t)); }, py::arg("timeout") = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def("complete", [](Connection& c, double t) { return reply(c.complete(t)); }, py::arg("timeout") = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def("detach", &Connection::detach, py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("balloon", &Connection::balloon, py::arg("cmd_id"), py::call_guard<py::gil_scoped_release>())
      .def(
          "next_event",
          [](Connection& c, double t) -> std::optional<PyAttachEvent> {
            attach::Event e;
            bool got = false;
            {
              py::gil_scoped_release rel;
              got = c.next_event(e, t);
            }
            if (!got) return std::nullopt;
            PyAttachEvent out;
            out.type = e.type == LIVEMIG_ATTACH_MSG_HINTS ? "hints" : "resumed";
            out.cmd_id = e.id;
            out.flags = e.flags;
            out.ranges = ranges_array(e.ranges);
            return out;
          },
          py::arg("timeout") = 0.0, "The next HINTS or RESUMED, waiting up to `timeout` s; None when none came.")
      .def(
          "send_raw",
          [](Connection& c, const py::bytes& b) {
            const std::string s = b;
            c.send_raw({reinterpret_cast<const std::uint8_t*>(s.data()), s.size()});
          },
          py::arg("data"), "Sends bytes as they are (tests of malformed input).")
      .def("close", &Connection::close, "Closes the socket: the process sees livemig gone.")
      .def("release", &Connection::release,
           "close(), and the process's descriptors too; mappings already made stay valid.");
}

// An engine that uses `map` for its whole life: the engine goes first (its threads joined), then
// the mapping (members are destroyed in reverse order).
template <class T>
std::shared_ptr<T> keeping(std::shared_ptr<T> engine, std::shared_ptr<AttachMapping> map) {
  struct Holder {
    std::shared_ptr<AttachMapping> map;
    std::shared_ptr<T> engine;
  };
  auto h = std::make_shared<Holder>(Holder{std::move(map), std::move(engine)});
  T* p = h->engine.get();
  return std::shared_ptr<T>(std::move(h), p);
}

void register_engines(py::module_& m) {
  m.def(
      "attached_source",
      [](const std::shared_ptr<Connection>& c, const std::shared_ptr<AttachMapping>& map) {
        require_mapping_of(*c, *map);
        const RemoteMemory r = remote_of(*c);
        const std::size_t ps = c->layout().page_size;
        std::shared_ptr<Source> s;
        {
          py::gil_scoped_release rel;
          s = std::make_shared<Source>(map->map.data(), c->layout().pages(), r, ps);
        }
        // The Source reads through the mapping for its whole life: it keeps the mapping alive.
        return keeping(std::move(s), map);
      },
      py::arg("connection"), py::arg("mapping"),
      "A Source over an attached source process's memory: pages read through `mapping`, writes tracked in "
      "the process through its userfaultfd and pagemap (armed now; stop_tracking() unprotects).");
  m.def(
      "attached_dest_region",
      [](const std::shared_ptr<Connection>& c, const std::shared_ptr<AttachMapping>& map) {
        require_mapping_of(*c, *map);
        if (!map->writable) throw py::value_error("a destination needs a writable mapping");
        const RemoteMemory r = remote_of(*c);
        auto d = std::make_shared<DestRegion>(map->map.data(), map->map.size(), c->layout().page_size, r);
        return keeping(std::move(d), map);
      },
      py::arg("connection"), py::arg("mapping"),
      "A DestRegion over an attached destination process's memory: precopy writes through `mapping`, "
      "postcopy places through the process's userfaultfd, discards punch holes in its memfd.");
}

void register_digests(py::module_& m) {
  m.def(
      "attached_page_digests",
      [](const std::shared_ptr<Connection>& c, const std::shared_ptr<AttachMapping>& map) {
        require_mapping_of(*c, *map);
        const std::size_t ps = c->layout().page_size;
        const std::uint64_t n = c->layout().pages();
        py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(n));
        std::uint64_t* o = out.mutable_data();
        {
          py::gil_scoped_release rel;
          std::vector<std::uint8_t> zero(ps, 0);
          const std::uint64_t zero_digest = page_digest(zero.data(), ps);
          const UniqueFd file = private_file(c->memfd());  // empty: every page reads as data
          // Holes of the memfd read as zero: their digest is the zero page's, and they stay holes.
          for (std::uint64_t p = 0; p < n;) {
            bool hole = false;
            const std::uint64_t k =
                file ? file_extent(file.get(), c->layout().memfd_offset + p * ps, n - p, ps, hole) : n - p;
            if (hole)
              std::fill(o + p, o + p + k, zero_digest);
            else
              page_digests(map->map.data(), ps, p, k, o + p);
            p += k;
          }
        }
        return out;
      },
      py::arg("connection"), py::arg("mapping"),
      "page_digests() of an attached process's region without reading (so allocating) its memfd's holes.");
}

void register_hints(py::module_& m) {
  m.def(
      "apply_attach_hints",
      [](balloon::Device& d, const PyAttachEvent& e) {
        if (e.type != "hints") throw py::value_error("not a HINTS event");
        auto v = e.ranges.unchecked<2>();
        std::vector<PageRange> runs;
        runs.reserve(static_cast<std::size_t>(v.shape(0)));
        for (py::ssize_t i = 0; i < v.shape(0); ++i) runs.push_back(PageRange{v(i, 0), v(i, 1)});
        py::gil_scoped_release rel;
        std::uint64_t applied = 0;
        // The process's driver, through livemig: START acknowledges the round, the ranges are its
        // hints, STOP ends it (the device drops and counts whatever is stale).
        if ((e.flags & LIVEMIG_ATTACH_HINT_START) != 0) (void)d.ack(e.cmd_id);
        for (const PageRange& r : runs)
          if (d.hint(e.cmd_id, r.first, r.npages)) applied += r.npages;
        if ((e.flags & LIVEMIG_ATTACH_HINT_STOP) != 0) d.stop(e.cmd_id);
        return applied;
      },
      py::arg("device"), py::arg("event"),
      "Applies a HINTS event to a balloon device as its driver would (ack on START, the hints, stop on "
      "STOP); returns the pages it accepted.");
}

}  // namespace

void register_attach(py::module_& m) {
  register_types(m);
  register_connection(m);
  register_engines(m);
  register_digests(m);
  register_hints(m);
}

}  // namespace livemig::py_bindings
