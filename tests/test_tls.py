"""Encryption on the wire (docs/protocol.md, "Encryption"): what each side's HELLO says, the rule
both apply, TLS 1.3 on every channel with either keying, and every refusal with its error on both
sides and a bounded wait: a plaintext or older peer against an encrypting one, a wrong secret, a
wrong, expired or misnamed certificate, a peer that stops mid-handshake, a HELLO altered in
transit, a byte flipped after the handshake (never placed), and a whole session played again."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tls_helpers import (
    NPAGES,
    OTHER_SECRET,
    PAGE,
    SECRET,
    Accepting,
    Pki,
    connect_both,
    make_pki,
    opts,
)
from tls_relay import Attack, TlsRelay, replay

from livemig import _core, wire
from livemig.errors import AuthenticationError, ConnectionLost, ProtocolError
from livemig.protocol import FrameType
from livemig.wire.tls import TlsOffer, settle

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _pattern(seed: int = 1) -> np.ndarray:
    a = np.random.default_rng(seed).integers(1, 256, size=NPAGES * PAGE, dtype=np.uint8)
    return a  # no zero page: every page goes with its bytes


def _close(*conns: object) -> None:
    for c in conns:
        if isinstance(c, wire.Connection):
            c.close()


# ---- the rule ----

PSK, X509 = frozenset({"psk"}), frozenset({"x509"})
BOTH = PSK | X509


@pytest.mark.parametrize(("source", "destination", "expect"), [
    (TlsOffer(True, PSK), TlsOffer(True, PSK), None),  # nobody requires it: plaintext
    (TlsOffer(True, PSK, required=True), TlsOffer(True, PSK), "psk"),
    (TlsOffer(True, PSK), TlsOffer(True, BOTH, required=True), "psk"),
    (TlsOffer(True, BOTH, required=True), TlsOffer(True, BOTH), "x509"),  # certificates first
    (TlsOffer(), TlsOffer(True, PSK), None),  # an older source, a destination that does not insist
    (TlsOffer(), TlsOffer(True, PSK, required=True), "the source does not speak it (an older livemig"),
    (TlsOffer(True, PSK, required=True), TlsOffer(), "the destination does not speak it"),
    (TlsOffer(True, declined=True), TlsOffer(True, PSK, required=True), "the source declines it (--no-encrypt)"),
    (TlsOffer(True, PSK, required=True), TlsOffer(True), "the destination has no keys for it"),
    (TlsOffer(True, X509, required=True), TlsOffer(True, PSK), "no common TLS keys: the source has certificates,"),
])
def test_both_sides_settle_encryption_by_one_rule(source: TlsOffer, destination: TlsOffer, expect: str | None) -> None:
    if expect in (None, "psk", "x509"):
        assert settle(source, destination) == expect
    else:
        with pytest.raises(AuthenticationError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            settle(source, destination)


def test_the_hello_tail_round_trips_and_an_older_hello_has_none() -> None:
    offer = TlsOffer(True, BOTH, required=True)
    assert TlsOffer.unpack(True, offer.pack()) == offer
    assert TlsOffer.unpack(True, TlsOffer(True, declined=True).pack()) == TlsOffer(True, declined=True)
    assert TlsOffer.unpack(False, b"") == TlsOffer()  # a 76-byte HELLO: an older peer


# ---- encrypted connections ----


@pytest.mark.parametrize("keying", ["psk", "x509"])
def test_every_channel_runs_tls_and_carries_pages_both_ways(keying: str, pki: Pki) -> None:
    if keying == "psk":
        src, dst = opts(secret=SECRET, encrypt=True), opts(region_bytes=0, secret=SECRET)
    else:  # certificates only: both sides then require TLS; the source checks the name "localhost"
        src = opts(tls=pki.settings("client", peer_name="localhost"))
        dst = opts(region_bytes=0, tls=pki.settings("server", peer_name="client.livemig.test"))
    s, d, _ = connect_both(src, dst)
    assert isinstance(s, wire.Connection) and isinstance(d, wire.Connection), (s, d)
    with s, d:
        assert s.negotiated == d.negotiated and s.negotiated.encryption == keying
        assert "tls" in s.negotiated.capabilities
        chans = s.channels()
        assert [c.kind for c in chans] == ["main", "urgent", "pages", "pages"]
        assert all(c.tls is not None and c.tls.established for c in chans + d.channels())
        rep = s.tls_report()
        assert (rep.enabled, rep.keying, rep.channels, rep.record_path) == (True, keying, 4, "userspace")
        assert rep.cipher == "TLS_AES_128_GCM_SHA256" and rep.handshake_ms > 0
        assert not rep.ktls and "tls ULP" in rep.ktls_unavailable  # this kernel: no CONFIG_TLS
        assert rep.peer == ("psk:livemig-v1" if keying == "psk" else s.main.tls.peer_identity)  # type: ignore[union-attr]
        if keying == "x509":  # main verified certificates; the other channels keyed from main's session
            assert "CN=localhost" in rep.peer and "CN=livemig source" in d.main.tls.peer_identity  # type: ignore[union-attr]
            assert {c.tls.peer_identity for c in chans[1:] + d.channels()[1:]} == {"psk:livemig-v1"}  # type: ignore[union-attr]
        # Pages on every source channel, each read through its TLS session into the region.
        src_pages = _pattern()
        region = np.zeros_like(src_pages)
        received = _core.PageBitmap(NPAGES)
        for i, (sc, dc) in enumerate(zip(chans, d.channels(), strict=True)):
            part = slice(i * NPAGES // 4, (i + 1) * NPAGES // 4)
            w = s.writer(sc)
            w.send_region(src_pages, np.array([[part.start, part.stop - part.start]], dtype=np.uint64))
            w.send_end()
            r = d.reader(dc)
            r.attach_region(region, received)
            end = r.next()  # the pages land in the region; END is the one frame kept
            assert end is not None and end.type == FrameType.END
        assert received.count() == NPAGES and np.array_equal(region, src_pages)
        # The return path: the main socket's other direction, through the same session.
        d.writer().send_ack(1, 7)
        f = s.reader().next()
        assert f is not None and (f.count, f.value) == (1, 7)


def test_plaintext_stays_the_default_on_loopback_and_the_capability_is_announced() -> None:
    s, d, _ = connect_both(opts(secret=SECRET), opts(region_bytes=0, secret=SECRET))
    assert isinstance(s, wire.Connection) and isinstance(d, wire.Connection)
    with s, d:
        assert "tls" in s.negotiated.capabilities and s.negotiated.encryption is None
        assert s.main.tls is None and not s.tls_report().enabled


# ---- refusals: both sides say why, within the timeout ----

REFUSALS = {
    "plaintext source, encrypting listener": (
        {"encrypt": False}, {"secret": SECRET, "encrypt": True},
        AuthenticationError, "the destination requires encryption (TLS 1.3) and the source declines it"),
    "older source, encrypting listener": (
        {"capabilities": wire.Capabilities.default(2).without("tls")}, {"secret": SECRET, "encrypt": True},
        AuthenticationError, "the source does not speak it (an older livemig"),
    "encrypting source, destination without tls": (
        {"secret": SECRET, "encrypt": True}, {"capabilities": wire.Capabilities.all(2).without("tls")},
        AuthenticationError, "the source requires encryption (TLS 1.3) and the destination does not speak it"),
    "wrong secret": (
        {"secret": SECRET, "encrypt": True}, {"secret": OTHER_SECRET},
        AuthenticationError, "PSK binder does not verify|refused our key"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_clear_on_both_sides(case: str) -> None:
    src_kw, dst_kw, error, text = REFUSALS[case]
    s, d, took = connect_both(opts(**src_kw), opts(region_bytes=0, **dst_kw))
    _close(s, d)
    assert isinstance(s, error) and isinstance(d, error), (s, d)
    if case == "wrong secret":
        assert "PSK binder does not verify" in str(d) and "refused our key" in str(s), (s, d)
    else:
        assert text in str(d) and text in str(s), (s, d)  # the destination's REJECT carries its words
    assert took < 3.0  # no timeout was waited for


def test_an_older_destination_is_refused_by_an_encrypting_source_without_a_hang() -> None:
    """A peer of the version before TLS (a 76-byte HELLO, no tls capability), which goes on to
    ACCEPT in plaintext: the source refuses at its HELLO and tells it why (REJECT)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def older_destination() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(5)
            head = conn.recv(16, socket.MSG_WAITALL)
            conn.recv(struct.unpack_from("<I", head, 12)[0], socket.MSG_WAITALL)
            caps = wire.Capabilities.default().without("tls").to_bits()
            body = struct.pack("<BBHIQQHBB16s32s", 2, 0, 0, PAGE, 0, caps, 0, 0, 0, bytes(16), bytes(32))
            accept = struct.pack("<QH6x", caps, 0)
            for mtype, b in ((1, body), (3, accept)):
                conn.sendall(struct.pack("<8sHBBI", wire.MAGIC, 1, mtype, 0, len(b)) + b)
            try:
                while chunk := conn.recv(4096):
                    heard.append(chunk)
            except OSError:
                pass

    t = threading.Thread(target=older_destination, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="the destination does not speak it \\(an older livemig"):
        wire.connect(f"127.0.0.1:{lsock.getsockname()[1]}", opts(secret=SECRET, encrypt=True))
    assert time.monotonic() - t0 < 2.0
    t.join(10)
    lsock.close()
    said = b"".join(heard)
    assert said[10] == 4 and b"does not speak it" in said  # a REJECT, with the reason, in the frozen format


