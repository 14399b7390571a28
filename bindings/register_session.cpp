// Session bindings: construct under the GIL, release it for every pass and every wait.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "livemig/guest.hpp"
#include "livemig/session.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

const char* kind_name(SessionEvent::Kind k) {
  switch (k) {
    case SessionEvent::Kind::DeviceState: return "device_state";
    case SessionEvent::Kind::Command: return "command";
    case SessionEvent::Kind::End: return "end";
    case SessionEvent::Kind::Ack: return "ack";
    case SessionEvent::Kind::ReceivedBitmap: return "received_bitmap";
    case SessionEvent::Kind::Report: return "report";
    case SessionEvent::Kind::PeerError: return "peer_error";
    case SessionEvent::Kind::Failed: return "failed";
  }
  return "unknown";
}

// (kind, a, b, data bytes, text, at) or None on timeout.
py::object event_tuple(const std::optional<SessionEvent>& e) {
  if (!e) return py::none();
  return py::make_tuple(kind_name(e->kind), e->a, e->b,
                        py::bytes(reinterpret_cast<const char*>(e->data.data()), e->data.size()), e->text,
                        e->at);
}

py::dict send_stats(const SendStats& s) {
  py::dict d;
  d["pages"] = s.pages;
  d["zero_pages"] = s.zero_pages;
  d["urgent_pages"] = s.urgent_pages;
  d["bytes"] = s.bytes;
  d["seconds"] = s.seconds;
  d["drained"] = s.drained;
  return d;
}

}  // namespace

void register_session(py::module_& m) {
  m.def(
      "source_balloon_port",
      [](std::shared_ptr<Source> source) -> std::shared_ptr<guest::BalloonPort> {
        HintSink& sink = source->hints();
        return std::make_shared<guest::SinkPort<HintSink>>(sink, std::move(source));
      },
      py::arg("source"), "The source's hint sink as the device a guest's balloon driver talks to.");

  py::class_<SourceSession>(m, "SourceSession", "The source's page pumps and return-path reader.")
      .def(py::init([](std::shared_ptr<Source> source, wire::FrameWriter& main, std::vector<wire::FrameWriter*> extras,
                       wire::FrameWriter* urgent, int return_fd, const wire::WireConfig& cfg) {
             return std::make_unique<SourceSession>(std::move(source), main, std::move(extras), urgent, return_fd, cfg);
           }),
           py::arg("source"), py::arg("main"), py::arg("extras"), py::arg("urgent"), py::arg("return_fd"),
           py::arg("config"), py::keep_alive<1, 3>(), py::keep_alive<1, 4>(), py::keep_alive<1, 5>())
      .def("resync_on_received_bitmap", &SourceSession::resync_on_received_bitmap, py::arg("local_fill"),
           "Recovery: resync the source on the destination's received bitmap as soon as it arrives.")
      .def("start_return_path", &SourceSession::start_return_path)
      .def(
          "precopy_pass",
          [](SourceSession& s, double max_seconds, std::uint64_t max_pages) {
            SendStats st;
            {
              py::gil_scoped_release rel;
              st = s.precopy_pass(max_seconds, max_pages);
            }
            return send_stats(st);
          },
          py::arg("max_seconds"), py::arg("max_pages") = ~std::uint64_t{0},
          "Send dirty pages on every page channel; returns what moved.")
      .def(
          "postcopy_push",
          [](SourceSession& s, double max_seconds) {
            SendStats st;
            {
              py::gil_scoped_release rel;
              st = s.postcopy_push(max_seconds);
            }
            return send_stats(st);
          },
          py::arg("max_seconds"), "Serve requests first, push the rest; returns when no dirty page is left.")
      .def("end_urgent", &SourceSession::end_urgent, py::call_guard<py::gil_scoped_release>(),
           "END on the urgent channel once no request is being served on it.")
      .def("interrupt", &SourceSession::interrupt)
      .def(
          "wait_event",
          [](SourceSession& s, double timeout) {
            std::optional<SessionEvent> e;
            {
              py::gil_scoped_release rel;
              e = s.wait_event(timeout);
            }
            return event_tuple(e);
          },
          py::arg("timeout"), "(kind, a, b, data, text, at) of the next return-path event, or None.")
      .def("join_return_path", &SourceSession::join_return_path, py::call_guard<py::gil_scoped_release>());

  py::class_<DestSession>(m, "DestSession", "The destination's channel readers and request sink.")
      .def(py::init([](std::shared_ptr<DestRegion> region, int main_fd, std::vector<int> extra_fds, int urgent_fd,
                       wire::FrameWriter& return_path, const wire::WireConfig& cfg) {
             return std::make_unique<DestSession>(std::move(region), main_fd, std::move(extra_fds), urgent_fd,
                                                  return_path, cfg);
           }),
           py::arg("region"), py::arg("main_fd"), py::arg("extra_fds"), py::arg("urgent_fd"), py::arg("return_path"),
           py::arg("config"), py::keep_alive<1, 2>(), py::keep_alive<1, 6>())
      .def("start", &DestSession::start)
      .def("detach", &DestSession::detach, py::call_guard<py::gil_scoped_release>(),
           "Recovery: stop sending the fault thread's requests (the connection broke in postcopy).")
      .def(
          "reattach",
          [](DestSession& s, int main_fd, std::vector<int> extra_fds, int urgent_fd, wire::FrameWriter& return_path,
             bool resync) {
            py::gil_scoped_release rel;
            s.reattach(main_fd, std::move(extra_fds), urgent_fd, return_path, resync);
          },
          py::arg("main_fd"), py::arg("extra_fds"), py::arg("urgent_fd"), py::arg("return_path"),
          py::arg("resync") = true,
          py::keep_alive<1, 5>(),
          "Recovery: send the received bitmap, ask again for requested pages, read the new sockets.")
      .def(
          "wait_event",
          [](DestSession& s, double timeout) {
            std::optional<SessionEvent> e;
            {
              py::gil_scoped_release rel;
              e = s.wait_event(timeout);
            }
            return event_tuple(e);
          },
          py::arg("timeout"), "(kind, a, b, data, text, at) of the next event, or None.")
      .def("join", &DestSession::join, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pages_received", &DestSession::pages_received);
}

}  // namespace livemig::py_bindings
