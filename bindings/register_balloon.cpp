// Balloon bindings: the free page hinting device (the source's, reached through Source.balloon,
// and the destination's local one), its ids and states. Host-side calls wait for in-flight hints
// and release the GIL; guest-side calls are lock-free (for tests: the model guest's driver is C++).
#include <pybind11/numpy.h>
#include <pybind11/operators.h>
#include <pybind11/native_enum.h>
#include <pybind11/pybind11.h>

#include <memory>

#include "convert.hpp"
#include "livemig/balloon/device.hpp"
#include "livemig/balloon/protocol.hpp"
#include "register.hpp"

namespace livemig::py_bindings {

void register_balloon(py::module_& m) {
  using balloon::Device;
  using balloon::LocalDevice;

  py::native_enum<balloon::State>(m, "BalloonState", "enum.IntEnum", "The free page hinting device's states.")
      .value("STOP", balloon::State::Stop)
      .value("REQUESTED", balloon::State::Requested)
      .value("START", balloon::State::Start)
      .value("DONE", balloon::State::Done)
      .finalize();
  // Command ids: STOP and DONE are commands; round ids are 0x80000000 and up (balloon/protocol.hpp).
  m.attr("BALLOON_CMD_STOP") = balloon::kCmdStop;
  m.attr("BALLOON_CMD_DONE") = balloon::kCmdDone;
  m.attr("BALLOON_FIRST_ROUND_ID") = balloon::kFirstRoundId;
  m.def(
      "balloon_next_round_id", [](std::int64_t id) { return balloon::next_round_id(check_cmd_id(id)); },
      py::arg("cmd_id"), "The round id after cmd_id: 0x80000001 after STOP, DONE or none; 0xFFFFFFFF wraps to 0x80000000.");
  m.def(
      "balloon_is_round_id", [](std::int64_t id) { return balloon::is_round_id(check_cmd_id(id)); }, py::arg("cmd_id"),
      "True for ids that name a round (0x80000000 and up).");

  py::class_<balloon::Counters>(m, "BalloonCounters", "What a balloon device saw.")
      .def(py::self == py::self)
      .def_readonly("rounds", &balloon::Counters::rounds)
      .def_readonly("acks", &balloon::Counters::acks)
      .def_readonly("acks_stale", &balloon::Counters::acks_stale)
      .def_readonly("stops", &balloon::Counters::stops)
      .def_readonly("stops_stale", &balloon::Counters::stops_stale)
      .def_readonly("hints_accepted", &balloon::Counters::hints_accepted)
      .def_readonly("pages_hinted", &balloon::Counters::pages_hinted)
      .def_readonly("hints_dropped_stale", &balloon::Counters::hints_dropped_stale)
      .def_readonly("hints_dropped_invalid", &balloon::Counters::hints_dropped_invalid)
      .def_readonly("hints_failed", &balloon::Counters::hints_failed)
      .def_readonly("hints_unacked", &balloon::Counters::hints_unacked);

  py::class_<balloon::HintTarget, std::shared_ptr<balloon::HintTarget>>(
      m, "HintTarget", "Where a balloon device applies the hints it accepts (a source's page state).");

  py::class_<balloon::Port, std::shared_ptr<balloon::Port>>(
      m, "BalloonPort", "The guest's view of a balloon device (what a guest's driver talks to).");

  py::class_<Device, balloon::Port, std::shared_ptr<Device>>(
      m, "BalloonDevice", "The free page hinting device: host side (rounds, DONE) and guest side (acks, hints).")
      .def("host_request", [](Device& d, std::int64_t id) { d.host_request(check_cmd_id(id)); }, py::arg("cmd_id"),
           "Starts round cmd_id (REQUESTED); ValueError unless it is a round id. Waits for in-flight hints.")
      .def("host_request_next", &Device::host_request_next, py::call_guard<py::gil_scoped_release>(),
           "Starts the round after the last one; returns its id.")
      .def("host_stop", &Device::host_stop, py::call_guard<py::gil_scoped_release>(),
           "The device shows STOP; returns once hints in flight are applied.")
      .def("host_done", &Device::host_done, py::call_guard<py::gil_scoped_release>(),
           "The device shows DONE: the guest may reuse every page it hinted.")
      .def("continue_after", [](Device& d, std::int64_t id) { d.continue_after(check_cmd_id(id)); }, py::arg("cmd_id"),
           "Continues another device's id sequence: the next round follows cmd_id (0: none yet).")
      .def("set_target", &Device::set_target, py::arg("target"), py::call_guard<py::gil_scoped_release>(),
           "Route accepted hints to `target` (None: the device's own); stops a running round first.")
      .def_property_readonly("cmd_id", &Device::cmd_id, "The id the device shows.")
      .def_property_readonly("state", &Device::state)
      .def_property_readonly("last_round_id", &Device::last_round_id, "The last round id started (0: none).")
      .def_property_readonly("pages", &Device::pages)
      .def("guest_ack", [](Device& d, std::int64_t id) { return d.ack(check_cmd_id(id)); }, py::arg("cmd_id"),
           "Guest side: acknowledges round cmd_id (REQUESTED -> START); False when not current.")
      .def(
          "guest_hint",
          [](Device& d, std::int64_t id, std::uint64_t first, std::uint64_t n) {
            const std::uint32_t cid = check_cmd_id(id);
            py::gil_scoped_release rel;
            return d.hint(cid, first, n);
          },
          py::arg("cmd_id"), py::arg("first_page"), py::arg("npages") = 1,
          "Guest side: reports pages free; True when applied (current id, START, inside the region).")
      .def("guest_stop", [](Device& d, std::int64_t id) { d.stop(check_cmd_id(id)); }, py::arg("cmd_id"),
           "Guest side: ends round cmd_id.")
      .def("counters", &Device::counters);

  py::class_<LocalDevice, Device, std::shared_ptr<LocalDevice>>(
      m, "LocalBalloonDevice", "A balloon device that records the hints it accepts (a destination's; tests').")
      .def(py::init([](py::ssize_t pages) {
             if (pages < 0) throw py::value_error("pages must be >= 0");
             return std::make_shared<LocalDevice>(static_cast<std::uint64_t>(pages));
           }),
           py::arg("pages"))
      .def(
          "accepted",
          [](const LocalDevice& d) {
            const auto recs = d.recorder().accepted();
            py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(recs.size()), py::ssize_t{3}});
            auto v = out.mutable_unchecked<2>();
            for (py::ssize_t i = 0; i < static_cast<py::ssize_t>(recs.size()); ++i) {
              const auto& r = recs[static_cast<std::size_t>(i)];
              v(i, 0) = r.id;
              v(i, 1) = r.first;
              v(i, 2) = r.npages;
            }
            return out;
          },
          "Every accepted hint as rows (cmd_id, first_page, npages), in order.")
      .def(
          "hinted_since_done",
          [](const LocalDevice& d) {
            const PageBitmap& src = d.recorder().since_done();
            auto bm = std::make_shared<PageBitmap>(src.size());
            bm->or_with(src);
            return bm;
          },
          "A copy of the pages hinted since the last DONE.");
}

}  // namespace livemig::py_bindings
