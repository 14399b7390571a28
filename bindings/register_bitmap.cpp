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

#include "bitmap_args.hpp"
#include "livemig/page_bitmap.hpp"
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

// Benchmark support: `threads` threads each do `ops` test_and_set calls over the same page
// sequence (so they contend on every word) and the bits are cleared again between passes; returns
// the seconds taken. With plain = true the same loop uses a non-atomic read-modify-write of a
// private copy: the baseline that shows what atomicity costs.
double bench_test_and_set(PageBitmap& b, int threads, std::size_t ops, bool plain) {
  const std::size_t n = b.size();
  if (n == 0 || threads < 1) throw py::value_error("need a non-empty bitmap and threads >= 1");
  std::vector<std::thread> ts;
  std::vector<std::vector<PageBitmap::Word>> privates(static_cast<std::size_t>(threads),
                                                      std::vector<PageBitmap::Word>(b.word_count()));
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      auto& mine = privates[static_cast<std::size_t>(t)];
      std::size_t won = 0;
      for (std::size_t k = 0; k < ops; ++k) {
        const std::size_t i = (k * 64 + k / (n / 64 == 0 ? 1 : n / 64)) % n;  // walks words, then bits
        if (plain) {
          PageBitmap::Word& w = mine[i / 64];
          const PageBitmap::Word bit = PageBitmap::Word{1} << (i % 64);
          won += (w & bit) == 0;
          w |= bit;
        } else {
          won += !b.test_and_set(i);
        }
      }
      mine[0] += won;  // keep the work observable
    });
  }
  for (auto& th : ts) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Benchmark support: walks every set (or clear) page with find_next and returns how many it found.
std::size_t bench_find_walk(const PageBitmap& b, bool set) {
  std::size_t hits = 0;
  const auto next = [&](std::size_t from) { return set ? b.find_next_set(from) : b.find_next_clear(from); };
  for (std::size_t i = next(0); i != PageBitmap::npos; i = next(i + 1)) ++hits;
  return hits;
}

// Benchmark support: the raw cost of one locked exchange per word over `words` words that are all
// non-zero (the floor of a dense harvest's 8-byte path; the x86 path takes pairs with cmpxchg16b);
// returns seconds.
double bench_exchange_loop(std::size_t words) {
  std::vector<std::atomic<PageBitmap::Word>> a(words);
  std::vector<PageBitmap::Word> out(words);
  for (auto& w : a) w.store(~PageBitmap::Word{0}, std::memory_order_relaxed);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < words; ++i) out[i] = a[i].exchange(0, std::memory_order_acq_rel);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out[words / 2] == 0 ? -1.0 : secs;
}

CountKernel kernel_named(const std::string& name) {
  if (name == "auto") return CountKernel::kAuto;
  if (name == "scalar") return CountKernel::kScalar;
  if (name == "avx2") return CountKernel::kAvx2;
  if (name == "avx512") return CountKernel::kAvx512;
  throw py::value_error("unknown count kernel '" + name + "' (auto, scalar, avx2, avx512)");
}

}  // namespace

py::array_t<PageBitmap::Word> words_view(const std::shared_ptr<PageBitmap>& bm, py::handle owner) {
  py::array_t<PageBitmap::Word> arr({static_cast<py::ssize_t>(bm->word_count())}, {sizeof(PageBitmap::Word)},
                                    bm->raw_words(), owner);
  py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return arr;
}

void register_bitmap(py::module_& m) {
  m.def("_bench_exchange_loop", &bench_exchange_loop, py::arg("words"), py::call_guard<py::gil_scoped_release>(),
        "Benchmark support: seconds for one locked exchange per word over `words` words.");
  m.def(
      "_bitmap_count_with",
      [](const PageBitmap& b, py::ssize_t start, py::ssize_t end, const std::string& kernel) {
        const auto r = check_range(b, start, end);
        const CountKernel k = kernel_named(kernel);
        py::gil_scoped_release rel;
        return b.count_with(r.begin, r.end, k);
      },
      py::arg("bitmap"), py::arg("start"), py::arg("end"), py::arg("kernel"),
      "Test support: count(start, end) with a given kernel (scalar where this CPU or build lacks it).");
  m.def(
      "_bitmap_kernel_available", [](const std::string& kernel) { return PageBitmap::kernel_available(kernel_named(kernel)); },
      py::arg("kernel"), "Test support: whether _bitmap_count_with really runs `kernel` here.");
  m.def("_bench_find_walk", &bench_find_walk, py::arg("bitmap"), py::arg("set") = true,
        py::call_guard<py::gil_scoped_release>(), "Benchmark support: count pages by walking find_next.");
  m.def("_bench_test_and_set", &bench_test_and_set, py::arg("bitmap"), py::arg("threads"), py::arg("ops"),
        py::arg("plain") = false, py::call_guard<py::gil_scoped_release>(),
        "Benchmark support: seconds for `threads` threads doing `ops` test_and_set calls each.");

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
          [](PageBitmap& b, const py::buffer& data) {
            const py::buffer_info info = data.request();
            const auto n = static_cast<std::size_t>(info.size * info.itemsize);
            if (n != b.byte_size())
              throw py::value_error("expected " + std::to_string(b.byte_size()) + " bytes for " +
                                    std::to_string(b.size()) + " pages, got " + std::to_string(n));
            bool ok = false;
            {
              py::gil_scoped_release rel;
              ok = b.import_bytes({static_cast<const std::uint8_t*>(info.ptr), n});
            }
            if (!ok) throw py::value_error("bits set past the end of the bitmap");
          },
          py::arg("data"), "Replace the contents with to_bytes() output of a bitmap of the same size.")
      .def_static(
          "from_bytes",
          [](py::ssize_t size, const py::buffer& data) {
            if (size < 0) throw py::value_error("size must be >= 0");
            auto b = std::make_shared<PageBitmap>(static_cast<std::size_t>(size));
            py::cast(b).attr("load_bytes")(data);
            return b;
          },
          py::arg("size"), py::arg("data"), "A new bitmap of `size` pages from to_bytes() output.");
}

}  // namespace livemig::py_bindings
