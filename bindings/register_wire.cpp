// Wire bindings: frame writer and reader over a socket fd (not owned: the Python socket object
// keeps it), the in-memory decoder, CRC32C, and the benchmark support. Arguments are converted
// with the GIL held; every call that touches the socket or many pages releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "livemig/page_bitmap.hpp"
#include "livemig/wire.hpp"
#include "livemig/wire_bench.hpp"
#include "livemig/wire_format.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

using wire::Direction;
using wire::Frame;
using wire::FrameType;
using wire::Range;
using wire::WireConfig;

Direction parse_direction(const std::string& s) {
  if (s == "to_destination") return Direction::kToDestination;
  if (s == "to_source") return Direction::kToSource;
  throw py::value_error("direction must be 'to_destination' or 'to_source', got '" + s + "'");
}

const char* kind_name(FrameType t) {
  switch (t) {
    case FrameType::kPages: return "pages";
    case FrameType::kZero: return "zero";
    case FrameType::kDiscard: return "discard";
    case FrameType::kLocalFill: return "local_fill";
    case FrameType::kDeviceState: return "device_state";
    case FrameType::kCommand: return "command";
    case FrameType::kEnd: return "end";
    case FrameType::kRequest: return "request";
    case FrameType::kReceivedBitmap: return "received_bitmap";
    case FrameType::kAck: return "ack";
    case FrameType::kError: return "error";
  }
  return "unknown";
}

// (kind, first, count, value, ranges (k, 2) uint64, data bytes)
py::tuple frame_tuple(const Frame& f) {
  py::array_t<std::uint64_t> ranges({static_cast<py::ssize_t>(f.ranges.size()), py::ssize_t{2}});
  auto r = ranges.mutable_unchecked<2>();
  for (std::size_t i = 0; i < f.ranges.size(); ++i) {
    r(static_cast<py::ssize_t>(i), 0) = f.ranges[i].first;
    r(static_cast<py::ssize_t>(i), 1) = f.ranges[i].npages;
  }
  py::bytes data(reinterpret_cast<const char*>(f.data.data()), f.data.size());
  return py::make_tuple(kind_name(f.type), f.first, f.count, f.value, ranges, data);
}

// A read-only byte view of any buffer.
struct Bytes {
  py::buffer_info info;
  const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(info.ptr); }
  std::size_t size() const { return static_cast<std::size_t>(info.size * info.itemsize); }
};

Bytes bytes_of(const py::buffer& b) {
  Bytes out{b.request()};
  if (!PyBuffer_IsContiguous(reinterpret_cast<Py_buffer*>(out.info.view()), 'C'))
    throw py::value_error("buffer must be C-contiguous");
  return out;
}

std::vector<Range> to_ranges(const py::object& obj) {
  const auto arr = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr) throw py::value_error("ranges must be a sequence of (first, npages) pairs");
  if (arr.size() == 0) return {};
  if (arr.ndim() != 2 || arr.shape(1) != 2) throw py::value_error("ranges must have shape (k, 2): (first, npages) pairs");
  std::vector<Range> out(static_cast<std::size_t>(arr.shape(0)));
  auto v = arr.unchecked<2>();
  for (py::ssize_t i = 0; i < arr.shape(0); ++i) out[static_cast<std::size_t>(i)] = {v(i, 0), v(i, 1)};
  return out;
}

py::dict stats_dict(const wire::WireStats& s) {
  py::dict d;
  d["frames"] = s.frames;
  d["pages"] = s.pages;
  d["zero_pages"] = s.zero_pages;
  d["bytes"] = s.bytes;
  d["syscalls"] = s.syscalls;
  return d;
}

py::array_t<std::uint64_t> to_array(const std::vector<std::uint64_t>& v) {
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(std::uint64_t));
  return out;
}

// Reader with its input and a CollectingHandler; keeps the attached region's buffer exported so
// it cannot be resized or unmapped while frames may land in it.
class PyFrameReader {
 public:
  PyFrameReader(int fd, const WireConfig& cfg, Direction dir)
      : cfg_(cfg), input_(fd, cfg.timeout_ms), reader_(input_, cfg, dir), handler_(cfg) {}