@pytest.mark.parametrize(("case", "src_cert", "src_peer", "dst_cert", "src_error", "dst_error"), [
    ("client from another CA", "rogue", "localhost", "server", "refused our certificate",
     "failed verification: unable to get local issuer certificate"),
    ("expired server", "client", "localhost", "expired", "failed verification: certificate has expired",
     "refused our certificate"),
    ("wrong peer name", "client", "dest.example", "server", "does not name 'dest.example'",
     "refused our certificate"),
])
def test_certificates_that_do_not_verify_are_refused(case: str, src_cert: str, src_peer: str, dst_cert: str,
                                                     src_error: str, dst_error: str, pki: Pki) -> None:
    src = opts(tls=pki.settings("client", cert=src_cert, peer_name=src_peer))
    dst = opts(region_bytes=0, tls=pki.settings("server", cert=dst_cert))
    s, d, took = connect_both(src, dst)
    _close(s, d)
    assert isinstance(s, AuthenticationError) and src_error in str(s), s
    assert isinstance(d, AuthenticationError) and dst_error in str(d), d
    assert took < 3.0


def test_keys_that_have_nothing_in_common_are_refused(pki: Pki) -> None:
    s, d, _ = connect_both(opts(tls=pki.settings("client", peer_name="localhost")), opts(region_bytes=0, secret=SECRET))
    _close(s, d)
    assert isinstance(s, AuthenticationError) and isinstance(d, AuthenticationError)
    assert "no common TLS keys: the source has certificates, the destination a shared secret" in str(d)
    assert "no common TLS keys" in str(s)


