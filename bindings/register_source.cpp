// Source bindings: the Source region with its dirty tracking, the hint sink and the page scanner;
// plus _core._source_bench, raw baselines for bench/bench_source.py and C++ writer threads for the
// tests. Arguments are checked under the GIL; anything that walks the region or blocks releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bitmap_args.hpp"
#include "livemig/source.hpp"
#include "livemig/source_bench.hpp"
#include "livemig/zero_page.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using U64Array = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

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

std::uint32_t check_cmd_id(std::int64_t id) {
  if (id < 0 || id > 0xFFFFFFFFLL) throw py::value_error("command id must fit in 32 bits, got " + std::to_string(id));
  return static_cast<std::uint32_t>(id);
}

py::array_t<std::uint64_t> ranges_array(const RangeList& ranges) {
  py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(ranges.size()), py::ssize_t{2}});
  auto v = out.mutable_unchecked<2>();
  for (py::ssize_t k = 0; k < static_cast<py::ssize_t>(ranges.size()); ++k) {
    v(k, 0) = ranges[static_cast<std::size_t>(k)].first;
    v(k, 1) = ranges[static_cast<std::size_t>(k)].npages;
  }
  return out;
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

// A writable, C-contiguous byte view of a Python buffer, for adopt().
py::buffer_info writable_bytes(const py::buffer& buf) {
  py::buffer_info info = buf.request(true);
  if (info.readonly) throw py::value_error("the buffer must be writable");
  return info;
}

void register_hint_sink(py::module_& m) {
  py::class_<HintSink>(m, "HintSink",
                       "Host side of virtio-balloon free page hinting. Every guest-side method is lock-free "
                       "and releases the GIL.")
      .def("host_request", [](HintSink& s, std::int64_t id) { s.host_request(check_cmd_id(id)); }, py::arg("cmd_id"),
           py::call_guard<py::gil_scoped_release>(), "New round: the device shows cmd_id, state REQUESTED.")
      .def("host_stop", &HintSink::host_stop, py::call_guard<py::gil_scoped_release>(),
           "The device shows STOP; hints are dropped from now (in-flight ones finish first).")
      .def("host_done", &HintSink::host_done, py::call_guard<py::gil_scoped_release>(),
           "The device shows DONE: the guest may reuse its hinted pages.")
      .def_property_readonly("cmd_id", &HintSink::cmd_id)
      .def_property_readonly(
          "state", [](const HintSink& s) { return static_cast<int>(s.state()); },
          "The device state as an int: 0 STOP, 1 REQUESTED, 2 START, 3 DONE (livemig.balloon.BalloonState).")
      .def("guest_ack", [](HintSink& s, std::int64_t id) { return s.guest_ack(check_cmd_id(id)); }, py::arg("cmd_id"),
           "The guest echoes cmd_id: REQUESTED -> START when current.")
      .def(
          "hint",
          [](HintSink& s, std::int64_t id, std::uint64_t first, std::uint64_t n) {
            const std::uint32_t cid = check_cmd_id(id);
            py::gil_scoped_release rel;
            return s.hint(cid, first, n);
          },
          py::arg("cmd_id"), py::arg("first_page"), py::arg("npages") = 1,
          "Hint [first_page, first_page + npages) free; True when applied, False when dropped (counted).")
      .def("guest_stop", [](HintSink& s, std::int64_t id) { return s.guest_stop(check_cmd_id(id)); },
           py::arg("cmd_id"), "The guest ends its round: START -> STOP when cmd_id is current.")
      .def(
          "counters",
          [](const HintSink& s) {
            const HintCounters c = s.counters();
            py::dict d;
            d["hints_accepted"] = c.hints_accepted;
            d["pages_hinted"] = c.pages_hinted;
            d["hints_dropped_stale"] = c.hints_dropped_stale;
            d["hints_dropped_invalid"] = c.hints_dropped_invalid;
            d["hints_failed"] = c.hints_failed;
            return d;
          },
          "The hint counters as a dict.");
  m.attr("CMD_STOP") = kCmdStop;
  m.attr("CMD_DONE") = kCmdDone;
  m.attr("CMD_FIRST") = kCmdFirst;
  m.def("next_cmd_id", [](std::int64_t id) { return next_cmd_id(check_cmd_id(id)); }, py::arg("cmd_id"),
        "The round id after cmd_id (wraps from 0xFFFFFFFF to 0x80000000).");
}

