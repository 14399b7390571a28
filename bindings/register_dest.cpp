// Destination bindings: DestRegion (placement engine + fault thread) and the dest_bench
// submodule (raw baselines for bench/bench_dest.py). Arguments are converted under the GIL, which
// is released for anything that places pages, touches memory, waits or joins.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bitmap_args.hpp"
#include "livemig/dest_bench.hpp"
#include "livemig/dest_region.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using Runs = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

// An (n, 2) array of (first, count) rows as PageRanges.
std::vector<PageRange> to_runs(const Runs& a) {
  if (a.size() == 0) return {};
  if (a.ndim() != 2 || a.shape(1) != 2)
    throw py::value_error("runs must be an (n, 2) array of (first_page, count) rows");
  std::vector<PageRange> out(static_cast<std::size_t>(a.shape(0)));
  auto v = a.unchecked<2>();
  for (py::ssize_t i = 0; i < a.shape(0); ++i) out[static_cast<std::size_t>(i)] = {v(i, 0), v(i, 1)};
  return out;
}

py::array_t<std::uint64_t> from_runs(const std::vector<PageRange>& runs) {
  py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{2}});
  auto v = out.mutable_unchecked<2>();
  for (py::ssize_t i = 0; i < static_cast<py::ssize_t>(runs.size()); ++i) {
    v(i, 0) = runs[static_cast<std::size_t>(i)].first;
    v(i, 1) = runs[static_cast<std::size_t>(i)].npages;
  }
  return out;
}

// A contiguous buffer's pointer and whole-page count; ValueError when not a page multiple.
struct PagesArg {
  const std::uint8_t* ptr;
  std::size_t npages;
  std::size_t nbytes;
};

PagesArg pages_of(const py::buffer& data, std::size_t ps, bool writable = false) {
  const py::buffer_info info = data.request(writable);
  const bool contiguous = info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize);
  if (!contiguous) throw py::value_error("data must be a contiguous buffer");
  const auto n = static_cast<std::size_t>(info.size * info.itemsize);
  if (n % ps != 0)
    throw py::value_error("data must be a whole number of pages (" + std::to_string(ps) + " bytes), got " +
                          std::to_string(n) + " bytes");
  return {static_cast<const std::uint8_t*>(info.ptr), n / ps, n};
}