  void attach_region(const py::buffer& region, std::shared_ptr<PageBitmap> received) {
    auto info = std::make_unique<py::buffer_info>(region.request());
    const auto n = static_cast<std::size_t>(info->size * info->itemsize);
    if (info->readonly) throw py::value_error("region must be writable");
    if (n < cfg_.region_pages * cfg_.page_size)
      throw py::value_error("region of " + std::to_string(n) + " bytes is smaller than " +
                            std::to_string(cfg_.region_pages) + " pages of " + std::to_string(cfg_.page_size));
    handler_.attach_region(static_cast<std::uint8_t*>(info->ptr), std::move(received));
    region_ = std::move(info);
  }
  void detach_region() {
    handler_.detach_region();
    region_.reset();
  }
  std::optional<py::tuple> next() {
    std::optional<Frame> f;
    {
      py::gil_scoped_release rel;
      f = handler_.pump(reader_);
    }
    if (!f) return std::nullopt;
    return frame_tuple(*f);
  }
  py::dict stats() const { return stats_dict(reader_.stats()); }

 private:
  WireConfig cfg_;
  wire::FdInput input_;
  wire::FrameReader reader_;
  wire::CollectingHandler handler_;
  std::unique_ptr<py::buffer_info> region_;
};

}  // namespace