void register_source_class(py::module_& m) {
  py::class_<Source, std::shared_ptr<Source>>(m, "Source",
                                               "Source side of a migration: region, dirty tracking, D/S/H bitmaps, "
                                               "hint sink, page scanner.")
      .def(py::init([](py::ssize_t pages, const std::string& mode, const std::string& backing) {
             if (pages <= 0) throw py::value_error("pages must be > 0, got " + std::to_string(pages));
             const TrackMode md = parse_mode(mode);
             const Backing bk = parse_backing(backing);
             py::gil_scoped_release rel;
             return std::make_shared<Source>(static_cast<std::size_t>(pages), md, bk);
           }),
           py::arg("pages"), py::arg("mode") = "kernel", py::arg("backing") = "anonymous")
      .def_static(
          "adopt",
          [](const py::buffer& buf, const std::string& mode) {
            const py::buffer_info info = writable_bytes(buf);
            const auto nbytes = static_cast<std::size_t>(info.size * info.itemsize);
            if (nbytes == 0 || nbytes % page_size() != 0)
              throw py::value_error("the buffer must be a non-empty whole number of pages, got " + std::to_string(nbytes) +
                                    " bytes");
            const TrackMode md = parse_mode(mode);
            auto* base = static_cast<std::uint8_t*>(info.ptr);
            Source* raw = nullptr;
            {
              py::gil_scoped_release rel;
              raw = new Source(base, nbytes / page_size(), md);
            }
            // The Source keeps the buffer's owner alive; the deleter may run without the GIL.
            PyObject* owner = buf.ptr();
            Py_INCREF(owner);
            return std::shared_ptr<Source>(raw, [owner](Source* s) {
              delete s;
              py::gil_scoped_acquire gil;
              Py_DECREF(owner);
            });
          },
          py::arg("buffer"), py::arg("mode") = "kernel",
          "Track an existing writable, page-aligned buffer (e.g. an mmap.mmap); it is kept alive.")
      .def_property_readonly("pages", &Source::pages)
      .def_property_readonly("nbytes", &Source::bytes)
      .def_property_readonly("address", [](const Source& s) { return reinterpret_cast<std::uintptr_t>(s.data()); })
      .def_property_readonly("memfd", &Source::memfd)
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
      .def_property_readonly("hints", &Source::hints, py::return_value_policy::reference_internal)
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
          "switchover_sets",
          [](const Source& s) {
            SwitchoverSets sets;
            {
              py::gil_scoped_release rel;
              sets = s.switchover_sets();
            }
            return py::make_tuple(ranges_array(sets.discard), ranges_array(sets.local_fill));
          },
          "(discard, local_fill) as (n, 2) uint64 arrays of (first page, npages): D&S and H&~D&~S.")
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
            return is_zero(s.data() + i * page_size(), page_size());
          },
          py::arg("page"), "True when the page is all zero bytes.")
      .def(
          "counters",
          [](Source& s) {
            const SyncCounters sc = s.sync_counters();
            const ScannerCounters c = s.scanner().counters();
            py::dict d;
            d["syncs"] = sc.syncs;
            d["pages_written"] = sc.pages_written;
            d["requests"] = c.requests;
            d["request_pages_served"] = c.request_pages_served;
            d["request_pages_dropped"] = c.request_pages_dropped;
            d["requests_invalid"] = c.requests_invalid;
            d["background_pages"] = c.background_pages;
            d["pages_put_back"] = c.pages_put_back;
            d["scan_calls"] = s.tracker().scan_calls();
            return d;
          },
          "Sync and scanner counters as a dict.");
}