py::array_t<std::uint64_t> to_array(const std::vector<std::uint64_t>& v) {
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

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

void register_bench(py::module_& m) {
  auto b = m.def_submodule("dest_bench",
                           "Benchmark and test support: raw userfaultfd baselines, C++ touchers (not public API).");
  py::class_<dest_bench::RawCopy>(b, "RawCopy", "A plain UFFDIO_COPY loop over a registered region.")
      .def(py::init<std::size_t>(), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("run", &dest_bench::RawCopy::run, py::arg("run_pages"), py::call_guard<py::gil_scoped_release>(),
           "Seconds to fill the region, run_pages per ioctl; then drops it (not timed).")
      .def_property_readonly("nbytes", &dest_bench::RawCopy::bytes);
  b.def(
      "engine_place",
      [](DestRegion& r, const py::buffer& src, std::size_t run_pages) {
        const auto a = pages_of(src, r.page_bytes());
        if (a.npages < r.pages()) throw py::value_error("src must cover the region");
        if (run_pages == 0) throw py::value_error("run_pages must be > 0");
        py::gil_scoped_release rel;
        return dest_bench::engine_place(r, a.ptr, run_pages);
      },
      py::arg("region"), py::arg("src"), py::arg("run_pages"),
      "Seconds for DestRegion.place over the whole region, run_pages per call.");
  b.def(
      "staged_place",
      [](DestRegion& r, const py::buffer& wire, std::size_t run_pages, bool move) {
        const auto a = pages_of(wire, r.page_bytes());
        if (a.npages < r.pages()) throw py::value_error("wire must cover the region");
        if (run_pages == 0) throw py::value_error("run_pages must be > 0");
        dest_bench::StagedTimes t;
        {
          py::gil_scoped_release rel;
          t = dest_bench::staged_place(r, a.ptr, run_pages, move);
        }
        py::dict d;
        d["fill_s"] = t.fill_s;
        d["place_s"] = t.place_s;
        d["pages"] = t.pages;
        return d;
      },
      py::arg("region"), py::arg("wire"), py::arg("run_pages"), py::arg("move"),
      "memcpy each run into a staging buffer, then UFFDIO_COPY (move=False) or UFFDIO_MOVE it.");
  b.def(
      "place_move",
      [](DestRegion& r, std::uint64_t first, const py::buffer& staging) {
        const auto a = pages_of(staging, r.page_bytes(), true);
        py::gil_scoped_release rel;
        return r.place_move(first, a.npages, const_cast<std::uint8_t*>(a.ptr));
      },
      py::arg("region"), py::arg("first_page"), py::arg("staging"),
      "DestRegion.place_move from a writable, page-aligned anonymous staging buffer (pages leave it).");
  b.def(
      "touch_pages",
      [](DestRegion& r, std::size_t npages) {
        if (npages > r.pages()) throw py::index_error("npages past the region");
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = dest_bench::touch_pages(r.data(), npages);
        }
        return to_array(v);
      },
      py::arg("region"), py::arg("npages"), "Read one byte of each page in order; per-read latency in ns.");
  b.def(
      "touch_threads",
      [](DestRegion& r, const py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>& pages) {
        if (pages.ndim() != 2) throw py::value_error("pages must be a 2-d array (one row per thread)");
        const auto rows = static_cast<std::size_t>(pages.shape(0)), cols = static_cast<std::size_t>(pages.shape(1));
        const std::uint64_t* p = pages.data();
        for (std::size_t i = 0; i < rows * cols; ++i)
          if (p[i] >= r.pages()) throw py::index_error("page " + std::to_string(p[i]) + " out of range");
        std::vector<std::uint8_t> v;
        {
          py::gil_scoped_release rel;
          v = dest_bench::touch_threads(r.data(), p, rows, cols);
        }
        py::array_t<std::uint8_t> out({pages.shape(0), pages.shape(1)});
        std::copy(v.begin(), v.end(), out.mutable_data());
        return out;
      },
      py::arg("region"), py::arg("pages"),
      "One C++ thread per row reads byte 0 of each page in its row (faults block without the GIL).");
  b.def(
      "attach_loopback",
      [](DestRegion& r, const py::buffer& src) {
        const auto a = pages_of(src, r.page_bytes());
        if (a.npages < r.pages()) throw py::value_error("src must cover the region");
        r.set_request_sink(std::make_shared<dest_bench::LoopbackSink>(&r, a.ptr));
      },
      py::arg("region"), py::arg("src"), py::keep_alive<1, 2>(),
      "Serve requests at once on the fault thread by placing pages from src.");
  py::class_<dest_bench::RawHandler>(b, "RawHandler", "A minimal poll/read/UFFDIO_COPY fault handler.")
      .def(py::init<std::size_t>(), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def(
          "round_trips",
          [](dest_bench::RawHandler& h) {
            std::vector<std::uint64_t> v;
            {
              py::gil_scoped_release rel;
              v = h.round_trips();
            }
            return to_array(v);
          },
          "Touch every page once; per-fault latency in ns.")
      .def_property_readonly("pages", &dest_bench::RawHandler::pages);
}

}  // namespace

void register_dest(py::module_& m) {
  py::class_<DestRegion, std::shared_ptr<DestRegion>>(
      m, "DestRegion",
      "Destination region: received/requested bitmaps, userfaultfd placement and the fault thread.")
      .def(py::init([](std::size_t nbytes, bool memfd) {
             py::gil_scoped_release rel;
             return std::make_shared<DestRegion>(nbytes, memfd);
           }),
           py::arg("nbytes"), py::arg("memfd") = false)
      .def_static(
          "adopt",
          [](const py::buffer& buf) {
            const py::buffer_info info = buf.request(true);
            const auto n = static_cast<std::size_t>(info.size * info.itemsize);
            return std::make_shared<DestRegion>(info.ptr, n);
          },
          py::arg("buffer"), py::keep_alive<0, 1>(),
          "A region over a writable buffer (page aligned, page multiple) kept alive by the region.")
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
      .def("start_postcopy", &DestRegion::start_postcopy, py::call_guard<py::gil_scoped_release>())
      .def("stop", &DestRegion::stop, py::call_guard<py::gil_scoped_release>())
      .def(
          "place",
          [](DestRegion& r, std::uint64_t first, const py::buffer& data) {
            const auto a = pages_of(data, r.page_bytes());
            py::gil_scoped_release rel;
            return r.place(first, a.npages, a.ptr);
          },
          py::arg("first_page"), py::arg("data"))
      .def("place_zero", &DestRegion::place_zero, py::arg("first_page"), py::arg("npages"),
           py::call_guard<py::gil_scoped_release>())
      .def("place_fill", &DestRegion::place_fill, py::arg("first_page"), py::arg("npages"), py::arg("pattern"),
           py::call_guard<py::gil_scoped_release>())
      .def("mark_received", &DestRegion::mark_received, py::arg("first_page"), py::arg("npages"))
      .def(
          "set_local_fill",
          [](DestRegion& r, const Runs& runs, std::uint32_t value) {
            const auto v = to_runs(runs);
            py::gil_scoped_release rel;
            r.set_local_fill(v, value);
          },
          py::arg("runs"), py::arg("value"))
      .def(
          "discard",
          [](DestRegion& r, const Runs& runs) {
            const auto v = to_runs(runs);
            py::gil_scoped_release rel;
            return r.discard(v);
          },
          py::arg("runs"))
      .def("drain_requests", [](DestRegion& r) { return from_runs(r.queue().drain()); })
      .def(
          "wait_requests",
          [](DestRegion& r, double timeout) {
            py::gil_scoped_release rel;
            return r.queue().wait(static_cast<std::int64_t>(timeout * 1e9));
          },
          py::arg("timeout"))
      .def("counters",
           [](const DestRegion& r) {
             const DestCounters c = r.counters();
             py::dict d;
             d["faults"] = c.faults;
             d["requests"] = c.requests;
             d["requested_pages"] = c.requested_pages;
             d["placed"] = c.placed;
             d["zero"] = c.zero;
             d["local_fills"] = c.local_fills;
             d["filled"] = c.filled;
             d["duplicates"] = c.duplicates;
             d["eexist"] = c.eexist;
             d["eagain"] = c.eagain;
             d["removed"] = c.removed;
             d["discarded"] = c.discarded;
             d["stale_faults"] = c.stale_faults;
             d["errors"] = c.errors;
             return d;
           })
      .def("latency",
           [](const DestRegion& r) {
             const auto& h = r.latency();
             const auto b = h.buckets();
             py::dict d;
             d["buckets"] = to_array(std::vector<std::uint64_t>(b.begin(), b.end()));
             d["count"] = h.count();
             d["p50_us"] = h.quantile_us(0.5);
             d["p99_us"] = h.quantile_us(0.99);
             d["max_us"] = h.max_us();
             d["blocked_us"] = h.blocked_us();
             return d;
           })
      .def("reset_latency", [](DestRegion& r) { r.latency().reset(); });
  register_bench(m);
}

}  // namespace livemig::py_bindings
