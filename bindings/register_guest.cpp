// Guest model bindings: a Guest running C++ threads over a Python buffer (numpy array, mmap), and
// the in-process balloon device. Arguments are converted under the GIL; everything that waits for
// guest threads or walks the region runs with the GIL released. Guest threads never touch Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "livemig/guest.hpp"
#include "livemig/page_bitmap.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using namespace livemig::guest;

// A held buffer export: keeps the exporter (numpy array, mmap) alive and its memory in place.
// Must be destroyed with the GIL held.
class BufferHold {
 public:
  BufferHold(py::handle obj, bool writable) {
    if (PyObject_CheckBuffer(obj.ptr()) == 0)
      throw py::type_error(std::string(writable ? "region" : "state") + " must support the buffer protocol");
    if (PyObject_GetBuffer(obj.ptr(), &view_, writable ? PyBUF_CONTIG : PyBUF_CONTIG_RO) != 0) {
      PyErr_Clear();
      throw py::value_error(writable ? "region must be a writable, C-contiguous buffer"
                                     : "state must be a C-contiguous buffer");
    }
  }
  BufferHold(const BufferHold&) = delete;
  BufferHold& operator=(const BufferHold&) = delete;
  ~BufferHold() { PyBuffer_Release(&view_); }
  std::uint8_t* data() const noexcept { return static_cast<std::uint8_t*>(view_.buf); }
  std::size_t size() const noexcept { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// The Python-side Guest: the region's buffer outlives the C++ guest (members die in reverse order,
// and the destructor stops the threads first, without the GIL).
class PyGuest {
 public:
  PyGuest(py::handle region, const GuestConfig& cfg, std::shared_ptr<BalloonPort> port) : buf_(region, true) {
    py::gil_scoped_release rel;
    guest_ = std::make_unique<Guest>(buf_.data(), buf_.size(), cfg, std::move(port));
  }
  PyGuest(py::handle region, py::handle state, std::shared_ptr<BalloonPort> port) : buf_(region, true) {
    BufferHold st(state, false);
    py::gil_scoped_release rel;
    guest_ = std::make_unique<Guest>(buf_.data(), buf_.size(), std::span<const std::uint8_t>(st.data(), st.size()),
                                     std::move(port));
  }
  PyGuest(const PyGuest&) = delete;
  PyGuest& operator=(const PyGuest&) = delete;
  ~PyGuest() {
    if (Py_IsInitialized() != 0 && PyGILState_Check() != 0) {
      py::gil_scoped_release rel;
      guest_.reset();
    } else {
      guest_.reset();
    }
  }
  Guest& g() { return *guest_; }

 private:
  BufferHold buf_;
  std::unique_ptr<Guest> guest_;
};

py::dict stats_dict(const GuestStats& s) {
  py::dict d;
  d["pages_written"] = s.pages_written;
  d["passes"] = s.passes;
  d["allocations"] = s.allocations;
  d["frees"] = s.frees;
  d["alloc_failures"] = s.alloc_failures;
  d["rounds"] = s.rounds;
  d["hints_sent"] = s.hints_sent;
  d["pages_hinted"] = s.pages_hinted;
  d["hints_dropped"] = s.hints_dropped;
  d["pages_held"] = s.pages_held;
  d["done_seen"] = s.done_seen;
  d["last_cmd_id"] = s.last_cmd_id;
  d["free_pages"] = s.free_pages;
  d["allocated_pages"] = s.allocated_pages;
  return d;
}

py::dict verify_dict(const VerifyResult& r) {
  py::dict d;
  d["pages_checked"] = r.pages_checked;
  d["pages_excepted"] = r.pages_excepted;
  d["mismatches"] = r.mismatches;
  py::list first;
  for (const auto& m : r.first)
    first.append(py::make_tuple(m.page, std::string(m.kind), m.found_generation, m.expected_generation));
  d["first_mismatches"] = first;
  return d;
}

py::dict increment_dict(const IncrementCheck& r) {
  py::dict d;
  d["ok"] = r.ok;
  d["pages_checked"] = r.pages_checked;
  d["value"] = r.value;
  d["break_page"] = r.break_page < 0 ? py::object(py::none()) : py::object(py::int_(r.break_page));
  d["bad_pages"] = py::cast(r.bad);
  return d;
}

const char* state_name(DeviceState s) {
  switch (s) {
    case DeviceState::Stop: return "stop";
    case DeviceState::Requested: return "requested";
    case DeviceState::Start: return "start";
    case DeviceState::Done: return "done";
  }
  return "?";
}

Fill parse_fill(const std::string& f) {
  if (f == "pattern") return Fill::Pattern;
  if (f == "zero") return Fill::Zero;
  throw std::invalid_argument("unknown fill '" + f + "' (pattern, zero)");
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

}  // namespace

void register_guest(py::module_& m) {
  py::class_<BalloonPort, std::shared_ptr<BalloonPort>>(
      m, "BalloonPort",
      "The guest's view of a balloon device (implemented in C++: LocalBalloonDevice, the host's sink).");

  py::class_<LocalBalloonDevice, BalloonPort, std::shared_ptr<LocalBalloonDevice>>(
      m, "LocalBalloonDevice", "An in-process balloon device with the host's free page hinting semantics.")
      .def(py::init([](py::ssize_t pages) {
             if (pages < 0) throw py::value_error("pages must be >= 0");
             return std::make_shared<LocalBalloonDevice>(static_cast<std::uint64_t>(pages));
           }),
           py::arg("pages"))
      .def("host_request", &LocalBalloonDevice::host_request, py::arg("cmd_id"),
           "Starts round cmd_id (REQUESTED); ValueError unless cmd_id >= 0x80000000.")
      .def("host_request_next", &LocalBalloonDevice::host_request_next,
           "Starts the round after the last one requested; returns its id.")
      .def("host_stop", &LocalBalloonDevice::host_stop, "The device shows STOP.")
      .def("host_done", &LocalBalloonDevice::host_done, "The device shows DONE; forgets the pages hinted so far.")
      .def("guest_ack", &LocalBalloonDevice::ack, py::arg("cmd_id"),
           "Guest side: acknowledges round cmd_id (REQUESTED -> START); False when not current.")
      .def("guest_hint", &LocalBalloonDevice::hint, py::arg("cmd_id"), py::arg("first_page"), py::arg("npages"),
           "Guest side: reports pages free; True when accepted (current id, START, in range).")
      .def("guest_stop", &LocalBalloonDevice::stop, py::arg("cmd_id"), "Guest side: ends round cmd_id.")
      .def_property_readonly("cmd_id", &LocalBalloonDevice::cmd_id)
      .def_property_readonly("state", [](const LocalBalloonDevice& d) { return state_name(d.state()); })
      .def_property_readonly("last_round_id", &LocalBalloonDevice::last_round_id)
      .def(
          "accepted",
          [](const LocalBalloonDevice& d) {
            const auto recs = d.accepted();
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
          [](const LocalBalloonDevice& d, py::ssize_t pages) {
            auto bm = std::make_shared<PageBitmap>(static_cast<std::size_t>(pages));
            if (!bm->import_bytes(d.hinted_since_done())) throw py::value_error("pages does not match the device");
            return bm;
          },
          py::arg("pages"), "Pages hinted since the last host_done(), as a PageBitmap of `pages` pages.")
      .def("counters",
           [](const LocalBalloonDevice& d) {
             const auto c = d.counters();
             py::dict r;
             r["acks"] = c.acks;
             r["acks_stale"] = c.acks_stale;
             r["stops"] = c.stops;
             r["stops_stale"] = c.stops_stale;
             r["hints_accepted"] = c.hints_accepted;
             r["pages_hinted"] = c.pages_hinted;
             r["hints_dropped_stale"] = c.hints_dropped_stale;
             r["hints_invalid"] = c.hints_invalid;
             r["hints_unacked"] = c.hints_unacked;
             return r;
           })
      .def_static("next_round_id", &next_round_id, py::arg("cmd_id"),
                  "The round id after cmd_id (0x80000001 after STOP/DONE; 0xFFFFFFFF wraps to 0x80000000).");

  py::class_<PyGuest>(m, "Guest", "A guest: C++ writer threads, an allocator and a balloon driver over a region.")
      .def(py::init([](py::handle region, std::size_t page_size, const std::string& workload, double rate,
                       double free_fraction, double churn, std::uint64_t hotset_pages, double hot_fraction,
                       std::uint64_t seed, const std::string& fill, unsigned threads, std::uint32_t poll_interval_us,
                       double hint_reserve, std::shared_ptr<BalloonPort> device) {
             GuestConfig c;
             c.page_size = page_size;
             c.workload = parse_workload(workload);
             c.rate = rate;
             c.free_fraction = free_fraction;
             c.churn = churn;
             c.hotset_pages = hotset_pages;
             c.hot_fraction = hot_fraction;
             c.seed = seed;
             c.fill = parse_fill(fill);
             c.threads = threads;
             c.poll_interval_us = poll_interval_us;
             c.hint_reserve = hint_reserve;
             return std::make_unique<PyGuest>(region, c, std::move(device));
           }),
           py::arg("region"), py::kw_only(), py::arg("page_size") = 4096, py::arg("workload") = "idle",
           py::arg("rate") = 0.0, py::arg("free_fraction") = 0.0, py::arg("churn") = 0.0,
           py::arg("hotset_pages") = 64, py::arg("hot_fraction") = 0.9, py::arg("seed") = 1,
           py::arg("fill") = "pattern", py::arg("threads") = 1, py::arg("poll_interval_us") = 1000,
           py::arg("hint_reserve") = 0.0, py::arg("device") = nullptr)
      .def_static(
          "from_state",
          [](py::handle region, py::handle state, std::shared_ptr<BalloonPort> device) {
            return std::make_unique<PyGuest>(region, state, std::move(device));
          },
          py::arg("region"), py::arg("state"), py::arg("device") = nullptr,
          "A guest resumed from export_state() bytes on a region that holds its memory; not started.")
      .def(
          "prefault", [](PyGuest& p) { p.g().prefault(); }, py::call_guard<py::gil_scoped_release>(),
          "Touch the generation table now, so a later import_state() writes only warm memory.")
      .def(
          "start", [](PyGuest& p) { p.g().start(); }, py::call_guard<py::gil_scoped_release>())
      .def(
          "pause", [](PyGuest& p) { p.g().pause(); }, py::call_guard<py::gil_scoped_release>())
      .def(
          "resume", [](PyGuest& p) { p.g().resume(); }, py::call_guard<py::gil_scoped_release>())
      .def(
          "stop", [](PyGuest& p) { p.g().stop(); }, py::call_guard<py::gil_scoped_release>())
      .def(
          "kick", [](PyGuest& p) { p.g().kick(); }, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("running", [](PyGuest& p) { return p.g().running(); })
      .def_property_readonly("pages", [](PyGuest& p) { return p.g().pages(); })
      .def_property_readonly("page_size", [](PyGuest& p) { return p.g().page_size(); })
      .def_property_readonly("workload", [](PyGuest& p) { return std::string(workload_name(p.g().config().workload)); })
      .def("config",
           [](PyGuest& p) {
             const GuestConfig& c = p.g().config();
             py::dict d;
             d["workload"] = std::string(workload_name(c.workload));
             d["page_size"] = c.page_size;
             d["rate"] = c.rate;
             d["free_fraction"] = c.free_fraction;
             d["churn"] = c.churn;
             d["hotset_pages"] = c.hotset_pages;
             d["hot_fraction"] = c.hot_fraction;
             d["seed"] = c.seed;
             d["fill"] = c.fill == Fill::Zero ? "zero" : "pattern";
             d["threads"] = c.threads;
             d["poll_interval_us"] = c.poll_interval_us;
             d["hint_reserve"] = c.hint_reserve;
             return d;
           })
      .def("stats", [](PyGuest& p) { return stats_dict(p.g().stats()); })
      .def("verify",
           [](PyGuest& p) {
             VerifyResult r;
             {
               py::gil_scoped_release rel;
               r = p.g().verify();
             }
             return verify_dict(r);
           })
      .def("check_increment",
           [](PyGuest& p) {
             IncrementCheck r;
             {
               py::gil_scoped_release rel;
               r = p.g().check_increment();
             }
             return increment_dict(r);
           })
      .def("export_state",
           [](PyGuest& p) {
             std::vector<std::uint8_t> v;
             {
               py::gil_scoped_release rel;
               v = p.g().export_state();
             }
             return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
           })
      .def(
          "import_state",
          [](PyGuest& p, py::handle state) {
            BufferHold st(state, false);
            py::gil_scoped_release rel;
            p.g().import_state({st.data(), st.size()});
          },
          py::arg("state"))
      .def("page_states",
           [](PyGuest& p) {
             std::vector<std::uint8_t> v;
             {
               py::gil_scoped_release rel;
               v = p.g().page_states();
             }
             return to_array(v);
           })
      .def("generations", [](PyGuest& p) {
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = p.g().generations();
        }
        return to_array(v);
      });

  m.def(
      "increment_oracle",
      [](py::handle region, std::size_t page_size,
         std::optional<py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>> excepted) {
        BufferHold buf(region, false);
        if (page_size == 0 || buf.size() % page_size != 0)
          throw py::value_error("region size " + std::to_string(buf.size()) + " is not a multiple of page_size " +
                                std::to_string(page_size));
        const std::size_t npages = buf.size() / page_size;
        std::span<const std::uint8_t> ex;
        if (excepted) {
          if (static_cast<std::size_t>(excepted->size()) != npages)
            throw py::value_error("excepted has " + std::to_string(excepted->size()) + " entries, the region " +
                                  std::to_string(npages) + " pages");
          ex = {excepted->data(), npages};
        }
        IncrementCheck r;
        {
          py::gil_scoped_release rel;
          r = check_increment(buf.data(), page_size, npages, ex);
        }
        return increment_dict(r);
      },
      py::arg("region"), py::arg("page_size"), py::arg("excepted") = py::none(),
      "The increment oracle over byte 0 of each page not marked non-zero in `excepted`.");
}

}  // namespace livemig::py_bindings