void register_bench(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "_source_bench", "Raw baselines for bench/bench_source.py and C++ writer threads for tests. Takes raw "
                       "addresses: for tests and benchmarks only.");
  m.def(
      "pagemap_scan_loop",
      [](std::uintptr_t addr, std::size_t len, std::size_t vec_len) {
        py::gil_scoped_release rel;
        return bench::pagemap_scan_loop(reinterpret_cast<const void*>(addr), len, vec_len);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("vec_len") = 1024);
  m.def(
      "pagemap_reset_chunks",
      [](std::uintptr_t addr, std::size_t len, std::size_t chunk_pages) {
        if (chunk_pages == 0) throw py::value_error("chunk_pages must be > 0");
        py::gil_scoped_release rel;
        return bench::pagemap_reset_chunks(reinterpret_cast<const void*>(addr), len, chunk_pages);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("chunk_pages"));
  m.def(
      "read_bandwidth",
      [](std::uintptr_t addr, std::size_t len) {
        py::gil_scoped_release rel;
        return bench::read_bandwidth(reinterpret_cast<const void*>(addr), len);
      },
      py::arg("address"), py::arg("nbytes"));
  m.def(
      "touch_pages",
      [](std::uintptr_t addr, std::size_t npages, std::size_t stride, std::uint8_t value) {
        if (stride == 0) throw py::value_error("stride must be > 0");
        py::gil_scoped_release rel;
        bench::touch_pages(reinterpret_cast<void*>(addr), npages, stride, value);
      },
      py::arg("address"), py::arg("npages"), py::arg("stride") = 1, py::arg("value") = 1);
  m.def(
      "count_zero_pages",
      [](std::uintptr_t addr, std::size_t npages) {
        py::gil_scoped_release rel;
        return bench::count_zero_pages(reinterpret_cast<const void*>(addr), npages);
      },
      py::arg("address"), py::arg("npages"));
  m.def(
      "touch_pages_marked",
      [](Source& src, std::size_t stride, std::uint8_t value) {
        if (stride == 0) throw py::value_error("stride must be > 0");
        py::gil_scoped_release rel;
        auto* b = reinterpret_cast<volatile std::uint8_t*>(src.data());
        for (std::size_t i = 0; i < src.pages(); i += stride) {
          b[i * page_size()] = value;
          src.mark_written(i, 1);
        }
      },
      py::arg("source"), py::arg("stride") = 1, py::arg("value") = 1,
      "The explicit-mode writer: touch_pages, marking each page written after the store.");
  m.def("is_zero_impl", &is_zero_impl, "The zero-page detector in use: avx512, avx2 or scalar.");
  m.def(
      "hint_loop",
      [](HintSink& sink, std::int64_t id, std::uint64_t first, std::uint64_t npages_per_hint, std::uint64_t count) {
        const std::uint32_t cid = check_cmd_id(id);
        if (npages_per_hint == 0 || first >= sink.pages() || npages_per_hint > sink.pages() - first)
          throw py::value_error("hints must fit in the region");
        py::gil_scoped_release rel;
        std::uint64_t accepted = 0;
        std::uint64_t page = first;
        for (std::uint64_t k = 0; k < count; ++k) {
          if (page + npages_per_hint > sink.pages()) page = first;  // wrap, no division per hint
          accepted += sink.hint(cid, page, npages_per_hint) ? 1 : 0;
          page += npages_per_hint;
        }
        return accepted;
      },
      py::arg("sink"), py::arg("cmd_id"), py::arg("first_page"), py::arg("npages_per_hint"), py::arg("count"),
      "count hints of npages_per_hint pages cycling over [first_page, end); returns how many were accepted.");
  m.def(
      "write_pages_threads",
      [](std::uintptr_t addr, const U64Array& pages, int nthreads, std::uint8_t value) {
        if (nthreads <= 0) throw py::value_error("nthreads must be > 0");
        if (pages.ndim() != 1) throw py::value_error("pages must be 1-d");
        std::vector<std::uint64_t> list(pages.data(), pages.data() + pages.shape(0));
        py::gil_scoped_release rel;
        std::vector<std::thread> ts;
        for (int t = 0; t < nthreads; ++t) {
          ts.emplace_back([&, t] {
            auto* base = reinterpret_cast<volatile std::uint8_t*>(addr);
            for (std::size_t k = static_cast<std::size_t>(t); k < list.size(); k += static_cast<std::size_t>(nthreads))
              base[list[k] * page_size() + (k % page_size())] = value;
          });
        }
        for (auto& th : ts) th.join();
      },
      py::arg("address"), py::arg("pages"), py::arg("nthreads"), py::arg("value") = 1,
      "C++ threads each store `value` into their share of `pages` (one byte per page).");
}

}  // namespace

void register_source(py::module_& m) {
  register_hint_sink(m);
  register_source_class(m);
  register_bench(m);
}

}  // namespace livemig::py_bindings
