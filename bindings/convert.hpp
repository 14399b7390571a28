// What every binding shares: argument checks (a page out of range is an IndexError, start > end a
// ValueError), page-run arrays, numpy results, and BufferExport, the one way a binding holds a
// Python buffer. Pure pybind11 glue: the core never includes this.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "livemig/base/page_range.hpp"
#include "livemig/bitmap/page_bitmap.hpp"

namespace livemig::py_bindings {

namespace py = pybind11;

// ---- buffers ----

/// A Python buffer held exported (its Py_buffer kept) for as long as this object lives: the
/// exporter cannot resize, close or free the memory meanwhile (mmap.close(), bytearray and numpy
/// resizes raise BufferError instead), so the core may use the pointer with the GIL released.
/// Construct and destroy with the GIL held; shared() makes one whose last owner may be a C++ thread.
class BufferExport {
 public:
  enum class Access { read, write };
  /// Exports `obj` as one C-contiguous run of bytes (`what` names it in errors): TypeError when it
  /// has no buffer protocol, ValueError when it is read-only (Access::write) or not contiguous.
  BufferExport(py::handle obj, Access access, const char* what) : what_(what) {
    if (PyObject_CheckBuffer(obj.ptr()) == 0)
      throw py::type_error(std::string(what) + " must support the buffer protocol (bytes, mmap, numpy array), got " +
                           std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    const int flags = access == Access::write ? PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE : PyBUF_C_CONTIGUOUS;
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      PyErr_Clear();
      if (access == Access::write && PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS) == 0) {
        PyBuffer_Release(&view_);
        throw py::value_error(std::string(what) + " is read-only; it must be writable");
      }
      PyErr_Clear();
      throw py::value_error(std::string(what) + " must be one contiguous run of bytes (C-contiguous)");
    }
  }
  BufferExport(const BufferExport&) = delete;
  BufferExport& operator=(const BufferExport&) = delete;
  ~BufferExport() { PyBuffer_Release(&view_); }

  std::uint8_t* data() const noexcept { return static_cast<std::uint8_t*>(view_.buf); }
  std::size_t size() const noexcept { return static_cast<std::size_t>(view_.len); }
  /// ValueError unless the buffer is a non-empty whole number of `page_size`-byte pages; returns them.
  std::size_t pages(std::size_t page_size) const {
    if (size() == 0 || size() % page_size != 0)
      throw py::value_error(std::string(what_) + " must be a non-empty whole number of " + std::to_string(page_size) +
                            "-byte pages, got " + std::to_string(size()) + " bytes");
    return size() / page_size;
  }
  /// ValueError unless the buffer starts on a `page_size` boundary.
  void require_page_aligned(std::size_t page_size) const {
    if (reinterpret_cast<std::uintptr_t>(data()) % page_size != 0)
      throw py::value_error(std::string(what_) + " must start on a page boundary (" + std::to_string(page_size) +
                            " bytes): use an mmap.mmap or a numpy array over one");
  }

  /// A shared export: when the last owner (maybe a C++ object dropped on a C++ thread) lets go, the
  /// GIL is taken to release it (skipped when the interpreter is already gone).
  static std::shared_ptr<BufferExport> shared(py::handle obj, Access access, const char* what) {
    return std::shared_ptr<BufferExport>(new BufferExport(obj, access, what), [](BufferExport* e) {
      if (Py_IsInitialized() == 0) return;  // finalizing: the memory goes with the process
      py::gil_scoped_acquire gil;
      delete e;
    });
  }

 private:
  Py_buffer view_{};
  const char* what_;
};

/// A core object that uses `exported` memory for its whole life: a shared_ptr that destroys the
/// object first, then lets the export go (under the GIL, whichever thread drops it last).
template <class T>
std::shared_ptr<T> holding_export(T* raw, std::shared_ptr<BufferExport> exported) {
  // The object goes first (it may still use the memory until its threads are joined), then the
  // export (whose own deleter takes the GIL).
  return std::shared_ptr<T>(raw, [exported = std::move(exported)](T* p) mutable {
    delete p;
    exported.reset();
  });
}

// ---- page indices and ranges ----

struct CheckedRange {
  std::size_t begin;
  std::size_t end;
};