@pytest.mark.parametrize("direction", ["to_source", "to_destination"])
def test_a_peer_that_stops_mid_handshake_is_cut_off_at_the_timeout(direction: str) -> None:
    """The relay forwards the plaintext handshake and the first TLS record one way, then nothing
    that way (sockets open: a peer gone silent, not one that closed)."""
    attack = Attack(stall=(direction, 1 if direction == "to_destination" else 0))  # type: ignore[arg-type]
    relays: list[TlsRelay] = []

    def via(address: str) -> str:
        relays.append(TlsRelay(address, attack))
        return relays[-1].address

    try:
        s, d, took = connect_both(opts(secret=SECRET, encrypt=True, timeout=1.5),
                                  opts(region_bytes=0, secret=SECRET, timeout=1.5), via=via)
    finally:
        for r in relays:
            r.close()
    _close(s, d)
    assert attack.stalled.is_set()
    assert isinstance(s, ConnectionLost) and isinstance(d, ConnectionLost), (s, d)
    assert "TLS handshake" in str(s) and "TLS handshake" in str(d)
    assert 1.0 < took < 4.0  # the source gave up at its deadline, not before and not much after


def test_a_hello_altered_in_transit_is_refused_inside_the_tunnel(pki: Pki) -> None:
    """x509 keying: the HELLOs do not key the session, so a changed nonce would pass everything
    else; the transcript both sides compare inside the tunnel does not."""
    attack = Attack(alter_hello=60)  # a byte of the source's nonce
    relays: list[TlsRelay] = []

    def via(address: str) -> str:
        relays.append(TlsRelay(address, attack))
        return relays[-1].address

    try:
        s, d, _ = connect_both(opts(tls=pki.settings("client", peer_name="localhost")),
                               opts(region_bytes=0, tls=pki.settings("server")), via=via)
    finally:
        for r in relays:
            r.close()
    _close(s, d)
    for e in (s, d):
        assert isinstance(e, ProtocolError) and "altered in transit" in str(e), e


