// Guest model bindings: a Guest running C++ threads over a Python buffer (numpy array, mmap), held
// exported for the guest's life. Arguments are converted under the GIL; everything that waits for
// guest threads or walks the region runs with the GIL released. Guest threads never touch Python.
#include <pybind11/numpy.h>
#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "livemig/guest/guest.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "convert.hpp"
#include "register.hpp"

namespace livemig::py_bindings {
namespace {

using namespace livemig::guest;

// The Python-side Guest: the region's buffer outlives the C++ guest (members die in reverse order,
// and the destructor stops the threads first, without the GIL).
class PyGuest {
 public:
  PyGuest(py::handle region, const GuestConfig& cfg, std::shared_ptr<BalloonPort> port)
      : buf_(region, BufferExport::Access::write, "region") {
    py::gil_scoped_release rel;
    guest_ = std::make_unique<Guest>(buf_.data(), buf_.size(), cfg, std::move(port));
  }
  PyGuest(py::handle region, py::handle state, std::shared_ptr<BalloonPort> port)
      : buf_(region, BufferExport::Access::write, "region") {
    const BufferExport st(state, BufferExport::Access::read, "state");
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
  BufferExport buf_;  // exported for as long as the guest's threads may touch it
  std::unique_ptr<Guest> guest_;
};

Fill parse_fill(const std::string& f) {
  if (f == "pattern") return Fill::Pattern;
  if (f == "zero") return Fill::Zero;
  throw std::invalid_argument("unknown fill '" + f + "' (pattern, zero)");
}

}  // namespace

void register_guest(py::module_& m) {
  py::class_<GuestStats>(m, "GuestStats", "A guest's counters (carried across export/import).")
      .def(py::self == py::self)
      .def_readonly("pages_written", &GuestStats::pages_written, "Workload and churn page writes.")
      .def_readonly("passes", &GuestStats::passes, "increment: completed passes.")
      .def_readonly("allocations", &GuestStats::allocations)
      .def_readonly("frees", &GuestStats::frees)
      .def_readonly("alloc_failures", &GuestStats::alloc_failures)
      .def_readonly("rounds", &GuestStats::rounds, "Hint rounds acknowledged.")
      .def_readonly("hints_sent", &GuestStats::hints_sent)
      .def_readonly("pages_hinted", &GuestStats::pages_hinted)
      .def_readonly("hints_dropped", &GuestStats::hints_dropped)
      .def_readonly("pages_held", &GuestStats::pages_held, "Pages the balloon driver holds until DONE.")
      .def_readonly("done_seen", &GuestStats::done_seen, "DONE commands the driver acted on.")
      .def_readonly("last_cmd_id", &GuestStats::last_cmd_id, "The last command id the driver saw.")
      .def_readonly("free_pages", &GuestStats::free_pages, "Pages in the free pool now.")
      .def_readonly("allocated_pages", &GuestStats::allocated_pages);
  py::class_<VerifyResult::Mismatch>(m, "Mismatch", "A page that does not hold what the guest last wrote there.")
      .def_readonly("page", &VerifyResult::Mismatch::page)
      .def_property_readonly("kind", [](const VerifyResult::Mismatch& x) { return std::string(x.kind); },
                             "misplaced, generation, torn, zero, nonzero or counter.")
      .def_readonly("found_generation", &VerifyResult::Mismatch::found_generation)
      .def_readonly("expected_generation", &VerifyResult::Mismatch::expected_generation);
  py::class_<VerifyResult>(m, "VerifyResult", "A guest's self-check; free and held pages are excepted.")
      .def_readonly("pages_checked", &VerifyResult::pages_checked)
      .def_readonly("pages_excepted", &VerifyResult::pages_excepted)
      .def_readonly("mismatches", &VerifyResult::mismatches)
      .def_property_readonly("first_mismatches",
                             [](const VerifyResult& r) { return std::vector<VerifyResult::Mismatch>(r.first); })
      .def_property_readonly("ok", [](const VerifyResult& r) { return r.mismatches == 0; });
  py::class_<IncrementCheck>(m, "IncrementCheck", "The increment oracle's verdict.")
      .def_readonly("ok", &IncrementCheck::ok)
      .def_readonly("pages_checked", &IncrementCheck::pages_checked)
      .def_readonly("value", &IncrementCheck::value, "Byte 0 of the first checked page.")
      .def_property_readonly(
          "break_page",
          [](const IncrementCheck& r) -> py::object {
            return r.break_page < 0 ? py::object(py::none()) : py::object(py::int_(r.break_page));
          },
          "The page one lower than its predecessor, or None.")
      .def_property_readonly("bad_pages", [](const IncrementCheck& r) { return r.bad; });

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
      .def("stats", [](PyGuest& p) { return p.g().stats(); })
      .def("verify", [](PyGuest& p) { return p.g().verify(); }, py::call_guard<py::gil_scoped_release>())
      .def("check_increment", [](PyGuest& p) { return p.g().check_increment(); },
           py::call_guard<py::gil_scoped_release>())
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
            const BufferExport st(state, BufferExport::Access::read, "state");
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
        const BufferExport buf(region, BufferExport::Access::read, "region");
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
        py::gil_scoped_release rel;
        return check_increment(buf.data(), page_size, npages, ex);
      },
      py::arg("region"), py::arg("page_size"), py::arg("excepted") = py::none(),
      "The increment oracle over byte 0 of each page not marked non-zero in `excepted`.");
}

}  // namespace livemig::py_bindings
