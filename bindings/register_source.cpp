// Source bindings: the Source region with its dirty tracking, its balloon device and the page
// scanner. Arguments are checked under the GIL; anything that walks the region or blocks releases it.
// An adopted buffer stays exported for the Source's whole life.
#include <pybind11/native_enum.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "livemig/base/timeline.hpp"
#include "livemig/source/source.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/base/zero_page.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

// The switchover sets as Python sees them: (n, 2) arrays of (first_page, npages).
struct PySwitchoverSets {
  py::array_t<std::uint64_t> discard;
  py::array_t<std::uint64_t> local_fill;
};

TrackMode parse_mode(const std::string& mode) {
  if (mode == "kernel") return TrackMode::Kernel;
  if (mode == "explicit") return TrackMode::Explicit;
  throw py::value_error("mode must be 'kernel' or 'explicit', got '" + mode + "'");
}

Backing parse_backing(const std::string& backing) {
  if (backing == "anonymous") return Backing::Anonymous;
  if (backing == "memfd") return Backing::Memfd;
  throw py::value_error("backing must be 'anonymous' or 'memfd', got '" + backing + "'");
}

py::array_t<std::uint64_t> runs_array(const std::vector<PageRun>& runs) {
  py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{3}});
  auto v = out.mutable_unchecked<2>();
  for (py::ssize_t k = 0; k < static_cast<py::ssize_t>(runs.size()); ++k) {
    const PageRun& r = runs[static_cast<std::size_t>(k)];
    v(k, 0) = r.first;
    v(k, 1) = r.npages;
    v(k, 2) = r.flags;
  }
  return out;
}

std::vector<PageRun> runs_from_array(const U64Array& a, std::size_t pages) {
  if (a.ndim() != 2 || a.shape(1) != 3) throw py::value_error("runs must be an (n, 3) array as next_batch returns");
  auto v = a.unchecked<2>();
  std::vector<PageRun> runs;
  runs.reserve(static_cast<std::size_t>(a.shape(0)));
  for (py::ssize_t k = 0; k < a.shape(0); ++k) {
    const std::uint64_t first = v(k, 0), n = v(k, 1), flags = v(k, 2);
    if (n == 0 || first >= pages || n > pages - first)
      throw py::index_error("run (" + std::to_string(first) + ", " + std::to_string(n) + ") outside the region");
    if (flags > 7) throw py::value_error("unknown run flags " + std::to_string(flags));
    runs.push_back(PageRun{first, n, static_cast<std::uint8_t>(flags)});
  }
  return runs;
}

void register_counters(py::module_& m) {
  py::class_<PySwitchoverSets>(m, "SwitchoverSets", "What the destination drops and what it may fill itself.")
      .def_readonly("discard", &PySwitchoverSets::discard, "Pages dirty and sent: dropped before the guest runs (rule 3).")
      .def_readonly("local_fill", &PySwitchoverSets::local_fill,
                    "Pages hinted, clean and never sent: filled on the destination (rule 4).");
  py::class_<SyncCounters>(m, "SyncCounters", "Dirty syncs.")
      .def_readonly("syncs", &SyncCounters::syncs)
      .def_readonly("pages_written", &SyncCounters::pages_written, "Pages found written, summed over syncs.");
  py::class_<ScannerCounters>(m, "ScannerCounters", "The page scanner: requests and the background scan.")
      .def_readonly("requests", &ScannerCounters::requests)
      .def_readonly("request_pages_served", &ScannerCounters::request_pages_served)
      .def_readonly("request_pages_dropped", &ScannerCounters::request_pages_dropped,
                    "Requested pages already delivered (rule 2).")
      .def_readonly("requests_invalid", &ScannerCounters::requests_invalid)
      .def_readonly("background_pages", &ScannerCounters::background_pages)
      .def_readonly("pages_put_back", &ScannerCounters::pages_put_back, "Pages a failed send put back (rule 7).");
  py::class_<SourceCounters>(m, "SourceCounters", "Everything the source counts.")
      .def_readonly("sync", &SourceCounters::sync)
      .def_readonly("scanner", &SourceCounters::scanner)
      .def_readonly("scan_calls", &SourceCounters::scan_calls, "PAGEMAP_SCAN calls made by syncs.");
}

