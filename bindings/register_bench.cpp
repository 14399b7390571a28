// livemig._core._bench: benchmark loops and raw baselines (cpp/src/bench, their own library), for
// bench/ and `livemig bench`. One private submodule, one naming scheme: <area>_<what>. Not public
// API; arguments are still checked, and every loop runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "livemig/base/page_size.hpp"
#include "livemig/base/zero_page.hpp"
#include "livemig/bench/bitmap.hpp"
#include "livemig/bench/dest.hpp"
#include "livemig/bench/source.hpp"
#include "livemig/bench/wire.hpp"
#include "livemig/dest/region.hpp"
#include "livemig/source/source.hpp"
#include "register.hpp"

namespace livemig::py_bindings {
namespace {

using BA = BufferExport::Access;

CountKernel kernel_named(const std::string& name) {
  if (name == "auto") return CountKernel::kAuto;
  if (name == "scalar") return CountKernel::kScalar;
  if (name == "avx2") return CountKernel::kAvx2;
  if (name == "avx512") return CountKernel::kAvx512;
  throw py::value_error("unknown count kernel '" + name + "' (auto, scalar, avx2, avx512)");
}

void bitmap(py::module_& b) {
  b.def(
      "bitmap_test_and_set",
      [](PageBitmap& bm, int threads, std::size_t ops, bool plain) {
        if (bm.size() == 0 || threads < 1) throw py::value_error("need a non-empty bitmap and threads >= 1");
        py::gil_scoped_release rel;
        return bench::bitmap::test_and_set(bm, threads, ops, plain);
      },
      py::arg("bitmap"), py::arg("threads"), py::arg("ops"), py::arg("plain") = false,
      "Seconds for `threads` threads doing `ops` test_and_set calls each (plain: a non-atomic RMW).");
  b.def(
      "bitmap_race_claims",
      [](PageBitmap& bm, int threads, int rounds, bool split_rmw) {
        if (bm.size() == 0 || threads < 2 || rounds < 1)
          throw py::value_error("need a non-empty bitmap, threads >= 2 and rounds >= 1");
        std::vector<std::uint32_t> won;
        {
          py::gil_scoped_release rel;
          won = bench::bitmap::race_claims(bm, threads, rounds, split_rmw);
        }
        py::array_t<std::uint32_t> out(static_cast<py::ssize_t>(won.size()));
        std::copy(won.begin(), won.end(), out.mutable_data());
        return out;
      },
      py::arg("bitmap"), py::arg("threads"), py::arg("rounds"), py::arg("split_rmw") = false,
      "Per page, how many claims won it over `rounds` rounds of `threads` C++ threads racing "
      "test_and_set (split_rmw: a load and a store instead, the broken implementation the race "
      "test must catch).");
  b.def("bitmap_find_walk", &bench::bitmap::find_walk, py::arg("bitmap"), py::arg("set") = true,
        py::call_guard<py::gil_scoped_release>(), "Pages counted by walking find_next.");
  b.def("bitmap_exchange_loop", &bench::bitmap::exchange_loop, py::arg("words"),
        py::call_guard<py::gil_scoped_release>(), "Seconds for one locked exchange per word over `words` words.");
  b.def(
      "bitmap_count_with",
      [](const PageBitmap& bm, py::ssize_t start, py::ssize_t end, const std::string& kernel) {
        const auto r = check_range(bm, start, end);
        const CountKernel k = kernel_named(kernel);
        py::gil_scoped_release rel;
        return bm.count_with(r.begin, r.end, k);
      },
      py::arg("bitmap"), py::arg("start"), py::arg("end"), py::arg("kernel"),
      "count(start, end) with a given kernel (scalar where this CPU or build lacks it).");
  b.def(
      "bitmap_kernel_available", [](const std::string& kernel) { return PageBitmap::kernel_available(kernel_named(kernel)); },
      py::arg("kernel"), "Whether bitmap_count_with really runs `kernel` here.");
}

void dest(py::module_& b) {
  py::class_<bench::dest::StagedTimes>(b, "DestStagedTimes", "A staged receive's two halves.")
      .def_readonly("fill_s", &bench::dest::StagedTimes::fill_s, "Seconds copying into the staging buffer.")
      .def_readonly("place_s", &bench::dest::StagedTimes::place_s, "Seconds placing (UFFDIO_COPY or MOVE).")
      .def_readonly("pages", &bench::dest::StagedTimes::pages);
  py::class_<bench::dest::RawCopy>(b, "DestRawCopy", "A plain UFFDIO_COPY loop over a registered region.")
      .def(py::init<std::size_t>(), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("run", &bench::dest::RawCopy::run, py::arg("run_pages"), py::call_guard<py::gil_scoped_release>(),
           "Seconds to fill the region, run_pages per ioctl; then drops it (not timed).")
      .def_property_readonly("nbytes", &bench::dest::RawCopy::bytes);
  py::class_<bench::dest::RawHandler>(b, "DestRawHandler", "A minimal poll/read/UFFDIO_COPY fault handler.")
      .def(py::init<std::size_t>(), py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def(
          "round_trips",
          [](bench::dest::RawHandler& h) {
            std::vector<std::uint64_t> v;
            {
              py::gil_scoped_release rel;
              v = h.round_trips();
            }
            return to_array(v);
          },
          "Touch every page once; per-fault latency in ns.")
      .def_property_readonly("pages", &bench::dest::RawHandler::pages);
  b.def(
      "dest_engine_place",
      [](DestRegion& r, const py::handle& src, std::size_t run_pages) {
        const BufferExport a(src, BA::read, "src");
        if (a.pages(r.page_bytes()) < r.pages()) throw py::value_error("src must cover the region");
        if (run_pages == 0) throw py::value_error("run_pages must be > 0");
        py::gil_scoped_release rel;
        return bench::dest::engine_place(r, a.data(), run_pages);
      },
      py::arg("region"), py::arg("src"), py::arg("run_pages"),
      "Seconds for DestRegion.place over the whole region, run_pages per call.");
  b.def(
      "dest_staged_place",
      [](DestRegion& r, const py::handle& wire, std::size_t run_pages, bool move) {
        const BufferExport a(wire, BA::read, "wire");
        if (a.pages(r.page_bytes()) < r.pages()) throw py::value_error("wire must cover the region");
        if (run_pages == 0) throw py::value_error("run_pages must be > 0");
        py::gil_scoped_release rel;
        return bench::dest::staged_place(r, a.data(), run_pages, move);
      },
      py::arg("region"), py::arg("wire"), py::arg("run_pages"), py::arg("move"),
      "memcpy each run into a staging buffer, then UFFDIO_COPY or UFFDIO_MOVE it.");
  b.def(
      "dest_place_move",
      [](DestRegion& r, std::uint64_t first, const py::handle& staging) {
        const BufferExport a(staging, BA::write, "staging");
        const std::size_t n = a.pages(r.page_bytes());
        py::gil_scoped_release rel;
        return r.place_move(first, n, a.data());
      },
      py::arg("region"), py::arg("first_page"), py::arg("staging"),
      "DestRegion.place_move from a writable, page-aligned anonymous staging buffer (pages leave it).");
  b.def(
      "dest_touch_pages",
      [](DestRegion& r, std::size_t npages) {
        if (npages > r.pages()) throw py::index_error("npages past the region");
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = bench::dest::touch_pages(r.data(), npages);
        }
        return to_array(v);
      },
      py::arg("region"), py::arg("npages"), "Read one byte of each page in order; per-read latency in ns.");
  b.def(
      "dest_touch_threads",
      [](DestRegion& r, const U64Array& pages) {
        if (pages.ndim() != 2) throw py::value_error("pages must be a 2-d array (one row per thread)");
        const auto rows = static_cast<std::size_t>(pages.shape(0)), cols = static_cast<std::size_t>(pages.shape(1));
        const std::uint64_t* p = pages.data();
        for (std::size_t i = 0; i < rows * cols; ++i)
          if (p[i] >= r.pages()) throw py::index_error("page " + std::to_string(p[i]) + " out of range");
        std::vector<std::uint8_t> v;
        {
          py::gil_scoped_release rel;
          v = bench::dest::touch_threads(r.data(), p, rows, cols);
        }
        py::array_t<std::uint8_t> out({pages.shape(0), pages.shape(1)});
        if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size());
        return out;
      },
      py::arg("region"), py::arg("pages"),
      "One C++ thread per row reads byte 0 of each page in its row (faults block without the GIL).");
  b.def(
      "dest_attach_loopback",
      [](DestRegion& r, const py::handle& src) {
        auto exported = BufferExport::shared(src, BA::read, "src");
        if (exported->pages(r.page_bytes()) < r.pages()) throw py::value_error("src must cover the region");
        // The sink keeps the export for as long as the region may call it.
        struct Holding final : RequestSink {
          Holding(DestRegion* region, std::shared_ptr<BufferExport> e)
              : exp(std::move(e)), sink(region, exp->data()) {}
          void request(std::uint64_t first, std::uint32_t n) noexcept override { sink.request(first, n); }
          std::shared_ptr<BufferExport> exp;
          bench::dest::LoopbackSink sink;
        };
        r.set_request_sink(std::make_shared<Holding>(&r, std::move(exported)));
      },
      py::arg("region"), py::arg("src"), "Serve requests at once on the fault thread by placing pages from src.");
}

void source(py::module_& b) {
  b.def(
      "source_pagemap_scan_loop",
      [](std::uintptr_t addr, std::size_t len, std::size_t vec_len) {
        py::gil_scoped_release rel;
        return bench::source::pagemap_scan_loop(reinterpret_cast<const void*>(addr), len, vec_len);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("vec_len") = 1024,
      "The bare harvest: PAGEMAP_SCAN with WP matching over the range; the written pages found.");
  b.def(
      "source_pagemap_reset_chunks",
      [](std::uintptr_t addr, std::size_t len, std::size_t chunk_pages) {
        if (chunk_pages == 0) throw py::value_error("chunk_pages must be > 0");
        py::gil_scoped_release rel;
        return bench::source::pagemap_reset_chunks(reinterpret_cast<const void*>(addr), len, chunk_pages);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("chunk_pages"));
  b.def(
      "source_read_bandwidth",
      [](std::uintptr_t addr, std::size_t len) {
        py::gil_scoped_release rel;
        return bench::source::read_bandwidth(reinterpret_cast<const void*>(addr), len);
      },
      py::arg("address"), py::arg("nbytes"));
  b.def(
      "source_touch_pages",
      [](std::uintptr_t addr, std::size_t npages, std::size_t stride, std::uint8_t value) {
        if (stride == 0) throw py::value_error("stride must be > 0");
        py::gil_scoped_release rel;
        bench::source::touch_pages(reinterpret_cast<void*>(addr), npages, stride, value);
      },
      py::arg("address"), py::arg("npages"), py::arg("stride") = 1, py::arg("value") = 1);
  b.def(
      "source_count_zero_pages",
      [](std::uintptr_t addr, std::size_t npages) {
        py::gil_scoped_release rel;
        return bench::source::count_zero_pages(reinterpret_cast<const void*>(addr), npages);
      },
      py::arg("address"), py::arg("npages"));
  b.def(
      "source_touch_pages_marked",
      [](Source& src, std::size_t stride, std::uint8_t value) {
        if (stride == 0) throw py::value_error("stride must be > 0");
        py::gil_scoped_release rel;
        auto* p = reinterpret_cast<volatile std::uint8_t*>(src.data());
        for (std::size_t i = 0; i < src.pages(); i += stride) {
          p[i * src.page_size()] = value;
          src.mark_written(i, 1);
        }
      },
      py::arg("source"), py::arg("stride") = 1, py::arg("value") = 1,
      "The explicit-mode writer: touch pages, marking each page written after the store.");
  b.def("source_is_zero_impl", &is_zero_impl, "The zero-page detector in use: avx512, avx2 or scalar.");
  b.def(
      "source_hint_loop",
      [](balloon::Device& dev, std::int64_t id, std::uint64_t first, std::uint64_t npages_per_hint, std::uint64_t count) {
        const std::uint32_t cid = check_cmd_id(id);
        if (npages_per_hint == 0 || first >= dev.pages() || npages_per_hint > dev.pages() - first)
          throw py::value_error("hints must fit in the region");
        py::gil_scoped_release rel;
        std::uint64_t accepted = 0;
        std::uint64_t page = first;
        for (std::uint64_t k = 0; k < count; ++k) {
          if (page + npages_per_hint > dev.pages()) page = first;  // wrap, no division per hint
          accepted += dev.hint(cid, page, npages_per_hint) ? 1 : 0;
          page += npages_per_hint;
        }
        return accepted;
      },
      py::arg("device"), py::arg("cmd_id"), py::arg("first_page"), py::arg("npages_per_hint"), py::arg("count"),
      "count hints of npages_per_hint pages cycling over [first_page, end); returns how many were accepted.");
  b.def(
      "source_write_pages_threads",
      [](std::uintptr_t addr, const U64Array& pages, int nthreads, std::uint8_t value) {
        if (nthreads <= 0) throw py::value_error("nthreads must be > 0");
        if (pages.ndim() != 1) throw py::value_error("pages must be 1-d");
        std::vector<std::uint64_t> list(pages.data(), pages.data() + pages.shape(0));
        const std::size_t ps = system_page_size();
        py::gil_scoped_release rel;
        std::vector<std::thread> ts;
        for (int t = 0; t < nthreads; ++t) {
          ts.emplace_back([&, t] {
            auto* base = reinterpret_cast<volatile std::uint8_t*>(addr);
            for (std::size_t k = static_cast<std::size_t>(t); k < list.size(); k += static_cast<std::size_t>(nthreads))
              base[list[k] * ps + (k % ps)] = value;
          });
        }
        for (auto& th : ts) th.join();
      },
      py::arg("address"), py::arg("pages"), py::arg("nthreads"), py::arg("value") = 1,
      "C++ threads each store `value` into their share of `pages` (one byte per page).");
}

void wire(py::module_& b) {
  b.def(
      "wire_raw_send",
      [](int fd, const py::handle& data, std::size_t chunk) {
        const BufferExport d(data, BA::read, "data");
        py::gil_scoped_release rel;
        return bench::wire::raw_send(fd, d.data(), d.size(), chunk);
      },
      py::arg("fd"), py::arg("data"), py::arg("chunk") = std::size_t{1} << 20);
  b.def(
      "wire_raw_recv",
      [](int fd, const py::handle& data, std::size_t chunk) {
        const BufferExport d(data, BA::write, "data");
        py::gil_scoped_release rel;
        return bench::wire::raw_recv(fd, d.data(), d.size(), chunk);
      },
      py::arg("fd"), py::arg("data"), py::arg("chunk") = std::size_t{1} << 20);
  auto raw_region = [](const std::optional<py::object>& region, std::size_t page_size,
                       std::unique_ptr<BufferExport>& keep) {
    bench::wire::RawRegion r;
    if (!region || region->is_none()) return r;
    keep = std::make_unique<BufferExport>(*region, BA::write, "region");
    if (page_size == 0) throw py::value_error("page_size must be > 0");
    r.base = keep->data();
    r.page_size = page_size;
    r.pages = keep->size() / page_size;
    if (r.pages == 0) throw py::value_error("region holds no page");
    return r;
  };
  b.def(
      "wire_raw_pingpong_client",
      [raw_region](int fd, std::size_t request, std::size_t reply, std::size_t iters,
                   const std::optional<py::object>& region, std::size_t page_size, int reply_fd) {
        std::unique_ptr<BufferExport> keep;
        const auto r = raw_region(region, page_size, keep);
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = bench::wire::raw_pingpong_client(fd, request, reply, iters, r, reply_fd);
        }
        return to_array(v);
      },
      py::arg("fd"), py::arg("request"), py::arg("reply"), py::arg("iters"), py::arg("region") = py::none(),
      py::arg("page_size") = 4096, py::arg("reply_fd") = -1);
  b.def(
      "wire_raw_pingpong_server",
      [raw_region](int fd, std::size_t request, std::size_t reply, const std::optional<py::object>& region,
                   std::size_t page_size, int reply_fd) {
        std::unique_ptr<BufferExport> keep;
        const auto r = raw_region(region, page_size, keep);
        py::gil_scoped_release rel;
        return bench::wire::raw_pingpong_server(fd, request, reply, r, reply_fd);
      },
      py::arg("fd"), py::arg("request"), py::arg("reply"), py::arg("region") = py::none(),
      py::arg("page_size") = 4096, py::arg("reply_fd") = -1);
  b.def(
      "wire_request_client",
      [](int ret_fd, int urgent_fd, const livemig::wire::WireConfig& cfg, const py::handle& region, std::size_t iters) {
        const BufferExport r(region, BA::write, "region");
        if (r.size() < cfg.region_pages * cfg.page_size) throw py::value_error("region smaller than the config's region");
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = bench::wire::request_client(ret_fd, urgent_fd, cfg, r.data(), iters);
        }
        return to_array(v);
      },
      py::arg("ret_fd"), py::arg("urgent_fd"), py::arg("config"), py::arg("region"), py::arg("iters"));
  b.def(
      "wire_request_server",
      [](int ret_fd, int urgent_fd, const livemig::wire::WireConfig& cfg, const py::handle& region) {
        const BufferExport r(region, BA::read, "region");
        if (r.size() < cfg.region_pages * cfg.page_size) throw py::value_error("region smaller than the config's region");
        py::gil_scoped_release rel;
        return bench::wire::request_server(ret_fd, urgent_fd, cfg, r.data());
      },
      py::arg("ret_fd"), py::arg("urgent_fd"), py::arg("config"), py::arg("region"));
}

}  // namespace

void register_bench(py::module_& m) {
  auto b = m.def_submodule("_bench", "Benchmark loops and raw baselines (not public API).");
  bitmap(b);
  dest(b);
  source(b);
  wire(b);
}

}  // namespace livemig::py_bindings