@pytest.mark.parametrize("keying", ["psk", "x509"])
def test_a_byte_flipped_after_the_handshake_is_detected_and_never_placed(keying: str, pki: Pki) -> None:
    attack = Attack(flip_page_record=5)
    relays: list[TlsRelay] = []

    def via(address: str) -> str:
        relays.append(TlsRelay(address, attack))
        return relays[-1].address

    if keying == "psk":
        src, dst = opts(secret=SECRET, encrypt=True), opts(region_bytes=0, secret=SECRET)
    else:
        src, dst = opts(tls=pki.settings("client", peer_name="localhost")), opts(region_bytes=0, tls=pki.settings("server"))
    try:
        s, d, _ = connect_both(src, dst, via=via)
        assert isinstance(s, wire.Connection) and isinstance(d, wire.Connection), (s, d)
        with s, d:
            src_pages = _pattern(2)
            region = np.zeros_like(src_pages)
            received = _core.PageBitmap(NPAGES)
            w = s.writer()
            w.send_region(src_pages, np.array([[0, NPAGES]], dtype=np.uint64))
            w.send_end()
            r = d.reader()
            r.attach_region(region, received)
            with pytest.raises(ProtocolError, match="failed authentication"):
                while r.next() is not None:
                    pass
    finally:
        for rl in relays:
            rl.close()
    assert attack.flipped.is_set()
    # Nothing unverified was left: every byte holds the source's byte or was never written (or was
    # wiped: zero; the source has no zero byte), and every page marked received is the source's.
    assert ((region == src_pages) | (region == 0)).all(), np.flatnonzero((region != src_pages) & (region != 0))
    got, want = region.reshape(NPAGES, PAGE), src_pages.reshape(NPAGES, PAGE)
    same = (got == want).all(axis=1)
    marked = received.nonzero()
    assert len(marked) < NPAGES and same[marked].all()
    digests = _core.page_digests(region, PAGE)
    assert np.array_equal(digests[marked], _core.page_digests(src_pages, PAGE)[marked])


@pytest.mark.parametrize("keying", ["psk", "x509"])
def test_a_replayed_capture_of_a_whole_session_is_refused(keying: str, pki: Pki, tmp_path: Path) -> None:
    """A whole session (handshake, pages, END) captured on the path, played to a destination with
    the same keys: its fresh nonce and TLS random make the old handshake fail; nothing is accepted."""
    if keying == "psk":
        src, dst = opts(secret=SECRET, encrypt=True), opts(region_bytes=0, secret=SECRET)
    else:
        src, dst = opts(tls=pki.settings("client", peer_name="localhost")), opts(region_bytes=0, tls=pki.settings("server"))
    relays: list[TlsRelay] = []

    def via(address: str) -> str:
        relays.append(TlsRelay(address))
        return relays[-1].address

    try:
        s, d, _ = connect_both(src, dst, via=via)
        assert isinstance(s, wire.Connection) and isinstance(d, wire.Connection), (s, d)
        with s, d:
            w = s.writer()
            w.send_region(_pattern(3), np.array([[0, NPAGES]], dtype=np.uint64))
            w.send_end()
            r = d.reader()
            r.attach_region(np.zeros(NPAGES * PAGE, np.uint8), _core.PageBitmap(NPAGES))
            end = r.next()
            assert end is not None and end.type == FrameType.END
    finally:
        for rl in relays:
            rl.close()
    capture = bytes(relays[0].captured[0])
    assert len(capture) > NPAGES * PAGE  # the pages went by
    with wire.Listener("127.0.0.1:0", strict=True) as lst:
        acc = Accepting(lst, dst)
        replay(str(lst.address), capture)
        out = acc.result()
    _close(out)
    assert isinstance(out, (AuthenticationError, ProtocolError)), out