void register_timeline(py::module_& m) {
  py::native_enum<Timeline::Series>(m, "TimelineSeries", "enum.IntEnum", "What a timeline series counts.")
      .value("REQUESTS", Timeline::kRequests, "Page requests from the destination (served or queued).")
      .value("REQUEST_PAGES", Timeline::kRequestPages, "Pages taken to answer requests.")
      .value("PUSH_PAGES", Timeline::kPushPages, "Pages taken by the background scan.")
      .value("LEFT_PAGES", Timeline::kLeftPages, "A level: dirty pages still to send, sampled once per bin.")
      .finalize();
  py::class_<Timeline, std::shared_ptr<Timeline>>(
      m, "Timeline", "What the source's scanner does, in bins of fixed width from start(): lock-free counts.")
      .def(py::init<double, std::size_t>(), py::arg("bin_seconds"), py::arg("bins"))
      .def("start", &Timeline::start, "Starts the clock now (a second call is ignored).")
      .def("add", &Timeline::add, py::arg("series"), py::arg("n"), "Adds n to a count series in the current bin.")
      .def(
          "series",
          [](const Timeline& t, Timeline::Series s) {
            if (s >= Timeline::kSeries) throw py::value_error("no such timeline series");
            return to_array(t.series(s));
          },
          py::arg("series"), "The series bin by bin, up to the last bin used (a uint64 array).")
      .def(
          "total",
          [](const Timeline& t, Timeline::Series s) {
            if (s >= Timeline::kSeries) throw py::value_error("no such timeline series");
            return t.total(s);
          },
          py::arg("series"), "Everything added so far (a level: its latest sample); lock-free.")
      .def_property_readonly("bin_seconds", &Timeline::bin_seconds)
      .def_property_readonly("capacity", &Timeline::capacity, "Bins it holds.")
      .def_property_readonly("started_at", &Timeline::started_at,
                             "When start() ran, in time.perf_counter() seconds (0 before).")
      .def_property_readonly("overflowed", &Timeline::overflowed, "Something landed past the last bin.");
}