void register_wire(py::module_& m) {
  m.attr("WIRE_PROTOCOL_VERSION") = wire::kProtocolVersion;

  py::class_<WireConfig>(m, "WireConfig", "Frame-level settings both ends agreed on, plus local limits.")
      .def(py::init([](std::size_t page_size, std::uint64_t region_pages, bool checksums, std::uint32_t frame_pages,
                       std::size_t batch_bytes, std::uint64_t max_device_state, std::uint32_t max_ranges,
                       double timeout) {
             WireConfig c;
             c.page_size = page_size;
             c.region_pages = region_pages;
             c.checksums = checksums;
             c.frame_pages = frame_pages;
             c.batch_bytes = batch_bytes;
             c.max_device_state = max_device_state;
             c.max_ranges = max_ranges;
             if (!(timeout >= 0) || timeout > 1e6) throw py::value_error("timeout must be in [0, 1e6] seconds");
             c.timeout_ms = static_cast<int>(timeout * 1000);
             c.validate();
             return c;
           }),
           py::kw_only(), py::arg("page_size"), py::arg("region_pages"), py::arg("checksums") = false,
           py::arg("frame_pages") = 256, py::arg("batch_bytes") = std::size_t{4} << 20,
           py::arg("max_device_state") = std::uint64_t{256} << 20, py::arg("max_ranges") = 1u << 16,
           py::arg("timeout") = 30.0)
      .def_readonly("page_size", &WireConfig::page_size)
      .def_readonly("region_pages", &WireConfig::region_pages)
      .def_readonly("checksums", &WireConfig::checksums)
      .def_readonly("frame_pages", &WireConfig::frame_pages)
      .def_readonly("batch_bytes", &WireConfig::batch_bytes)
      .def_readonly("max_device_state", &WireConfig::max_device_state)
      .def_readonly("max_ranges", &WireConfig::max_ranges)
      .def_property_readonly("timeout", [](const WireConfig& c) { return c.timeout_ms / 1000.0; })
      .def_property_readonly("max_frame_pages", &WireConfig::max_frame_pages);

  py::class_<wire::FrameWriter>(m, "FrameWriter",
                                "Writes frames to a socket fd (not owned), or to memory when fd is -1. Thread-safe.")
      .def(py::init<int, const WireConfig&>(), py::arg("fd"), py::arg("config"))
      .def(
          "send_pages",
          [](wire::FrameWriter& w, std::uint64_t first, const py::buffer& data, bool detect_zero) {
            const Bytes b = bytes_of(data);
            const std::size_t ps = w.config().page_size;
            if (b.size() == 0 || b.size() % ps != 0)
              throw py::value_error("data must be a non-empty whole number of " + std::to_string(ps) + "-byte pages");
            py::gil_scoped_release rel;
            w.send_pages(first, b.size() / ps, b.data(), detect_zero);
            w.flush();
          },
          py::arg("first"), py::arg("data"), py::arg("detect_zero") = false,
          "Sends the pages in `data` (page `first` at offset 0) and flushes.")
      .def(
          "send_urgent",
          [](wire::FrameWriter& w, std::uint64_t first, const py::buffer& data) {
            const Bytes b = bytes_of(data);
            const std::size_t ps = w.config().page_size;
            if (b.size() == 0 || b.size() % ps != 0)
              throw py::value_error("data must be a non-empty whole number of " + std::to_string(ps) + "-byte pages");
            py::gil_scoped_release rel;
            w.send_urgent_pages(first, b.size() / ps, b.data());
          },
          py::arg("first"), py::arg("data"), "Sends the pages ahead of every queued page frame, then flushes.")
      .def(
          "send_region",
          [](wire::FrameWriter& w, const py::buffer& region, const py::object& runs, bool detect_zero) {
            const Bytes b = bytes_of(region);
            const std::vector<Range> rs = to_ranges(runs);
            const std::size_t ps = w.config().page_size;
            for (const Range& r : rs)
              if (r.first > b.size() / ps || r.npages > b.size() / ps - r.first)
                throw py::index_error("run [" + std::to_string(r.first) + ", +" + std::to_string(r.npages) +
                                      ") past the end of the region buffer");
            py::gil_scoped_release rel;
            for (const Range& r : rs) w.send_pages(r.first, r.npages, b.data() + r.first * ps, detect_zero);
            w.flush();
          },
          py::arg("region"), py::arg("runs"), py::arg("detect_zero") = false,
          "Sends runs (k, 2) of (first, npages) of `region` (page 0 at offset 0) in batches, then flushes.")
      .def("send_zero", &wire::FrameWriter::send_zero, py::arg("first"), py::arg("npages"),
           py::call_guard<py::gil_scoped_release>(), "Queues a run of zero pages (flush() sends it).")
      .def(
          "send_discard",
          [](wire::FrameWriter& w, const py::object& ranges) {
            const auto rs = to_ranges(ranges);
            py::gil_scoped_release rel;
            w.send_discard(rs);
          },
          py::arg("ranges"))
      .def(
          "send_local_fill",
          [](wire::FrameWriter& w, const py::object& ranges, std::uint32_t value) {
            const auto rs = to_ranges(ranges);
            py::gil_scoped_release rel;
            w.send_local_fill(rs, value);
          },
          py::arg("ranges"), py::arg("value"))
      .def(
          "send_device_state",
          [](wire::FrameWriter& w, const py::buffer& blob) {
            const Bytes b = bytes_of(blob);
            py::gil_scoped_release rel;
            w.send_device_state({b.data(), b.size()});
          },
          py::arg("blob"))
      .def(
          "send_command",
          [](wire::FrameWriter& w, std::uint64_t cmd, const py::buffer& args) {
            const Bytes b = bytes_of(args);
            py::gil_scoped_release rel;
            w.send_command(static_cast<wire::Command>(cmd), {b.data(), b.size()});
          },
          py::arg("command"), py::arg("args") = py::bytes())
      .def("send_end", &wire::FrameWriter::send_end, py::call_guard<py::gil_scoped_release>())
      .def("send_request", &wire::FrameWriter::send_request, py::arg("first"), py::arg("npages"),
           py::call_guard<py::gil_scoped_release>())
      .def("send_received_bitmap", &wire::FrameWriter::send_received_bitmap, py::arg("received"),
           py::call_guard<py::gil_scoped_release>())
      .def("send_ack", &wire::FrameWriter::send_ack, py::arg("kind"), py::arg("value"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "send_error",
          [](wire::FrameWriter& w, const std::string& msg) {
            py::gil_scoped_release rel;
            w.send_error(msg);
          },
          py::arg("message"))
      .def("flush", &wire::FrameWriter::flush, py::call_guard<py::gil_scoped_release>())
      .def(
          "take_bytes",
          [](wire::FrameWriter& w) {
            std::vector<std::uint8_t> v;
            {
              py::gil_scoped_release rel;
              v = w.take_bytes();
            }
            return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
          },
          "Memory writer: the bytes written so far.")
      .def_property_readonly("stats", [](const wire::FrameWriter& w) { return stats_dict(w.stats()); });

  py::class_<PyFrameReader>(m, "FrameReader",
                            "Reads and validates frames from a socket fd (not owned). One thread at a time.")
      .def(py::init([](int fd, const WireConfig& cfg, const std::string& direction) {
             return std::make_unique<PyFrameReader>(fd, cfg, parse_direction(direction));
           }),
           py::arg("fd"), py::arg("config"), py::arg("direction"))
      .def("attach_region", &PyFrameReader::attach_region, py::arg("region"), py::arg("received"),
           "Page frames go straight into `region` and set `received` (precopy); next() reads on past them.")
      .def("detach_region", &PyFrameReader::detach_region)
      .def("next", &PyFrameReader::next,
           "Next kept frame as (kind, first, count, value, ranges, data), or None at a clean end of stream.")
      .def_property_readonly("stats", &PyFrameReader::stats);

  m.def(
      "wire_decode",
      [](const py::buffer& data, const WireConfig& cfg, const std::string& direction) {
        const Bytes b = bytes_of(data);
        const Direction dir = parse_direction(direction);
        std::vector<Frame> frames;
        {
          py::gil_scoped_release rel;
          frames = wire::decode_frames({b.data(), b.size()}, cfg, dir);
        }
        py::list out;
        for (const Frame& f : frames) out.append(frame_tuple(f));
        return out;
      },
      py::arg("data"), py::arg("config"), py::arg("direction"),
      "Decodes a byte buffer as frames; ProtocolError on anything malformed or truncated.");

  m.def(
      "crc32c",
      [](const py::buffer& data) {
        const Bytes b = bytes_of(data);
        py::gil_scoped_release rel;
        return wire::crc32c(b.data(), b.size());
      },
      py::arg("data"), "CRC32C (Castagnoli) of a buffer.");

  // Benchmark support: raw baselines and the same workloads through the wire classes.
  m.def(
      "wire_bench_raw_send",
      [](int fd, const py::buffer& data, std::size_t chunk) {
        const Bytes b = bytes_of(data);
        py::gil_scoped_release rel;
        return wire::bench::raw_send(fd, b.data(), b.size(), chunk);
      },
      py::arg("fd"), py::arg("data"), py::arg("chunk") = std::size_t{1} << 20);
  m.def(
      "wire_bench_raw_recv",
      [](int fd, const py::buffer& data, std::size_t chunk) {
        auto info = data.request();
        if (info.readonly) throw py::value_error("buffer must be writable");
        const auto n = static_cast<std::size_t>(info.size * info.itemsize);
        py::gil_scoped_release rel;
        return wire::bench::raw_recv(fd, static_cast<std::uint8_t*>(info.ptr), n, chunk);
      },
      py::arg("fd"), py::arg("data"), py::arg("chunk") = std::size_t{1} << 20);
  auto raw_region = [](const std::optional<py::buffer>& region, std::size_t page_size,
                       std::unique_ptr<py::buffer_info>& keep) {
    wire::bench::RawRegion r;
    if (!region) return r;
    keep = std::make_unique<py::buffer_info>(region->request());
    if (keep->readonly) throw py::value_error("region must be writable");
    if (page_size == 0) throw py::value_error("page_size must be > 0");
    r.base = static_cast<std::uint8_t*>(keep->ptr);
    r.page_size = page_size;
    r.pages = static_cast<std::size_t>(keep->size * keep->itemsize) / page_size;
    if (r.pages == 0) throw py::value_error("region holds no page");
    return r;
  };
  m.def(
      "wire_bench_raw_pingpong_client",
      [raw_region](int fd, std::size_t request, std::size_t reply, std::size_t iters,
                   const std::optional<py::buffer>& region, std::size_t page_size, int reply_fd) {
        std::unique_ptr<py::buffer_info> keep;
        const auto r = raw_region(region, page_size, keep);
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = wire::bench::raw_pingpong_client(fd, request, reply, iters, r, reply_fd);
        }
        return to_array(v);
      },
      py::arg("fd"), py::arg("request"), py::arg("reply"), py::arg("iters"), py::arg("region") = py::none(),
      py::arg("page_size") = 4096, py::arg("reply_fd") = -1);
  m.def(
      "wire_bench_raw_pingpong_server",
      [raw_region](int fd, std::size_t request, std::size_t reply, const std::optional<py::buffer>& region,
                   std::size_t page_size, int reply_fd) {
        std::unique_ptr<py::buffer_info> keep;
        const auto r = raw_region(region, page_size, keep);
        py::gil_scoped_release rel;
        return wire::bench::raw_pingpong_server(fd, request, reply, r, reply_fd);
      },
      py::arg("fd"), py::arg("request"), py::arg("reply"), py::arg("region") = py::none(),
      py::arg("page_size") = 4096, py::arg("reply_fd") = -1);
  m.def(
      "wire_bench_request_client",
      [](int ret_fd, int urgent_fd, const WireConfig& cfg, const py::buffer& region, std::size_t iters) {
        auto info = region.request();
        if (info.readonly) throw py::value_error("region must be writable");
        if (static_cast<std::size_t>(info.size * info.itemsize) < cfg.region_pages * cfg.page_size)
          throw py::value_error("region smaller than the config's region");
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = wire::bench::request_client(ret_fd, urgent_fd, cfg, static_cast<std::uint8_t*>(info.ptr), iters);
        }
        return to_array(v);
      },
      py::arg("ret_fd"), py::arg("urgent_fd"), py::arg("config"), py::arg("region"), py::arg("iters"));
  m.def(
      "wire_bench_request_server",
      [](int ret_fd, int urgent_fd, const WireConfig& cfg, const py::buffer& region) {
        const Bytes b = bytes_of(region);
        if (b.size() < cfg.region_pages * cfg.page_size) throw py::value_error("region smaller than the config's region");
        py::gil_scoped_release rel;
        return wire::bench::request_server(ret_fd, urgent_fd, cfg, b.data());
      },
      py::arg("ret_fd"), py::arg("urgent_fd"), py::arg("config"), py::arg("region"));
}

}  // namespace livemig::py_bindings
