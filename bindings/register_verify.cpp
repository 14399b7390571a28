// The generic oracle's pieces (docs/design.md rule 10): per-page digests of any buffer, computed in
// C++ with the GIL released, and the comparison of two digest tables.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "convert.hpp"
#include "livemig/base/digest.hpp"
#include "livemig/base/page_size.hpp"
#include "register.hpp"

namespace livemig::py_bindings {

void register_verify(py::module_& m) {
  m.def("system_page_size", &system_page_size, "This system's base page size in bytes.");
  m.attr("NO_DIGEST") = kNoDigest;
  m.def(
      "page_digests",
      [](const py::handle& region, std::size_t page_size) {
        const BufferExport buf(region, BufferExport::Access::read, "region");
        const std::size_t n = buf.pages(page_size);
        py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(n));
        std::uint64_t* o = out.mutable_data();
        {
          py::gil_scoped_release rel;
          page_digests(buf.data(), page_size, 0, n, o);
        }
        return out;
      },
      py::arg("region"), py::arg("page_size"), "A 64-bit digest of every page of `region` (never NO_DIGEST).");

  py::class_<DigestComparison>(m, "DigestComparison", "Two digest tables of one region, page by page.")
      .def_readonly("compared", &DigestComparison::compared)
      .def_readonly("excepted", &DigestComparison::excepted, "Pages skipped (in the exception set).")
      .def_readonly("mismatches", &DigestComparison::mismatches, "Pages whose digests differ, missing ones included.")
      .def_readonly("missing", &DigestComparison::missing, "Pages the second table holds nothing for.")
      .def_readonly("first_mismatches", &DigestComparison::first_mismatches, "The first few, ascending.");
  m.def(
      "compare_digests",
      [](const U64Array& expected, const U64Array& got, const std::optional<std::shared_ptr<PageBitmap>>& excepted) {
        if (expected.ndim() != 1 || got.ndim() != 1) throw py::value_error("digest tables must be 1-d");
        const PageBitmap* ex = excepted && *excepted ? excepted->get() : nullptr;
        const std::span<const std::uint64_t> a(expected.data(), static_cast<std::size_t>(expected.shape(0)));
        const std::span<const std::uint64_t> b(got.data(), static_cast<std::size_t>(got.shape(0)));
        if (a.size() != b.size())
          throw py::value_error("digest tables differ in size: " + std::to_string(a.size()) + " and " +
                                std::to_string(b.size()) + " pages");
        if (ex != nullptr && ex->size() != a.size())
          throw py::value_error("the exception set has " + std::to_string(ex->size()) + " pages, the tables " +
                                std::to_string(a.size()));
        py::gil_scoped_release rel;
        return compare_digests(a, b, ex);
      },
      py::arg("expected"), py::arg("got"), py::arg("excepted") = py::none(),
      "Compares the source's digests with the destination's, skipping pages set in `excepted`.");
}

}  // namespace livemig::py_bindings
