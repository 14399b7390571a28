// Wire bindings: the protocol's numbers as enums (frame types, commands, ack kinds, channel kinds:
// one C++ header each is their home), frame writer and reader over a socket fd (not owned: the
// Python socket object keeps it), the in-memory decoder and CRC32C. Arguments are converted with the
// GIL held; every call that touches the socket or many pages releases it, with any buffer it reads
// or writes held exported meanwhile.
#include <pybind11/numpy.h>
#include <pybind11/operators.h>
#include <pybind11/native_enum.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/wire/stream.hpp"
#include "livemig/wire/ack.hpp"
#include "livemig/wire/channel.hpp"
#include "livemig/wire/command.hpp"
#include "livemig/wire/format.hpp"
#include "livemig/wire/frame_type.hpp"
#include "convert.hpp"
#include "frames.hpp"
#include "register.hpp"

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

// Ranges for a DISCARD / LOCAL_FILL frame (the writer checks them against its region).
std::vector<Range> frame_ranges(const py::handle& obj) {
  return to_ranges(obj, ~std::uint64_t{0}, "ranges");
}

void register_enums(py::module_& m) {
  py::native_enum<FrameType>(m, "FrameType", "enum.IntEnum", "Frame types (docs/protocol.md, Frames).")
      .value("PAGES", FrameType::kPages)
      .value("ZERO", FrameType::kZero)
      .value("DISCARD", FrameType::kDiscard)
      .value("LOCAL_FILL", FrameType::kLocalFill)
      .value("DEVICE_STATE", FrameType::kDeviceState)
      .value("COMMAND", FrameType::kCommand)
      .value("END", FrameType::kEnd)
      .value("REQUEST", FrameType::kRequest)
      .value("RECEIVED_BITMAP", FrameType::kReceivedBitmap)
      .value("ACK", FrameType::kAck)
      .value("ERROR", FrameType::kError)
      .finalize();
  py::native_enum<wire::Command>(m, "Command", "enum.IntEnum", "Commands on the main channel.")
      .value("SWITCHOVER", wire::Command::kSwitchover)
      .value("POSTCOPY_START", wire::Command::kPostcopyStart)
      .value("COMPLETE", wire::Command::kComplete)
      .value("COMMITTED", wire::Command::kCommitted)
      .value("POSTCOPY_NEXT", wire::Command::kPostcopyNext)
      .value("DRAIN", wire::Command::kDrain)
      .finalize();
  py::native_enum<wire::AckKind>(m, "AckKind", "enum.IntEnum", "Acknowledgement kinds on the return path.")
      .value("GUEST_RUNS", wire::AckKind::kGuestRuns)
      .value("SWITCHOVER", wire::AckKind::kSwitchover)
      .value("DRAINED", wire::AckKind::kDrained)
      .finalize();
  py::native_enum<wire::ChannelKind>(m, "ChannelKind", "enum.IntEnum", "What a channel's socket is for (its HELLO says).")
      .value("MAIN", wire::ChannelKind::kMain)
      .value("URGENT", wire::ChannelKind::kUrgent)
      .value("PAGES", wire::ChannelKind::kPages)
      .value("RESUME", wire::ChannelKind::kResume)
      .finalize();
  m.attr("WIRE_PROTOCOL_VERSION") = wire::kProtocolVersion;
  m.attr("ACK_NEVER_RAN") = wire::kNeverRan;
  m.attr("MAIN_CHANNEL") = wire::kMainChannel;
  m.attr("URGENT_CHANNEL") = wire::kUrgentChannel;
  m.attr("FIRST_EXTRA_CHANNEL") = wire::kFirstExtraChannel;
}

void register_frames(py::module_& m) {
  py::class_<PyFrame>(m, "Frame", "One decoded frame (or one a test expects).")
      .def(py::init([](FrameType type, std::uint64_t first, std::uint32_t count, std::uint64_t value,
                       const py::handle& ranges, const py::bytes& data) {
             return PyFrame{type, first, count, value, frame_ranges(ranges), std::string(data)};
           }),
           py::arg("type"), py::arg("first") = 0, py::arg("count") = 0, py::arg("value") = 0,
           py::arg("ranges") = py::tuple(), py::arg("data") = py::bytes())
      .def(py::self == py::self)
      .def_readonly("type", &PyFrame::type)
      .def_readonly("first", &PyFrame::first, "PAGES / ZERO / REQUEST: the first page.")
      .def_readonly("count", &PyFrame::count, "Pages, ranges, or the ack kind.")
      .def_readonly("value", &PyFrame::value, "LOCAL_FILL fill value, COMMAND number, ACK value.")
      .def_property_readonly("ranges", [](const PyFrame& f) { return ranges_array(f.ranges); },
                             "DISCARD / LOCAL_FILL: (n, 2) array of (first_page, npages).")
      .def_property_readonly("data", [](const PyFrame& f) { return py::bytes(f.data); },
                             "Page bytes, blob, command arguments, bitmap or error text.")
      .def("__repr__", [](const PyFrame& f) {
        return "Frame(" + wire::frame_type_name(static_cast<std::uint8_t>(f.type)) + ", first=" + std::to_string(f.first) +
               ", count=" + std::to_string(f.count) + ", value=" + std::to_string(f.value) + ")";
      });
  py::class_<wire::WireStats>(m, "WireStats", "What one frame writer or reader moved.")
      .def(py::self == py::self)
      .def_readonly("frames", &wire::WireStats::frames)
      .def_readonly("pages", &wire::WireStats::pages, "Pages carried by PAGES frames.")
      .def_readonly("zero_pages", &wire::WireStats::zero_pages, "Pages carried by ZERO frames.")
      .def_readonly("bytes", &wire::WireStats::bytes, "Bytes on the wire, headers included.")
      .def_readonly("syscalls", &wire::WireStats::syscalls, "sendmsg / recvmsg calls.");
}

}  // namespace

