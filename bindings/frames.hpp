// Frames as Python sees them, shared by the wire and TLS bindings: PyFrame (one decoded frame, or
// one a test expects) and PyFrameReader, a FrameReader with a CollectingHandler over any
// FrameInput (a bare socket, or a TLS channel that the reader keeps alive).
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "convert.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/format.hpp"
#include "livemig/wire/stream.hpp"

namespace livemig::py_bindings {

// A decoded frame as Python sees it (also made by tests, as the frame they expect).
struct PyFrame {
  wire::FrameType type = wire::FrameType::kEnd;
  std::uint64_t first = 0;
  std::uint32_t count = 0;
  std::uint64_t value = 0;
  std::vector<wire::Range> ranges;
  std::string data;
  bool operator==(const PyFrame& o) const {
    if (type != o.type || first != o.first || count != o.count || value != o.value || data != o.data) return false;
    if (ranges.size() != o.ranges.size()) return false;
    for (std::size_t i = 0; i < ranges.size(); ++i)
      if (ranges[i].first != o.ranges[i].first || ranges[i].npages != o.ranges[i].npages) return false;
    return true;
  }
};

inline PyFrame to_py(const wire::Frame& f) {
  return PyFrame{f.type, f.first, f.count, f.value, f.ranges, std::string(f.data.begin(), f.data.end())};
}

// Reader with its input and a CollectingHandler; keeps the attached region's buffer exported so
// it cannot be resized or unmapped while frames may land in it, and `keep` (what the input reads
// through, e.g. a TLS channel) alive as long as the reader.
class PyFrameReader {
 public:
  PyFrameReader(std::unique_ptr<wire::FrameInput> input, std::shared_ptr<void> keep, const wire::WireConfig& cfg,
                wire::Direction dir)
      : keep_(std::move(keep)), cfg_(cfg), input_(std::move(input)), reader_(*input_, cfg, dir), handler_(cfg) {}

  void attach_region(const py::handle& region, std::shared_ptr<PageBitmap> received) {
    auto exported = std::make_unique<BufferExport>(region, BufferExport::Access::write, "region");
    const std::size_t n = exported->size();
    if (n < cfg_.region_pages * cfg_.page_size)
      throw py::value_error("region of " + std::to_string(n) + " bytes is smaller than " +
                            std::to_string(cfg_.region_pages) + " pages of " + std::to_string(cfg_.page_size));
    handler_.attach_region(exported->data(), std::move(received));
    region_ = std::move(exported);
  }
  void detach_region() {
    handler_.detach_region();
    region_.reset();
  }
  std::optional<PyFrame> next() {
    std::optional<wire::Frame> f;
    {
      py::gil_scoped_release rel;
      f = handler_.pump(reader_);
    }
    if (!f) return std::nullopt;
    return to_py(*f);
  }
  wire::WireStats stats() const { return reader_.stats(); }

 private:
  std::shared_ptr<void> keep_;  // declared first: destroyed after the input that reads through it
  wire::WireConfig cfg_;
  std::unique_ptr<wire::FrameInput> input_;
  wire::FrameReader reader_;
  wire::CollectingHandler handler_;
  std::unique_ptr<BufferExport> region_;  // exported while frames may land in it
};

}  // namespace livemig::py_bindings
