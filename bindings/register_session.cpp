// Session bindings: construct under the GIL, release it for every pass and every wait. Events and
// send statistics cross as bound classes with named read-only fields.
#include <pybind11/native_enum.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "convert.hpp"
#include "livemig/session/session.hpp"
#include "livemig/wire/ack.hpp"
#include "livemig/wire/command.hpp"
#include "register.hpp"

namespace livemig::py_bindings {
namespace {

using Kind = SessionEvent::Kind;

// The optional event a wait returns, converted after the GIL is back.
std::optional<SessionEvent> waited(const std::function<std::optional<SessionEvent>()>& wait) {
  std::optional<SessionEvent> e;
  {
    py::gil_scoped_release rel;
    e = wait();
  }
  return e;
}

void register_types(py::module_& m) {
  py::native_enum<Kind>(m, "EventKind", "enum.IntEnum", "What a session event is.")
      .value("DEVICE_STATE", Kind::DeviceState)
      .value("COMMAND", Kind::Command)
      .value("END", Kind::End)
      .value("ACK", Kind::Ack)
      .value("RECEIVED_BITMAP", Kind::ReceivedBitmap)
      .value("REPORT", Kind::Report)
      .value("PEER_ERROR", Kind::PeerError)
      .value("FAILED", Kind::Failed)
      .finalize();

  py::class_<SessionEvent>(m, "SessionEvent", "Something the peer said (or a channel's failure) that the orchestrator acts on.")
      .def_readonly("kind", &SessionEvent::kind)
      .def_readonly("a", &SessionEvent::a, "The first number: see channel, command, ack_kind, requeued_pages.")
      .def_readonly("b", &SessionEvent::b, "The second number: see ack_value.")
      .def_readonly("text", &SessionEvent::text, "PEER_ERROR: the peer's message; FAILED: what failed here.")
      .def_readonly("at", &SessionEvent::at, "When it was queued, in time.perf_counter() seconds.")
      .def_property_readonly(
          "data", [](const SessionEvent& e) { return py::bytes(reinterpret_cast<const char*>(e.data.data()), e.data.size()); },
          "DEVICE_STATE / REPORT: the blob; COMMAND: its arguments; RECEIVED_BITMAP: the bitmap.")
      .def_property_readonly(
          "channel", [](const SessionEvent& e) { return e.a; },
          "END / FAILED: the channel's index (MAIN_CHANNEL, URGENT_CHANNEL, FIRST_EXTRA_CHANNEL + i).")
      .def_property_readonly(
          "command",
          [](const SessionEvent& e) -> py::object {
            if (e.kind != Kind::Command) return py::none();
            return py::cast(static_cast<wire::Command>(e.a));
          },
          "COMMAND: which one (a Command); None for other events.")
      .def_property_readonly(
          "ack_kind",
          [](const SessionEvent& e) -> py::object {
            if (e.kind != Kind::Ack) return py::none();
            return py::cast(static_cast<wire::AckKind>(e.a));
          },
          "ACK: its kind (an AckKind); None for other events.")
      .def_property_readonly("ack_value", [](const SessionEvent& e) { return e.b; }, "ACK: its value.")
      .def_property_readonly(
          "requeued_pages", [](const SessionEvent& e) { return e.kind == Kind::ReceivedBitmap && e.b == 1 ? e.a : 0; },
          "RECEIVED_BITMAP with resync on: the pages made dirty again.")
      .def_property_readonly("resynced", [](const SessionEvent& e) { return e.kind == Kind::ReceivedBitmap && e.b == 1; },
                             "RECEIVED_BITMAP: the source resynced on it.")
      .def("__repr__", [](const SessionEvent& e) {
        return "SessionEvent(" + std::string(py::str(py::cast(e.kind))) + ", a=" + std::to_string(e.a) +
               ", b=" + std::to_string(e.b) + (e.text.empty() ? "" : ", text=" + e.text) + ")";
      });

  py::class_<SendStats>(m, "SendStats", "What a send pass moved.")
      .def_readonly("pages", &SendStats::pages, "Pages sent with data.")
      .def_readonly("zero_pages", &SendStats::zero_pages, "Pages sent as zero runs (header only).")
      .def_readonly("urgent_pages", &SendStats::urgent_pages, "Requested pages among them.")
      .def_readonly("bytes", &SendStats::bytes, "Bytes on the wire, headers included.")
      .def_readonly("seconds", &SendStats::seconds)
      .def_readonly("drained", &SendStats::drained, "No dirty page was left when the pass ended.");
}

}  // namespace

void register_session(py::module_& m) {
  register_types(m);

  py::class_<SourceSession>(m, "SourceSession", "The source's page pumps and return-path reader.")
      .def(py::init([](std::shared_ptr<Source> source, wire::FrameWriter& main, std::vector<wire::FrameWriter*> extras,
                       wire::FrameWriter* urgent, int return_fd, const wire::WireConfig& cfg) {
             return std::make_unique<SourceSession>(std::move(source), main, std::move(extras), urgent, return_fd, cfg);
           }),
           py::arg("source"), py::arg("main"), py::arg("extras"), py::arg("urgent"), py::arg("return_fd"),
           py::arg("config"), py::keep_alive<1, 3>(), py::keep_alive<1, 4>(), py::keep_alive<1, 5>())
      .def("resync_on_received_bitmap", &SourceSession::resync_on_received_bitmap, py::arg("local_fill"),
           "Recovery: resync the source on the destination's received bitmap as soon as it arrives.")
      .def("read_requests_on", &SourceSession::read_requests_on, py::arg("fd"),
           "Also read requests from fd (the urgent channel: capability urgent-requests) on a thread of its own.")
      .def("start_return_path", &SourceSession::start_return_path)
      .def("precopy_pass", &SourceSession::precopy_pass, py::arg("max_seconds"),
           py::arg("max_pages") = ~std::uint64_t{0}, py::call_guard<py::gil_scoped_release>(),
           "Send dirty pages on every page channel; returns what moved.")
      .def("postcopy_push", &SourceSession::postcopy_push, py::arg("max_seconds"),
           py::call_guard<py::gil_scoped_release>(),
           "Serve requests first, push the rest; returns when no dirty page is left or time is up.")
      .def("end_extras", &SourceSession::end_extras, py::call_guard<py::gil_scoped_release>(),
           "END on every extra page channel; later passes use main alone.")
      .def("end_urgent", &SourceSession::end_urgent, py::call_guard<py::gil_scoped_release>(),
           "END on the urgent channel once no request is being served on it.")
      .def("interrupt", &SourceSession::interrupt)
      .def(
          "wait_event", [](SourceSession& s, double timeout) { return waited([&] { return s.wait_event(timeout); }); },
          py::arg("timeout"), "The next return-path event, or None after timeout seconds.")
      .def("join_return_path", &SourceSession::join_return_path, py::call_guard<py::gil_scoped_release>());

  py::class_<DestSession>(m, "DestSession", "The destination's channel readers and request sink.")
      .def(py::init([](std::shared_ptr<DestRegion> region, int main_fd, std::vector<int> extra_fds, int urgent_fd,
                       wire::FrameWriter& return_path, const wire::WireConfig& cfg) {
             return std::make_unique<DestSession>(std::move(region), main_fd, std::move(extra_fds), urgent_fd,
                                                  return_path, cfg);
           }),
           py::arg("region"), py::arg("main_fd"), py::arg("extra_fds"), py::arg("urgent_fd"), py::arg("return_path"),
           py::arg("config"), py::keep_alive<1, 2>(), py::keep_alive<1, 6>())
      .def("send_requests_on", &DestSession::send_requests_on, py::arg("writer"), py::keep_alive<1, 2>(),
           "Send the fault thread's requests with writer (the urgent channel's: capability urgent-requests).")
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
          py::arg("resync") = true, py::keep_alive<1, 5>(),
          "Recovery: send the received bitmap, ask again for requested pages, read the new sockets.")
      .def(
          "wait_event", [](DestSession& s, double timeout) { return waited([&] { return s.wait_event(timeout); }); },
          py::arg("timeout"), "The next event, or None after timeout seconds.")
      .def("join", &DestSession::join, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pages_received", &DestSession::pages_received);
}

}  // namespace livemig::py_bindings
