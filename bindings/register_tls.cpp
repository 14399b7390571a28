// TLS bindings (docs/protocol.md, "Encryption"): TlsConfig, one side's loaded credentials (a
// shared secret or x509 files) for all its channels; TlsChannel, one socket's TLS session, whose
// handshake runs with the GIL released and which hands out frame writers and readers over it;
// read_through_tls, which makes a session's reader threads read their sockets through their TLS
// channels. register_tls_bench adds the TLS loops to the private _bench submodule. Arguments are
// converted with the GIL held; every call that touches a socket or many pages releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "convert.hpp"
#include "frames.hpp"
#include "livemig/bench/tls.hpp"
#include "livemig/bitmap/page_bitmap.hpp"
#include "livemig/session/session.hpp"
#include "livemig/wire/stream.hpp"
#include "livemig/wire/tls.hpp"
#include "register.hpp"

namespace livemig::py_bindings {
namespace {

using wire::Direction;
using wire::TlsChannel;
using wire::TlsContext;
using wire::TlsKeying;
using wire::TlsOptions;
using wire::TlsRecordLayer;
using wire::TlsRole;
using wire::WireConfig;

TlsRole parse_role(const std::string& s) {
  if (s == "client") return TlsRole::kClient;
  if (s == "server") return TlsRole::kServer;
  throw py::value_error("role must be 'client' (the side that connected: the source) or 'server', got '" + s + "'");
}

TlsRecordLayer parse_layer(const std::string& s) {
  if (s == "direct") return TlsRecordLayer::kDirect;
  if (s == "openssl") return TlsRecordLayer::kOpenSsl;
  throw py::value_error("record_layer must be 'direct' or 'openssl', got '" + s + "'");
}

Direction parse_direction(const std::string& s) {
  if (s == "to_destination") return Direction::kToDestination;
  if (s == "to_source") return Direction::kToSource;
  throw py::value_error("direction must be 'to_destination' or 'to_source', got '" + s + "'");
}

int timeout_ms(double seconds, const char* what) {
  if (!(seconds >= 0) || seconds > 1e6) throw py::value_error(std::string(what) + " must be in [0, 1e6] seconds");
  return static_cast<int>(seconds * 1000);
}

std::vector<std::uint8_t> bytes_of(const py::handle& obj, const char* what) {
  const BufferExport b(obj, BufferExport::Access::read, what);
  return {b.data(), b.data() + b.size()};
}

std::shared_ptr<const TlsContext> make_context(TlsOptions o, const std::string& role, const std::string& suites,
                                               bool ktls, const std::string& layer) {
  o.ciphersuites = suites;
  o.ktls = ktls;
  o.record_layer = parse_layer(layer);
  const TlsRole r = parse_role(role);
  py::gil_scoped_release rel;  // loading certificates and keys reads files
  return std::make_shared<const TlsContext>(std::move(o), r);
}

template <class Session>
void read_through(Session& s, const std::vector<std::shared_ptr<TlsChannel>>& channels) {
  auto open = wire::tls_input_opener(channels);
  s.read_through(std::move(open));
}

}  // namespace

void register_tls_bench(py::module_& bench);

void register_tls(py::module_& m) {
  m.attr("TLS_DEFAULT_CIPHERSUITES") = wire::kDefaultCiphersuites;

  py::class_<TlsContext, std::shared_ptr<TlsContext>>(
      m, "TlsConfig",
      "One side's TLS 1.3 credentials and settings, loaded once and shared by all its channels. "
      "role 'client' is the side that connected (the source), 'server' the destination.")
      .def_static(
          "psk",
          [](const py::handle& secret, const std::string& role, const std::string& ciphersuites, bool ktls,
             const std::string& record_layer, std::uint64_t key_update_records) {
            TlsOptions o;
            o.keying = TlsKeying::kPsk;
            o.secret = bytes_of(secret, "secret");
            o.key_update_records = key_update_records;
            return std::const_pointer_cast<TlsContext>(make_context(std::move(o), role, ciphersuites, ktls, record_layer));
          },
          py::arg("secret"), py::kw_only(), py::arg("role"), py::arg("ciphersuites") = wire::kDefaultCiphersuites,
          py::arg("ktls") = true, py::arg("record_layer") = "direct",
          py::arg("key_update_records") = std::uint64_t{1} << 24,
          "Keying from the shared secret (at least 16 bytes): each channel derives its own TLS 1.3 PSK from it "
          "and its psk_context. ValueError for a short secret or a suite that is not SHA-256.")
      .def_static(
          "x509",
          [](const std::string& role, const std::string& cert, const std::string& key, const std::string& ca,
             const std::string& peer_name, const std::string& ciphersuites, bool ktls, const std::string& record_layer) {
            TlsOptions o;
            o.keying = TlsKeying::kX509;
            o.cert_file = cert;
            o.key_file = key;
            o.ca_file = ca;
            o.peer_name = peer_name;
            return std::const_pointer_cast<TlsContext>(make_context(std::move(o), role, ciphersuites, ktls, record_layer));
          },
          py::kw_only(), py::arg("role"), py::arg("cert"), py::arg("key"), py::arg("ca"), py::arg("peer_name") = "",
          py::arg("ciphersuites") = wire::kDefaultCiphersuites, py::arg("ktls") = true,
          py::arg("record_layer") = "direct",
          "Keying with certificates (PEM files), verified both ways against `ca`; the client must name the server "
          "(peer_name: DNS name or IP address), the server may name its client. ValueError naming a file that "
          "cannot be loaded or a key that does not match.")
      .def_static(
          "x509_dir",
          [](const std::string& directory, const std::string& role, const std::string& peer_name,
             const std::string& ciphersuites, bool ktls, const std::string& record_layer) {
            TlsOptions o = TlsOptions::x509_dir(directory, parse_role(role), peer_name);
            return std::const_pointer_cast<TlsContext>(make_context(std::move(o), role, ciphersuites, ktls, record_layer));
          },
          py::arg("directory"), py::kw_only(), py::arg("role"), py::arg("peer_name") = "",
          py::arg("ciphersuites") = wire::kDefaultCiphersuites, py::arg("ktls") = true,
          py::arg("record_layer") = "direct",
          "x509 keying from a directory laid out like QEMU's tls-creds-x509: ca-cert.pem, and "
          "server-cert.pem / server-key.pem or client-cert.pem / client-key.pem.")
      .def_property_readonly("role", [](const TlsContext& c) { return c.role() == TlsRole::kClient ? "client" : "server"; })
      .def_property_readonly("keying",
                             [](const TlsContext& c) { return c.options().keying == TlsKeying::kPsk ? "psk" : "x509"; })
      .def_property_readonly("peer_name", [](const TlsContext& c) { return c.options().peer_name; })
      .def_property_readonly("ciphersuites", [](const TlsContext& c) { return c.options().ciphersuites; })
      .def_property_readonly("ktls", [](const TlsContext& c) { return c.options().ktls; })
      .def_property_readonly("record_layer", [](const TlsContext& c) {
        return c.options().record_layer == TlsRecordLayer::kDirect ? "direct" : "openssl";
      });

  py::class_<TlsChannel, std::shared_ptr<TlsChannel>>(
      m, "TlsChannel",
      "TLS 1.3 on one connected stream socket (fd not owned: keep the socket open while the channel lives, and "
      "after the handshake never read or write it but through the channel). Errors: AuthenticationError (wrong "
      "key or certificate, or the peer refused ours), ProtocolError (not a TLS 1.3 peer, a record altered in "
      "transit), ConnectionLost (closed, reset, or silent past the timeout); after one, every call raises it.")
      .def(py::init([](std::shared_ptr<TlsContext> config, int fd, const py::handle& psk_context) {
             const std::vector<std::uint8_t> ctx = bytes_of(psk_context, "psk_context");
             return std::make_shared<TlsChannel>(std::move(config), fd, ctx);
           }),
           py::arg("config"), py::arg("fd"), py::arg("psk_context") = py::bytes(),
           "A channel on socket `fd`. PSK keying: psk_context is what both sides derive this channel's key from "
           "(the source's HELLO body followed by the destination's); ValueError when it is missing.")
      .def(
          "handshake",
          [](TlsChannel& c, double timeout, const py::handle& transcript) {
            const int ms = timeout_ms(timeout, "timeout");
            if (ms <= 0) throw py::value_error("timeout must be > 0 seconds");
            const std::vector<std::uint8_t> t = bytes_of(transcript, "transcript");
            py::gil_scoped_release rel;
            c.handshake(ms, t);
          },
          py::arg("timeout"), py::arg("transcript") = py::bytes(),
          "Runs the TLS handshake (and the server's acceptance) within `timeout` seconds in all; with a "
          "transcript (the plaintext handshake's bytes as this side saw them), both sides then compare its digest "
          "inside the tunnel and refuse a peer that saw other bytes (ProtocolError). Once only.")
      .def(
          "writer",
          [](const std::shared_ptr<TlsChannel>& c, const WireConfig& cfg) {
            if (!c->established()) throw py::value_error("writer: the channel has not completed its handshake");
            return std::make_unique<wire::FrameWriter>(*c, cfg);
          },
          py::arg("config"), py::keep_alive<0, 1>(),
          "A FrameWriter whose frames go out through this channel (one per channel). Thread-safe like any.")
      .def(
          "reader",
          [](const std::shared_ptr<TlsChannel>& c, const WireConfig& cfg, const std::string& direction) {
            if (!c->established()) throw py::value_error("reader: the channel has not completed its handshake");
            const Direction dir = parse_direction(direction);
            return std::make_unique<PyFrameReader>(std::make_unique<wire::TlsInput>(*c, cfg.timeout_ms), c, cfg, dir);
          },
          py::arg("config"), py::arg("direction"),
          "A FrameReader reading this channel (one per channel, one thread at a time); it keeps the channel alive.")
      .def(
          "export_keying_material",
          [](const TlsChannel& c, const std::string& label, const py::handle& context, std::size_t length) {
            const std::vector<std::uint8_t> ctx = bytes_of(context, "context");
            std::vector<std::uint8_t> out;
            {
              py::gil_scoped_release rel;
              out = c.export_keying_material(label, ctx, length);
            }
            return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
          },
          py::arg("label"), py::arg("context"), py::arg("length") = 32,
          "Keying material exported from this session (RFC 8446 7.5): the same bytes on both ends, known to "
          "nobody else. After the handshake.")
      .def("bound_batches", &TlsChannel::bound_batches, py::arg("bytes"),
           "Bounds what livemig's record layer gathers per send and takes in per recv (one record to 256 KiB).")
      .def("close_notify", &TlsChannel::close_notify, py::call_guard<py::gil_scoped_release>(),
           "Sends TLS close_notify (best effort): the peer's reads end cleanly.")
      .def("shutdown", &TlsChannel::shutdown,
           "Shuts the socket down both ways (any thread): threads blocked on it wake.")
      .def_property_readonly("fd", &TlsChannel::fd)
      .def_property_readonly("established", &TlsChannel::established)
      .def_property_readonly("path", &TlsChannel::path,
                             "Which record layer runs: 'ktls' (the kernel), 'userspace' (livemig's), 'openssl', "
                             "or '<send>+<recv>' when the directions differ; 'none' before the handshake.")
      .def_property_readonly("ktls_send", &TlsChannel::ktls_send)
      .def_property_readonly("ktls_recv", &TlsChannel::ktls_recv)
      .def_property_readonly("cipher", &TlsChannel::cipher, "The negotiated TLS 1.3 suite.")
      .def_property_readonly("peer_identity", &TlsChannel::peer_identity,
                             "The peer certificate's subject, or 'psk:livemig-v1'.")
      .def_property_readonly("handshake_seconds", &TlsChannel::handshake_seconds)
      .def_property_readonly("send_calls", &TlsChannel::send_calls)
      .def_property_readonly("recv_calls", &TlsChannel::recv_calls)
      .def_property_readonly("key_updates_sent", &TlsChannel::key_updates_sent)
      .def_property_readonly("key_updates_received", &TlsChannel::key_updates_received);

  m.def("read_through_tls", &read_through<SourceSession>, py::arg("session"), py::arg("channels"),
        "The session's return-path reader reads through its TLS channel. Call before start_return_path().");
  m.def("read_through_tls", &read_through<DestSession>, py::arg("session"), py::arg("channels"),
        "The session's channel readers read through these TLS channels (every socket it reads must have one); "
        "call before start(), and with the new connection's channels before reattach().");

  m.def(
      "tls_derive_psk",
      [](const py::handle& secret, const py::handle& context) {
        const auto psk = wire::derive_tls_psk(bytes_of(secret, "secret"), bytes_of(context, "context"));
        return py::bytes(reinterpret_cast<const char*>(psk.data()), psk.size());
      },
      py::arg("secret"), py::arg("context"),
      "The TLS 1.3 PSK a channel derives (docs/protocol.md, Encryption): HKDF-SHA256(salt 'livemig-v1 tls13 psk', "
      "secret, info context), 32 bytes.");

  // The loops for bench/ go on the private submodule register_bench made.
  if (py::hasattr(m, "_bench")) {
    py::module_ bench = m.attr("_bench");
    register_tls_bench(bench);
  }
}

void register_tls_bench(py::module_& b) {
  b.def(
      "tls_evp_seal_loop",
      [](const std::string& cipher, std::size_t record_bytes, std::uint64_t total_bytes, std::size_t source_bytes) {
        bench::tls::Throughput t;
        {
          py::gil_scoped_release rel;
          t = bench::tls::evp_seal_loop(cipher, record_bytes, total_bytes, source_bytes);
        }
        py::dict d;
        d["bytes"] = t.bytes;
        d["seconds"] = t.seconds;
        return d;
      },
      py::arg("cipher") = "aes-128-gcm", py::arg("record_bytes") = 16384,
      py::arg("total_bytes") = std::uint64_t{1} << 30, py::arg("source_bytes") = std::size_t{64} << 20,
      "The raw AEAD baseline: EVP seals total_bytes in records (aes-128-gcm, aes-256-gcm, chacha20-poly1305), "
      "reading a source of source_bytes round and round.");
  b.def(
      "tls_socketpair_throughput",
      [](bool tls, const std::string& transport, const std::string& ciphersuites, bool ktls,
         const std::string& record_layer, std::size_t region_bytes, std::uint64_t total_bytes,
         std::uint32_t frame_pages, std::size_t batch_bytes, bool drain_only) {
        bench::tls::StreamOptions o;
        o.tls = tls;
        o.transport = transport;
        o.ciphersuites = ciphersuites;
        o.ktls = ktls;
        o.record_layer = parse_layer(record_layer);
        o.region_bytes = region_bytes;
        o.total_bytes = total_bytes;
        o.frame_pages = frame_pages;
        o.batch_bytes = batch_bytes;
        o.drain_only = drain_only;
        bench::tls::StreamResult r;
        {
          py::gil_scoped_release rel;
          r = bench::tls::stream_throughput(o);
        }
        py::dict d;
        d["bytes"] = r.moved.bytes;
        d["seconds"] = r.moved.seconds;
        d["sender_cpu"] = r.sender_cpu;
        d["receiver_cpu"] = r.receiver_cpu;
        d["path"] = r.path;
        d["cipher"] = r.cipher;
        d["send_calls"] = r.send_calls;
        d["recv_calls"] = r.recv_calls;
        return d;
      },
      py::arg("tls") = true, py::arg("transport") = "unix", py::arg("ciphersuites") = wire::kDefaultCiphersuites,
      py::arg("ktls") = true, py::arg("record_layer") = "direct", py::arg("region_bytes") = std::size_t{64} << 20,
      py::arg("total_bytes") = std::uint64_t{1} << 30, py::arg("frame_pages") = 256,
      py::arg("batch_bytes") = std::size_t{4} << 20, py::arg("drain_only") = false,
      "Pages through FrameWriter, a socket pair (transport 'unix') or loopback TCP ('tcp'), and FrameReader into "
      "a region, plaintext or TLS (PSK); wall time and each end's CPU seconds. drain_only: the receiver only "
      "drains the socket (the sending channel's cost alone).");
  b.def(
      "tls_request_round_trips",
      [](bool tls, std::size_t iters, const std::string& record_layer) {
        const TlsRecordLayer layer = parse_layer(record_layer);
        std::vector<std::uint64_t> v;
        {
          py::gil_scoped_release rel;
          v = bench::tls::request_round_trips(tls, iters, layer);
        }
        return to_array(v);
      },
      py::arg("tls") = true, py::arg("iters") = 2000, py::arg("record_layer") = "direct",
      "Postcopy's fault path on the wire over loopback TCP, plaintext or TLS: REQUEST on the return path, the "
      "PAGES frame back on the urgent socket into a region; each round trip in nanoseconds.");
  b.def(
      "tls_handshake_times",
      [](const std::string& keying, std::size_t n, const std::string& transport) {
        if (keying != "psk" && keying != "x509") throw py::value_error("keying must be 'psk' or 'x509'");
        std::vector<double> v;
        {
          py::gil_scoped_release rel;
          v = bench::tls::handshake_times(keying == "psk" ? TlsKeying::kPsk : TlsKeying::kX509, n, transport);
        }
        return to_array(v);
      },
      py::arg("keying") = "psk", py::arg("n") = 20, py::arg("transport") = "tcp",
      "Seconds of each of n TLS handshakes (client side, with the server's acceptance); x509 uses a throwaway PKI.");
  b.def("tls_evp_cipher_of_suite", &bench::tls::evp_cipher_of_suite, py::arg("suite"),
        "The EVP baseline cipher for a TLS 1.3 suite name.");
  b.def(
      "tls_write_test_pki",
      [](const std::string& directory, const std::string& server_name) {
        py::gil_scoped_release rel;
        bench::tls::write_test_pki(directory, server_name);
      },
      py::arg("directory"), py::arg("server_name") = "localhost",
      "A throwaway PKI in an existing directory (tests): ca-, server-, client-, expired- and rogue- cert/key PEMs.");
}

}  // namespace livemig::py_bindings