void register_source_class(py::module_& m) {
  py::class_<Source, std::shared_ptr<Source>>(m, "Source",
                                               "Source side of a migration: region, dirty tracking, D/S/H bitmaps, "
                                               "hint sink, page scanner.")
      .def(py::init([](py::ssize_t pages, const std::string& mode, const std::string& backing, std::size_t page_size) {
             if (pages <= 0) throw py::value_error("pages must be > 0, got " + std::to_string(pages));
             const TrackMode md = parse_mode(mode);
             const Backing bk = parse_backing(backing);
             py::gil_scoped_release rel;
             return std::make_shared<Source>(static_cast<std::size_t>(pages), md, bk, page_size);
           }),
           py::arg("pages"), py::arg("mode") = "kernel", py::arg("backing") = "anonymous",
           py::arg("page_size") = system_page_size())
      .def_static(
          "adopt",
          [](const py::handle& buf, const std::string& mode, std::size_t page_size) {
            auto exported = BufferExport::shared(buf, BufferExport::Access::write, "the buffer");
            const std::size_t npages = exported->pages(page_size);
            exported->require_page_aligned(page_size);
            const TrackMode md = parse_mode(mode);
            std::unique_ptr<Source> made;
            {
              py::gil_scoped_release rel;
              made = std::make_unique<Source>(exported->data(), npages, md, page_size);
            }
            return holding_export(made.release(), std::move(exported));
          },
          py::arg("buffer"), py::arg("mode") = "kernel", py::arg("page_size") = system_page_size(),
          "Track an existing writable, page-aligned buffer (an mmap.mmap, a numpy array over one); it stays "
          "exported (it cannot be closed or resized) for as long as the Source lives.")
      .def_property_readonly("pages", &Source::pages)
      .def_property_readonly("page_size", &Source::page_size)
      .def_property_readonly("nbytes", &Source::bytes)
      .def_property_readonly("address", [](const Source& s) { return reinterpret_cast<std::uintptr_t>(s.data()); })
      .def_property_readonly("memfd", &Source::memfd)
      .def_property_readonly("hole_pages", &Source::hole_pages,
                             "Pages of another process's memfd found to be holes and sent as ZERO runs unread.")
      .def_property_readonly("mode", [](const Source& s) { return s.mode() == TrackMode::Kernel ? "kernel" : "explicit"; })
      .def_property_readonly(
          "memory",
          [](py::object self) {
            auto& s = self.cast<Source&>();
            return py::array_t<std::uint8_t>({static_cast<py::ssize_t>(s.bytes())}, {py::ssize_t{1}}, s.data(), self);
          },
          "The region as a writable uint8 numpy view (no copy).")
      .def_property_readonly("dirty", [](const Source& s) { return s.dirty(); }, "D: pages to (re)send.")
      .def_property_readonly("sent", [](const Source& s) { return s.sent(); }, "S: pages the destination holds.")
      .def_property_readonly("hinted", [](const Source& s) { return s.hinted(); }, "H: pages hinted free, unwritten since.")
      .def_property_readonly(
          "hint_target",
          [](const std::shared_ptr<Source>& s) { return std::shared_ptr<balloon::HintTarget>(s, &s->hint_sink()); },
          "Where a workload's balloon device sends accepted hints (BalloonDevice.set_target): D and H. "
          "It keeps the Source alive.")
      .def("stop_tracking", &Source::stop_tracking, py::call_guard<py::gil_scoped_release>(),
           "End dirty tracking now: the memory is ordinary again (its write protection dropped).")
      .def("sync", &Source::sync, py::call_guard<py::gil_scoped_release>(),
           "Fold writes since the last sync into D (clearing their H bits); returns the pages written.")
      .def(
          "mark_written",
          [](Source& s, py::ssize_t first, py::ssize_t n) {
            const auto r = check_page_range(s.pages(), first, first + n);
            s.mark_written(r.begin, r.end - r.begin);
          },
          py::arg("first_page"), py::arg("npages") = 1, "Explicit mode: record a write to the pages.")
      .def(
          "mark_written_runs",
          [](Source& s, const py::handle& runs) {
            const auto v = to_ranges(runs, s.pages());
            py::gil_scoped_release rel;
            for (const auto& r : v) s.mark_written(r.first, r.npages);
          },
          py::arg("runs"), "Explicit mode: record writes to (first_page, npages) rows, in one call.")
      .def(
          "switchover_sets",
          [](const Source& s) {
            SwitchoverSets sets;
            {
              py::gil_scoped_release rel;
              sets = s.switchover_sets();
            }
            return PySwitchoverSets{ranges_array(sets.discard), ranges_array(sets.local_fill)};
          },
          "With the guest stopped and a final sync done: the discard set (D&S) and the local-fill set (H&~D&~S).")
      .def(
          "take_stale_sent",
          [](Source& s) {
            RangeList stale;
            {
              py::gil_scoped_release rel;
              stale = s.take_stale_sent();
            }
            return ranges_array(stale);
          },
          "Pages sent and dirty again (D&S) as an (n, 2) array of runs, with S cleared for them "
          "(for a discard ahead of switchover).")
      .def("dirty_hinted_unsent", &Source::dirty_hinted_unsent, py::call_guard<py::gil_scoped_release>(),
           "D |= H & ~S (for a peer without local fill); returns the pages newly dirty.")
      .def(
          "resync_with_received",
          [](Source& s, const PageBitmap& received, bool local_fill) {
            if (received.size() != s.pages())
              throw py::value_error("received bitmap has " + std::to_string(received.size()) + " pages, the region " +
                                    std::to_string(s.pages()));
            py::gil_scoped_release rel;
            return s.resync_with_received(received, local_fill);
          },
          py::arg("received"), py::arg("local_fill"),
          "Recovery: pages not received become dirty and unsent again (hinted-local ones kept when "
          "local_fill); returns how many.")
      .def(
          "request",
          [](Source& s, std::uint64_t first, std::uint64_t n) {
            py::gil_scoped_release rel;
            return s.scanner().request(first, n);
          },
          py::arg("first_page"), py::arg("npages") = 1, "Queue an urgent request; False (counted) if outside the region.")
      .def(
          "wait_for_request",
          [](Source& s, double timeout) {
            if (!(timeout >= 0)) throw py::value_error("timeout must be >= 0 seconds");
            py::gil_scoped_release rel;
            return s.scanner().wait_for_request(std::chrono::microseconds(static_cast<std::int64_t>(timeout * 1e6)));
          },
          py::arg("timeout"), "Block (GIL released) until a request is queued or timeout seconds pass.")
      .def("wake", [](Source& s) { s.scanner().wake(); }, "Wake every wait_for_request.")
      .def_property_readonly("pending_requests", [](Source& s) { return s.scanner().pending_requests(); })
      .def_property(
          "cursor", [](Source& s) { return s.scanner().cursor(); },
          [](Source& s, py::ssize_t p) { s.scanner().set_cursor(check_page(s.pages(), p)); })
      .def(
          "next_batch",
          [](Source& s, py::ssize_t max_pages) {
            if (max_pages < 0) throw py::value_error("max_pages must be >= 0");
            std::vector<PageRun> runs;
            {
              py::gil_scoped_release rel;
              s.scanner().next_batch(static_cast<std::size_t>(max_pages), runs);
            }
            return runs_array(runs);
          },
          py::arg("max_pages"),
          "Take up to max_pages pages to send: an (n, 3) uint64 array of (first, npages, flags); flags bit 0 "
          "urgent, bit 1 dirty taken, bit 2 sent bit was clear.")
      .def(
          "send_failed",
          [](Source& s, const U64Array& runs) {
            const std::vector<PageRun> v = runs_from_array(runs, s.pages());
            s.scanner().send_failed(v);
          },
          py::arg("runs"), "Put back the takes of runs (as next_batch returned them) whose send failed.")
      .def(
          "is_zero",
          [](const Source& s, py::ssize_t p) {
            const std::size_t i = check_page(s.pages(), p);
            return is_zero(s.data() + i * s.page_size(), s.page_size());
          },
          py::arg("page"), "True when the page is all zero bytes.")
      .def("counters", &Source::counters, "The sync, scanner and balloon counters.")
      .def("set_timeline", &Source::set_timeline, py::arg("timeline"),
           "Count the scanner's requests and takes into timeline from now on (once per Source).")
      .def_property_readonly("timeline", [](const Source& s) { return s.timeline(); });
}

}  // namespace

void register_source(py::module_& m) {
  register_counters(m);
  register_timeline(m);
  register_source_class(m);
}

}  // namespace livemig::py_bindings