void register_wire(py::module_& m) {
  register_enums(m);
  register_frames(m);

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
          [](wire::FrameWriter& w, std::uint64_t first, const py::handle& data, bool detect_zero) {
            const BufferExport b(data, BufferExport::Access::read, "data");
            const std::size_t n = b.pages(w.config().page_size);
            py::gil_scoped_release rel;
            w.send_pages(first, n, b.data(), detect_zero);
            w.flush();
          },
          py::arg("first"), py::arg("data"), py::arg("detect_zero") = false,
          "Sends the pages in `data` (page `first` at offset 0) and flushes.")
      .def(
          "send_urgent",
          [](wire::FrameWriter& w, std::uint64_t first, const py::handle& data) {
            const BufferExport b(data, BufferExport::Access::read, "data");
            const std::size_t n = b.pages(w.config().page_size);
            py::gil_scoped_release rel;
            w.send_urgent_pages(first, n, b.data());
          },
          py::arg("first"), py::arg("data"), "Sends the pages ahead of every queued page frame, then flushes.")
      .def(
          "send_region",
          [](wire::FrameWriter& w, const py::handle& region, const py::handle& runs, bool detect_zero) {
            const BufferExport b(region, BufferExport::Access::read, "region");
            const std::vector<Range> rs = frame_ranges(runs);
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
          [](wire::FrameWriter& w, const py::handle& ranges) {
            const auto rs = frame_ranges(ranges);
            py::gil_scoped_release rel;
            w.send_discard(rs);
          },
          py::arg("ranges"))
      .def(
          "send_local_fill",
          [](wire::FrameWriter& w, const py::handle& ranges, std::uint32_t value) {
            const auto rs = frame_ranges(ranges);
            py::gil_scoped_release rel;
            w.send_local_fill(rs, value);
          },
          py::arg("ranges"), py::arg("value"))
      .def(
          "send_device_state",
          [](wire::FrameWriter& w, const py::handle& blob) {
            const BufferExport b(blob, BufferExport::Access::read, "blob");
            py::gil_scoped_release rel;
            w.send_device_state({b.data(), b.size()});
          },
          py::arg("blob"))
      .def(
          "send_command",
          [](wire::FrameWriter& w, std::uint64_t cmd, const py::handle& args) {
            const BufferExport b(args, BufferExport::Access::read, "args");
            py::gil_scoped_release rel;
            w.send_command(static_cast<wire::Command>(cmd), {b.data(), b.size()});
          },
          py::arg("command"), py::arg("args") = py::bytes())
      .def("send_end", &wire::FrameWriter::send_end, py::call_guard<py::gil_scoped_release>())
      .def("send_request", &wire::FrameWriter::send_request, py::arg("first"), py::arg("npages"),
           py::call_guard<py::gil_scoped_release>())
      .def("send_received_bitmap", &wire::FrameWriter::send_received_bitmap, py::arg("received"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "send_ack",
          [](wire::FrameWriter& w, std::uint32_t kind, std::uint64_t value) {
            py::gil_scoped_release rel;
            w.send_ack(kind, value);
          },
          py::arg("kind"), py::arg("value"))
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
      .def_property_readonly("stats", [](const wire::FrameWriter& w) { return w.stats(); })
      .def_property_readonly(
          "sent", [](const wire::FrameWriter& w) { return w.sent(); },
          "Pages, zero pages and bytes sent by the flushes so far, read without the writer's lock (a live "
          "view reads it while a send blocks); frames and syscalls are 0.");

  py::class_<PyFrameReader>(m, "FrameReader",
                            "Reads and validates frames from a socket fd (not owned), or through a TLS channel "
                            "(TlsChannel.reader). One thread at a time.")
      .def(py::init([](int fd, const WireConfig& cfg, const std::string& direction) {
             const Direction dir = parse_direction(direction);
             return std::make_unique<PyFrameReader>(std::make_unique<wire::FdInput>(fd, cfg.timeout_ms), nullptr, cfg,
                                                    dir);
           }),
           py::arg("fd"), py::arg("config"), py::arg("direction"))
      .def("attach_region", &PyFrameReader::attach_region, py::arg("region"), py::arg("received"),
           "Page frames go straight into `region` and set `received` (precopy); next() reads on past them.")
      .def("detach_region", &PyFrameReader::detach_region)
      .def("next", &PyFrameReader::next,
           "The next kept frame, or None at a clean end of stream.")
      .def_property_readonly("stats", &PyFrameReader::stats);

  m.def(
      "wire_decode",
      [](const py::handle& data, const WireConfig& cfg, const std::string& direction) {
        const BufferExport b(data, BufferExport::Access::read, "data");
        const Direction dir = parse_direction(direction);
        std::vector<Frame> frames;
        {
          py::gil_scoped_release rel;
          frames = wire::decode_frames({b.data(), b.size()}, cfg, dir);
        }
        std::vector<PyFrame> out;
        out.reserve(frames.size());
        for (const Frame& f : frames) out.push_back(to_py(f));
        return out;
      },
      py::arg("data"), py::arg("config"), py::arg("direction"),
      "Decodes a byte buffer as frames; ProtocolError on anything malformed or truncated.");

  m.def(
      "crc32c",
      [](const py::handle& data) {
        const BufferExport b(data, BufferExport::Access::read, "data");
        py::gil_scoped_release rel;
        return wire::crc32c(b.data(), b.size());
      },
      py::arg("data"), "CRC32C (Castagnoli) of a buffer.");

}

}  // namespace livemig::py_bindings
