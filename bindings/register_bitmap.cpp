// PageBitmap bindings: check arguments under the GIL, then release it for anything that walks
// many words.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using Words = py::array_t<PageBitmap::Word, py::array::c_style>;

std::optional<std::size_t> to_opt(std::size_t pos) {
  if (pos == PageBitmap::npos) return std::nullopt;
  return pos;
}

void check_same_size(const PageBitmap& a, const PageBitmap& b) {
  if (a.size() != b.size())
    throw py::value_error("bitmaps differ in size: " + std::to_string(a.size()) + " and " +
                          std::to_string(b.size()) + " pages");
}

}  // namespace

void register_bitmap(py::module_& m) {
  py::class_<PageBitmap, std::shared_ptr<PageBitmap>>(m, "PageBitmap",
                                                      "One bit per page; every mutation is atomic and lock-free.")
      .def(py::init([](py::ssize_t size, bool fill) {
             if (size < 0) throw py::value_error("size must be >= 0, got " + std::to_string(size));
             py::gil_scoped_release release;
             return std::make_shared<PageBitmap>(static_cast<std::size_t>(size), fill);
           }),
           py::arg("size"), py::arg("fill") = false)
      .def_property_readonly("size", &PageBitmap::size)
      .def_property_readonly("nbytes", &PageBitmap::byte_size)
      .def("__len__", &PageBitmap::size)
      .def("__repr__",
           [](const PageBitmap& b) {
             return "PageBitmap(size=" + std::to_string(b.size()) + ", set=" + std::to_string(b.count()) + ")";
           })
      .def(
          "test", [](const PageBitmap& b, py::ssize_t i) { return b.test(check_index(b, i)); }, py::arg("page"))
      .def(
          "set", [](PageBitmap& b, py::ssize_t i) { b.set(check_index(b, i)); }, py::arg("page"))
      .def(
          "clear", [](PageBitmap& b, py::ssize_t i) { b.clear(check_index(b, i)); }, py::arg("page"))
      .def(
          "test_and_set", [](PageBitmap& b, py::ssize_t i) { return b.test_and_set(check_index(b, i)); },
          py::arg("page"))
      .def(
          "test_and_clear", [](PageBitmap& b, py::ssize_t i) { return b.test_and_clear(check_index(b, i)); },
          py::arg("page"))
      .def(
          "set_range",
          [](PageBitmap& b, py::ssize_t start, py::ssize_t end) {
            const auto r = check_range(b, start, end);
            ReleaseIfLarge rel(r);
            b.set_range(r.begin, r.end);
          },
          py::arg("start"), py::arg("end"))
      .def(
          "clear_range",
          [](PageBitmap& b, py::ssize_t start, py::ssize_t end) {
            const auto r = check_range(b, start, end);
            ReleaseIfLarge rel(r);
            b.clear_range(r.begin, r.end);
          },
          py::arg("start"), py::arg("end"))
      .def(
          "count",
          [](const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
            const auto r = check_range(b, start, end);
            ReleaseIfLarge rel(r);
            return b.count(r.begin, r.end);
          },
          py::arg("start") = 0, py::arg("end") = py::none())
      .def(
          "find_next_set",
          [](const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
            const auto r = check_range(b, start, end);
            py::gil_scoped_release rel;
            return to_opt(b.find_next_set(r.begin, r.end));
          },
          py::arg("start") = 0, py::arg("end") = py::none(), "First set page in [start, end), or None.")
      .def(
          "find_next_clear",
          [](const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
            const auto r = check_range(b, start, end);
            py::gil_scoped_release rel;
            return to_opt(b.find_next_clear(r.begin, r.end));
          },
          py::arg("start") = 0, py::arg("end") = py::none(), "First clear page in [start, end), or None.")
      .def(
          "runs",
          [](const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
            const auto r = check_range(b, start, end);
            std::vector<std::pair<std::size_t, std::size_t>> runs;
            {
              py::gil_scoped_release rel;
              runs = b.runs(r.begin, r.end);
            }
            py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{2}});
            auto v = out.mutable_unchecked<2>();
            for (py::ssize_t k = 0; k < static_cast<py::ssize_t>(runs.size()); ++k) {
              v(k, 0) = runs[static_cast<std::size_t>(k)].first;
              v(k, 1) = runs[static_cast<std::size_t>(k)].second;
            }
            return out;
          },
          py::arg("start") = 0, py::arg("end") = py::none(),
          "Maximal runs of set pages in [start, end) as an (n, 2) uint64 array of (start, length).")
      .def(
          "nonzero",
          [](const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
            const auto r = check_range(b, start, end);
            std::size_t n = 0;
            {
              py::gil_scoped_release rel;
              n = b.count(r.begin, r.end);
            }
            py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(n));
            std::uint64_t* dst = out.mutable_data();
            std::size_t k = 0;
            {
              py::gil_scoped_release rel;
              // Bits set by other threads since the count are left out rather than overrun.
              b.for_each_set(r.begin, r.end, [&](std::size_t i) {
                if (k < n) dst[k++] = i;
              });
            }
            if (k < n) out.resize({static_cast<py::ssize_t>(k)});
            return out;
          },
          py::arg("start") = 0, py::arg("end") = py::none(),
          "The set pages in [start, end), ascending, as a uint64 array.")
      .def(
          "harvest",
          [](PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end, std::optional<Words> out) {
            const auto r = check_range(b, start, end);
            const std::size_t need = PageBitmap::words_spanned(r.begin, r.end);
            Words taken = out ? *out : Words(static_cast<py::ssize_t>(need));
            if (taken.ndim() != 1 || static_cast<std::size_t>(taken.shape(0)) < need)
              throw py::value_error("out must be a 1-d uint64 array of at least " + std::to_string(need) + " words");
            if (!taken.writeable()) throw py::value_error("out must be writeable");
            PageBitmap::Word* dst = taken.mutable_data();
            {
              ReleaseIfLarge rel(r);
              b.harvest(r.begin, r.end, {dst, need});
            }
            return taken;
          },
          py::arg("start") = 0, py::arg("end") = py::none(), py::arg("out") = py::none(),
          "Atomically take and clear [start, end). Returns the taken bits as uint64 words on the bitmap's\n"
          "word grid: word k holds the bits of word start // 64 + k that lie in the range.")
      .def(
          "merge",
          [](PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end, const Words& taken) {
            const auto r = check_range(b, start, end);
            const std::size_t need = PageBitmap::words_spanned(r.begin, r.end);
            if (taken.ndim() != 1 || static_cast<std::size_t>(taken.shape(0)) < need)
              throw py::value_error("taken must be a 1-d uint64 array of at least " + std::to_string(need) + " words");
            const PageBitmap::Word* src = taken.data();
            ReleaseIfLarge rel(r);
            b.merge(r.begin, r.end, {src, need});
          },
          py::arg("start"), py::arg("end"), py::arg("taken"),
          "OR bits returned by harvest(start, end) back in (for a failed send).")
      .def(
          "or_",
          [](PageBitmap& a, const PageBitmap& b) {
            check_same_size(a, b);
            py::gil_scoped_release rel;
            a.or_with(b);
          },
          py::arg("other"), "self |= other")
      .def(
          "and_not",
          [](PageBitmap& a, const PageBitmap& b) {
            check_same_size(a, b);
            py::gil_scoped_release rel;
            a.and_not(b);
          },
          py::arg("other"), "self &= ~other")
      .def(
          "and_",
          [](PageBitmap& a, const PageBitmap& b) {
            check_same_size(a, b);
            py::gil_scoped_release rel;
            a.and_with(b);
          },
          py::arg("other"), "self &= other")
      .def("complement", &PageBitmap::complement, py::call_guard<py::gil_scoped_release>(), "self = ~self")
      .def("fill", &PageBitmap::fill, py::call_guard<py::gil_scoped_release>(), "Set every page.")
      .def("reset", &PageBitmap::reset, py::call_guard<py::gil_scoped_release>(), "Clear every page.")
      .def_property_readonly(
          "words",
          [](py::object self) { return words_view(self.cast<std::shared_ptr<PageBitmap>>(), self); },
          "A zero-copy, read-only uint64 view of the words (page i is bit i % 64 of word i // 64).")
      .def(
          "set_runs",
          [](PageBitmap& b, const py::handle& runs) {
            const auto v = to_ranges(runs, b.size());
            py::gil_scoped_release rel;
            for (const auto& r : v) b.set_range(r.first, r.first + r.npages);
          },
          py::arg("runs"), "Set the pages of (first_page, npages) rows, in one call.")
      .def(
          "to_bytes",
          [](const PageBitmap& b) {
            py::bytes out(nullptr, b.byte_size());
            auto* p = reinterpret_cast<std::uint8_t*>(PyBytes_AsString(out.ptr()));
            {
              py::gil_scoped_release rel;
              b.export_bytes({p, b.byte_size()});
            }
            return out;
          },
          "Little-endian bytes, ceil(size / 8) of them: page i is bit i % 8 of byte i // 8.")
      .def(
          "load_bytes",
          [](PageBitmap& b, const py::handle& data) {
            const BufferExport buf(data, BufferExport::Access::read, "data");
            const std::size_t n = buf.size();
            if (n != b.byte_size())
              throw py::value_error("expected " + std::to_string(b.byte_size()) + " bytes for " +
                                    std::to_string(b.size()) + " pages, got " + std::to_string(n));
            bool ok = false;
            {
              py::gil_scoped_release rel;
              ok = b.import_bytes({buf.data(), n});
            }
            if (!ok) throw py::value_error("bits set past the end of the bitmap");
          },
          py::arg("data"), "Replace the contents with to_bytes() output of a bitmap of the same size.")
      .def_static(
          "from_bytes",
          [](py::ssize_t size, const py::handle& data) {
            if (size < 0) throw py::value_error("size must be >= 0");
            auto b = std::make_shared<PageBitmap>(static_cast<std::size_t>(size));
            py::cast(b).attr("load_bytes")(data);
            return b;
          },
          py::arg("size"), py::arg("data"), "A new bitmap of `size` pages from to_bytes() output.");
}

}  // namespace livemig::py_bindings
