// Destination bindings: DestRegion (the placement engine and the fault thread). Arguments are
// converted under the GIL, which is released for anything that places pages, touches memory, waits or
// joins; a buffer handed in stays exported while the core uses it.
#include <pybind11/numpy.h>
#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "convert.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/dest/region.hpp"
#include "register.hpp"

namespace livemig::py_bindings {
namespace {

const char* state_name(DestRegion::State s) {
  switch (s) {
    case DestRegion::State::precopy:
      return "precopy";
    case DestRegion::State::postcopy:
      return "postcopy";
    case DestRegion::State::stopped:
      return "stopped";
  }
  return "?";
}

// The three postcopy latency histograms, copied at one moment.
struct FaultLatencies {
  LatencySnapshot fault, request, blocked;
};

// The bucket bounds of every LatencyHistogram, in us (constant).
py::array_t<double> bucket_bounds_us(bool upper) {
  std::vector<double> v(LatencyHistogram::kBuckets);
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = static_cast<double>(LatencyHistogram::lower_ns(i) + (upper ? LatencyHistogram::width_ns(i) : 0)) / 1e3;
  return to_array(v);
}

void register_counters(py::module_& m) {
  py::class_<DestCounters>(m, "DestCounters", "The destination's counters, in pages unless named otherwise.")
      .def(py::self == py::self)
      .def_readonly("faults", &DestCounters::faults, "Fault events read (one per faulting thread and page).")
      .def_readonly("requests", &DestCounters::requests, "Requests sent (one per run of adjacent pages).")
      .def_readonly("requested_pages", &DestCounters::requested_pages)
      .def_readonly("placed", &DestCounters::placed, "Pages placed with data.")
      .def_readonly("zero", &DestCounters::zero, "Pages placed as zero pages.")
      .def_readonly("local_fills", &DestCounters::local_fills, "Faults resolved here from the local-fill set.")
      .def_readonly("filled", &DestCounters::filled, "Pages placed with a non-zero fill pattern.")
      .def_readonly("duplicates", &DestCounters::duplicates, "Pages dropped because already received.")
      .def_readonly("eexist", &DestCounters::eexist, "Pages the kernel already had (EEXIST).")
      .def_readonly("eagain", &DestCounters::eagain, "Placement retries after EAGAIN.")
      .def_readonly("removed", &DestCounters::removed, "Received pages dropped by REMOVE/UNMAP events.")
      .def_readonly("discarded", &DestCounters::discarded, "Received pages dropped by discard().")
      .def_readonly("stale_faults", &DestCounters::stale_faults, "Faults on pages placed meanwhile (only woken).")
      .def_readonly("errors", &DestCounters::errors, "Errors caught on the fault thread.")
      .def_readonly("placed_twice", &DestCounters::placed_twice,
                    "Postcopy placements of a page already placed in this postcopy (rule 1: never).");
  py::class_<LatencySnapshot>(
      m, "LatencySnapshot",
      "One postcopy latency measure: a log-linear histogram (buckets at most 1/64 of their value wide) and its quantiles.")
      .def_property_readonly(
          "buckets", [](const LatencySnapshot& s) { return to_array(s.buckets); },
          "Samples per bucket; bucket i holds [lower_us[i], upper_us[i]) (the last also holds longer ones).")
      .def_property_readonly_static("lower_us", [](py::object) { return bucket_bounds_us(false); },
                                    "Each bucket's lower bound in us (the same for every snapshot).")
      .def_property_readonly_static("upper_us", [](py::object) { return bucket_bounds_us(true); },
                                    "Each bucket's upper bound (exclusive) in us.")
      .def_readonly("count", &LatencySnapshot::count, "Samples.")
      .def_property_readonly("sum_us", &LatencySnapshot::sum_us, "The samples summed (for blocked: total time blocked).")
      .def_property_readonly("max_us", &LatencySnapshot::max_us, "The longest sample (exact).")
      .def_readonly("over_1ms", &LatencySnapshot::over_1ms, "Samples longer than 1 ms (exact).")
      .def_readonly("over_10ms", &LatencySnapshot::over_10ms, "Samples longer than 10 ms (exact).")
      .def("quantile_us", &LatencySnapshot::quantile_us, py::arg("q"),
           "The value at quantile q (0 < q <= 1): its bucket's middle, at most max_us; 0 when empty.")
      .def_property_readonly("p50_us", [](const LatencySnapshot& s) { return s.quantile_us(0.5); })
      .def_property_readonly("p90_us", [](const LatencySnapshot& s) { return s.quantile_us(0.9); })
      .def_property_readonly("p99_us", [](const LatencySnapshot& s) { return s.quantile_us(0.99); })
      .def_property_readonly("p999_us", [](const LatencySnapshot& s) { return s.quantile_us(0.999); });
  py::class_<FaultLatencies>(m, "FaultLatencies", "The destination's three postcopy latency measures, copied at once.")
      .def_readonly("fault", &FaultLatencies::fault, "Fault event read to its page placed (one sample per page).")
      .def_readonly("request", &FaultLatencies::request, "Request sent to the page placed (one sample per requested page).")
      .def_readonly("blocked", &FaultLatencies::blocked,
                    "Faulting thread blocked: fault event read to its wake (one sample per fault event).");
  py::class_<PrefaultStats>(m, "PrefaultStats", "What the destination's prefault did (dest/prefault.hpp).")
      .def_readonly("threads", &PrefaultStats::threads, "Threads the calibration chose (0 before it ended).")
      .def_readonly("added_threads", &PrefaultStats::added_threads,
                    "Threads added later because the receivers caught up with the prefault.")
      .def_readonly("tried", &PrefaultStats::tried, "Thread counts the calibration tried, in order.")
      .def_readonly("tried_gbps", &PrefaultStats::tried_gbps, "The populate rate each reached, GB/s.")
      .def_readonly("lead_pages", &PrefaultStats::lead_pages, "Distance ahead of the receivers a jump lands, pages.")
      .def_readonly("populated_pages", &PrefaultStats::populated_pages, "Pages the prefault populated.")
      .def_readonly("skipped_pages", &PrefaultStats::skipped_pages,
                    "Pages the receivers reached first (once finished; 0 before).")
      .def_readonly("jumps", &PrefaultStats::jumps, "Times a thread jumped ahead of the receivers.")
      .def_readonly("dropped_pages", &PrefaultStats::dropped_pages,
                    "Populated pages made missing again before postcopy (not received).")
      .def_readonly("seconds", &PrefaultStats::seconds, "From the start until the last chunk (or the stop).")
      .def_readonly("finished", &PrefaultStats::finished, "Every chunk was populated or skipped.")
      .def_readonly("stopped", &PrefaultStats::stopped, "Stopped before or after finishing.")
      .def_readonly("failed", &PrefaultStats::failed, "The kernel refused MADV_POPULATE_WRITE.");
}

}  // namespace

void register_dest(py::module_& m) {
  register_counters(m);
  py::class_<DestRegion, std::shared_ptr<DestRegion>>(
      m, "DestRegion",
      "Destination region: received/requested bitmaps, userfaultfd placement and the fault thread.")
      .def(py::init([](std::size_t nbytes, bool memfd, std::size_t page_size) {
             py::gil_scoped_release rel;
             return std::make_shared<DestRegion>(nbytes, memfd, page_size);
           }),
           py::arg("nbytes"), py::arg("memfd") = false, py::arg("page_size") = system_page_size())
      .def_static(
          "adopt",
          [](const py::handle& buf, std::size_t page_size) {
            auto exported = BufferExport::shared(buf, BufferExport::Access::write, "the buffer");
            exported->pages(page_size);
            exported->require_page_aligned(page_size);
            auto made = std::make_unique<DestRegion>(exported->data(), exported->size(), page_size);
            return holding_export(made.release(), std::move(exported));
          },
          py::arg("buffer"), py::arg("page_size") = system_page_size(),
          "A region over a writable, page-aligned buffer; it stays exported (it cannot be closed or resized) "
          "for as long as the region lives.")
      .def_property_readonly("nbytes", &DestRegion::bytes)
      .def_property_readonly("pages", &DestRegion::pages)
      .def_property_readonly("page_size", &DestRegion::page_bytes)
      .def_property_readonly("memfd", &DestRegion::is_memfd)
      .def_property_readonly("state", [](const DestRegion& r) { return state_name(r.state()); })
      .def_property_readonly("received", &DestRegion::received)
      .def_property_readonly("requested", &DestRegion::requested)
      .def_property_readonly("local_fill", &DestRegion::local_fill)
      .def_property_readonly("local_fill_value", &DestRegion::local_fill_value)
      .def_property_readonly("uffd_features", &DestRegion::uffd_features)
      .def_property_readonly("last_error", &DestRegion::last_error)
      .def(
          "memory",
          [](py::object self) {
            auto& r = self.cast<DestRegion&>();
            return py::array_t<std::uint8_t>({static_cast<py::ssize_t>(r.bytes())}, {py::ssize_t{1}}, r.data(), self);
          },
          "A zero-copy, writable uint8 view of the region (reading a missing page in postcopy blocks).")
      .def(
          "start_prefault",
          [](DestRegion& r, unsigned max_threads, std::size_t chunk_bytes) {
            py::gil_scoped_release rel;
            r.start_prefault(PrefaultOptions{max_threads, chunk_bytes});
          },
          py::arg("max_threads") = 0, py::arg("chunk_bytes") = 0,
          "Populates the region ahead of the precopy receivers from C++ threads (0: choose by measuring).")
      .def("stop_prefault", &DestRegion::stop_prefault, py::call_guard<py::gil_scoped_release>())
      .def("settle_prefault", &DestRegion::settle_prefault, py::call_guard<py::gil_scoped_release>(),
           "Stops the prefault and makes every populated page not received missing again; returns them.")
      .def("prefault_stats", &DestRegion::prefault_stats, py::call_guard<py::gil_scoped_release>())
      .def("start_postcopy", &DestRegion::start_postcopy, py::call_guard<py::gil_scoped_release>())
      .def("stop", &DestRegion::stop, py::call_guard<py::gil_scoped_release>())
      .def(
          "place",
          [](DestRegion& r, std::uint64_t first, const py::handle& data) {
            const BufferExport src(data, BufferExport::Access::read, "data");  // exported until placed
            const std::size_t n = src.pages(r.page_bytes());
            py::gil_scoped_release rel;
            return r.place(first, n, src.data());
          },
          py::arg("first_page"), py::arg("data"), "Places the whole pages of `data` at first_page; returns pages placed.")
      .def("place_zero", &DestRegion::place_zero, py::arg("first_page"), py::arg("npages"),
           py::call_guard<py::gil_scoped_release>())
      .def("place_fill", &DestRegion::place_fill, py::arg("first_page"), py::arg("npages"), py::arg("pattern"),
           py::call_guard<py::gil_scoped_release>())
      .def("mark_received", &DestRegion::mark_received, py::arg("first_page"), py::arg("npages"))
      .def(
          "set_local_fill",
          [](DestRegion& r, const py::handle& runs, std::uint32_t value) {
            const auto v = to_ranges(runs, r.pages());
            py::gil_scoped_release rel;
            r.set_local_fill(v, value);
          },
          py::arg("runs"), py::arg("value"))
      .def(
          "discard",
          [](DestRegion& r, const py::handle& runs) {
            const auto v = to_ranges(runs, r.pages());
            py::gil_scoped_release rel;
            return r.discard(v);
          },
          py::arg("runs"))
      .def("drain_requests", [](DestRegion& r) { return ranges_array(r.queue().drain()); })
      .def(
          "wait_requests",
          [](DestRegion& r, double timeout) {
            py::gil_scoped_release rel;
            return r.queue().wait(static_cast<std::int64_t>(timeout * 1e9));
          },
          py::arg("timeout"))
      .def("counters", &DestRegion::counters)
      .def("enable_digests", &DestRegion::enable_digests, py::call_guard<py::gil_scoped_release>(),
           "Keep a digest of every page as it is placed (the generic oracle); before anything is placed.")
      .def_property_readonly(
          "digests",
          [](py::object self) -> py::object {
            const auto d = self.cast<DestRegion&>().digests();
            if (d.empty()) return py::none();
            return readonly_view(d.data(), d.size(), self);
          },
          "Per-page digests of what placement put there (0: nothing), a read-only view; None when off.")
      .def("latency",
           [](const DestRegion& r) {
             return FaultLatencies{r.latency(LatencyMeasure::fault).snapshot(),
                                   r.latency(LatencyMeasure::request).snapshot(),
                                   r.latency(LatencyMeasure::blocked).snapshot()};
           })
      .def("reset_latency", &DestRegion::reset_latency);
}

}  // namespace livemig::py_bindings