/// i as a page index of a space of `size` pages; IndexError when out of range.
inline std::size_t check_page(std::size_t size, py::ssize_t i) {
  if (i < 0 || static_cast<std::size_t>(i) >= size)
    throw py::index_error("page " + std::to_string(i) + " out of range [0, " + std::to_string(size) + ")");
  return static_cast<std::size_t>(i);
}

inline std::size_t check_index(const PageBitmap& b, py::ssize_t i) { return check_page(b.size(), i); }

/// [start, end) within a space of `size` pages (end None means size); IndexError past the end,
/// ValueError when start > end.
inline CheckedRange check_page_range(std::size_t size, py::ssize_t start, std::optional<py::ssize_t> end) {
  const py::ssize_t e = end.value_or(static_cast<py::ssize_t>(size));
  if (start < 0 || e < 0 || static_cast<std::size_t>(start) > size || static_cast<std::size_t>(e) > size)
    throw py::index_error("range [" + std::to_string(start) + ", " + std::to_string(e) + ") out of range [0, " +
                          std::to_string(size) + ")");
  if (start > e) throw py::value_error("range start " + std::to_string(start) + " is past its end " + std::to_string(e));
  return {static_cast<std::size_t>(start), static_cast<std::size_t>(e)};
}

inline CheckedRange check_range(const PageBitmap& b, py::ssize_t start, std::optional<py::ssize_t> end) {
  return check_page_range(b.size(), start, end);
}

/// Releases the GIL for ranges big enough that the release pays for itself (over 64 words).
class ReleaseIfLarge {
 public:
  explicit ReleaseIfLarge(CheckedRange r) {
    if (r.end - r.begin > 64 * PageBitmap::kWordBits) release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

using U64Array = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>;

/// An (n, 2) array-like of (first_page, npages) rows as page ranges, each checked against a region of
/// `pages` pages (IndexError outside it); ValueError for another shape.
inline std::vector<PageRange> to_ranges(const py::handle& obj, std::size_t pages, const char* what = "runs") {
  const auto arr = U64Array::ensure(obj);
  if (!arr) throw py::value_error(std::string(what) + " must be an (n, 2) array of (first_page, npages) rows");
  if (arr.size() == 0) return {};
  if (arr.ndim() != 2 || arr.shape(1) != 2)
    throw py::value_error(std::string(what) + " must be an (n, 2) array of (first_page, npages) rows");
  std::vector<PageRange> out(static_cast<std::size_t>(arr.shape(0)));
  auto v = arr.unchecked<2>();
  for (py::ssize_t i = 0; i < arr.shape(0); ++i) {
    const std::uint64_t first = v(i, 0), n = v(i, 1);
    if (first > pages || n > pages - first)
      throw py::index_error(std::string(what) + ": pages [" + std::to_string(first) + ", +" + std::to_string(n) +
                            ") outside the region of " + std::to_string(pages) + " pages");
    out[static_cast<std::size_t>(i)] = {first, n};
  }
  return out;
}

/// Page ranges as an (n, 2) uint64 array of (first_page, npages) rows.
template <class Ranges>
py::array_t<std::uint64_t> ranges_array(const Ranges& ranges) {
  py::array_t<std::uint64_t> out({static_cast<py::ssize_t>(ranges.size()), py::ssize_t{2}});
  auto v = out.template mutable_unchecked<2>();
  py::ssize_t i = 0;
  for (const auto& r : ranges) {
    v(i, 0) = r.first;
    v(i, 1) = r.npages;
    ++i;
  }
  return out;
}

/// A vector as a new 1-d numpy array.
template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

/// A zero-copy, read-only numpy view of `n` values at `p` that keeps `owner` alive.
template <class T>
py::array_t<T> readonly_view(const T* p, std::size_t n, py::handle owner) {
  py::array_t<T> arr({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, p, owner);
  py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return arr;
}

/// A zero-copy, read-only numpy view of a bitmap's words that keeps `owner` alive.
inline py::array_t<PageBitmap::Word> words_view(const std::shared_ptr<PageBitmap>& bm, py::handle owner) {
  return readonly_view(bm->raw_words(), bm->word_count(), owner);
}

/// A 32-bit balloon command id from a Python int; ValueError outside [0, 2^32).
inline std::uint32_t check_cmd_id(std::int64_t id) {
  if (id < 0 || id > 0xFFFFFFFFLL) throw py::value_error("command id must fit in 32 bits, got " + std::to_string(id));
  return static_cast<std::uint32_t>(id);
}

}  // namespace livemig::py_bindings
