"""Encryption on the wire (docs/protocol.md, "Encryption"): one side's TLS settings, what its HELLO
says about TLS, the rule both sides apply to decide whether a connection is encrypted and how it is
keyed, and the TLS 1.3 channel the core runs on each socket afterwards. The records themselves are
sealed and opened in C++ (:class:`livemig._core.TlsChannel`); nothing here runs per frame."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from livemig import _core
from livemig.errors import AuthenticationError, ProtocolError

Keying = Literal["psk", "x509"]
RecordLayer = Literal["direct", "openssl"]
TlsRole = Literal["client", "server"]

#: Shortest shared secret that keys TLS (the core derives each channel's PSK from it with HKDF).
MIN_PSK_SECRET_BYTES = 16
#: The exporter label (RFC 8446 7.5) of the secret that keys an x509 session's other channels.
CHANNEL_PSK_LABEL = "EXPORTER-livemig-v1 channel psk"
_PSK, _X509 = 1 << 0, 1 << 1
_KEYING_BITS: dict[Keying, int] = {"psk": _PSK, "x509": _X509}
_KEYING_CODES: dict[Keying | None, int] = {None: 0, "psk": 1, "x509": 2}
_REQUIRED, _DECLINED = 1 << 0, 1 << 1
#: The HELLO's TLS tail, after the 76 bytes of the version-1 body (older peers ignore it): flags
#: (bit 0 requires encryption, bit 1 declines it), the keyings this side holds keys for (bit 0 the
#: shared secret, bit 1 certificates), two reserved bytes.
TLS_TAIL = struct.Struct("<BBH")
#: Files of an x509 directory (QEMU's tls-creds-x509 layout), per role.
DIR_FILES = {"client": ("client-cert.pem", "client-key.pem", "ca-cert.pem"),
             "server": ("server-cert.pem", "server-key.pem", "ca-cert.pem")}


def _readable(path: str, what: str) -> None:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"cannot read the {what} {path!r}")


@dataclass(frozen=True)
class TlsSettings:
    """One side's certificates and how its records run. x509 keying: ``cert``, ``key`` and ``ca``
    (PEM files), or ``directory`` laid out like QEMU's tls-creds-x509 (``ca-cert.pem``,
    ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``).
    ``peer_name``: the DNS name or IP address the peer's certificate must carry (the source's
    default: the destination's host; the destination's default: any certificate its CA signed).
    Without certificates, the shared secret keys TLS. ``record_layer``: livemig's own record layer
    (``direct``) or OpenSSL's (``openssl``, a copy more per side) where the kernel does not take
    the records (``ktls``)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    directory: str | None = None
    peer_name: str | None = None
    record_layer: RecordLayer = "direct"
    ktls: bool = True

    def __post_init__(self) -> None:
        files = (self.cert, self.key, self.ca)
        if self.directory is not None:
            if any(f is not None for f in files):
                raise ValueError("give the TLS certificates as a directory or as files (cert, key, ca), not both")
            if not os.path.isdir(self.directory):
                raise ValueError(f"no TLS directory {self.directory!r}")
        elif any(f is not None for f in files) and not all(f is not None for f in files):
            missing = [n for n, f in zip(("cert", "key", "ca"), files, strict=True) if f is None]
            raise ValueError(f"x509 keying needs a certificate, its key and the CA's certificates: {', '.join(missing)}"
                             " missing")
        for name, f in zip(("certificate", "private key", "CA certificates"), files, strict=True):
            if f is not None:
                _readable(f, name)
        if self.record_layer not in ("direct", "openssl"):
            raise ValueError(f"record_layer must be 'direct' or 'openssl', got {self.record_layer!r}")
        if self.peer_name is not None and not self.peer_name.strip():
            raise ValueError("the TLS peer name is empty")

    @property
    def x509(self) -> bool:
        """Certificates are configured."""
        return self.directory is not None or self.cert is not None

    def files(self, role: TlsRole) -> tuple[str, str, str]:
        """(certificate, key, CA) for ``role``; ValueError naming a file of the directory that is missing."""
        if self.directory is not None:
            paths = tuple(os.path.join(self.directory, f) for f in DIR_FILES[role])
            for p, what in zip(paths, ("certificate", "private key", "CA certificates"), strict=True):
                _readable(p, f"{role} {what} (a TLS directory holds {', '.join(DIR_FILES[role])})")
            return paths  # type: ignore[return-value]
        assert self.cert is not None and self.key is not None and self.ca is not None
        return self.cert, self.key, self.ca

    def context(self, role: TlsRole, peer_name: str = "") -> _core.TlsConfig:
        """The loaded credentials for ``role`` (certificates checked against their key); ValueError
        naming what is wrong."""
        cert, key, ca = self.files(role)
        return _core.TlsConfig.x509(role=role, cert=cert, key=key, ca=ca, peer_name=peer_name,
                                    ktls=self.ktls, record_layer=self.record_layer)

    def check(self, role: TlsRole) -> None:
        """Loads the certificates once for ``role``, so a bad file is found when the config is made."""
        if self.x509:
            self.context(role, "check.invalid" if role == "client" else "")


def check_encryption(encrypt: bool | None, secret: bytes | None, tls: TlsSettings, role: TlsRole,
                     disabled: frozenset[str]) -> None:
    """The configs' check: ``encrypt=True`` needs keys (a shared secret of at least 16 bytes, or
    certificates) and the ``tls`` capability; certificates must load. ValueError otherwise."""
    tls.check(role)
    if encrypt is True:
        if "tls" in disabled:
            raise ValueError("encryption was asked for, but the 'tls' capability is withheld")
        if not tls.x509 and secret is None:
            raise ValueError("encryption needs keys: a shared secret (--secret-file) or certificates"
                             " (--tls-cert, --tls-key, --tls-ca, or --tls-dir)")
        if not tls.x509 and secret is not None and len(secret) < MIN_PSK_SECRET_BYTES:
            raise ValueError(f"a shared secret that keys TLS must hold at least {MIN_PSK_SECRET_BYTES} bytes,"
                             f" this one holds {len(secret)}")


# ---- the HELLO's word on TLS, and the rule both sides apply ----


@dataclass(frozen=True)
class TlsOffer:
    """What one side's HELLO says about TLS: whether it speaks it at all (the ``tls`` capability,
    and a TLS tail), which keys it holds, and whether it requires or declines encryption."""

    speaks: bool = False
    keyings: frozenset[Keying] = frozenset()
    required: bool = False
    declined: bool = False

    def pack(self) -> bytes:
        bits = 0
        for k in self.keyings:
            bits |= _KEYING_BITS[k]
        return TLS_TAIL.pack((_REQUIRED if self.required else 0) | (_DECLINED if self.declined else 0), bits, 0)

    @classmethod
    def unpack(cls, speaks: bool, tail: bytes) -> TlsOffer:
        """From the ``tls`` capability and the bytes after the version-1 HELLO body (none: an older
        peer, which speaks no TLS)."""
        if len(tail) < TLS_TAIL.size:
            return cls()
        flags, bits, _ = TLS_TAIL.unpack_from(tail)
        keyings = frozenset(k for k, b in _KEYING_BITS.items() if bits & b)
        return cls(speaks, keyings, bool(flags & _REQUIRED), bool(flags & _DECLINED))


def side_offer(speaks: bool, encrypt: bool | None, secret: bytes | None, tls: TlsSettings, peer_loopback: bool,
               insecure: bool = False) -> TlsOffer:
    """One side's offer. ``encrypt``: True requires encryption, False declines it, None requires it
    from a peer beyond loopback (unless the side is ``insecure``, a listener's opt-out). A side whose
    only keys are certificates can authenticate only through TLS, so it always requires it."""
    if not speaks or encrypt is False:
        return TlsOffer(speaks=speaks, declined=speaks)
    keyings: set[Keying] = set()
    if secret is not None and len(secret) >= MIN_PSK_SECRET_BYTES:
        keyings.add("psk")
    if tls.x509:
        keyings.add("x509")
    required = bool(encrypt) or (not peer_loopback and not insecure) or (tls.x509 and secret is None)
    return TlsOffer(True, frozenset(keyings), required, False)


def _keys(keyings: frozenset[Keying]) -> str:
    names = {"psk": "a shared secret of at least 16 bytes", "x509": "certificates"}
    return " and ".join(names[k] for k in sorted(keyings)) or "no keys"


def settle(source: TlsOffer, destination: TlsOffer) -> Keying | None:
    """How a connection is encrypted, the same on both sides: not at all when neither side requires
    it; else keyed with certificates when both hold them, else with the shared secret.
    AuthenticationError saying why when one side requires encryption and it cannot be had."""
    if not (source.required or destination.required):
        return None
    who = "the source" if source.required else "the destination"
    for name, o in (("source", source), ("destination", destination)):
        if not o.speaks:
            raise AuthenticationError(f"{who} requires encryption (TLS 1.3) and the {name} does not speak it"
                                      " (an older livemig, or the 'tls' capability withheld)")
        if o.declined:
            raise AuthenticationError(f"{who} requires encryption (TLS 1.3) and the {name} declines it"
                                      " (--no-encrypt)")
        if not o.keyings:
            holder = "has" if who.endswith(name) else f"the {name} has"
            raise AuthenticationError(f"{who} requires encryption (TLS 1.3) and {holder} no keys for it"
                                      " (a shared secret of at least 16 bytes, or certificates)")
    common = source.keyings & destination.keyings
    preference: tuple[Keying, ...] = ("x509", "psk")
    for k in preference:
        if k in common:
            return k
    raise AuthenticationError(f"no common TLS keys: the source has {_keys(source.keyings)}, the destination"
                              f" {_keys(destination.keyings)}")


def keying_code(keying: Keying | None) -> int:
    """The keying's byte in ACCEPT (0: plaintext)."""
    return _KEYING_CODES[keying]


def keying_of(code: int) -> Keying | None | str:
    """Inverse of :func:`keying_code`; the code itself as text when it is unknown."""
    for k, c in _KEYING_CODES.items():
        if c == code:
            return k
    return f"unknown ({code})"


# ---- the channels ----


# Loaded contexts by what they were made from (an SSL_CTX costs about a millisecond with
# certificates in OpenSSL 3): a listener serving migration after migration, or a source resuming,
# loads its credentials once. Certificate files are keyed by their modification time, so a renewed
# certificate is loaded again.
_CONTEXTS: OrderedDict[tuple[object, ...], _core.TlsConfig] = OrderedDict()
_CONTEXTS_LOCK = threading.Lock()
_CONTEXTS_KEPT = 16


def _stamp(path: str) -> tuple[str, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return path, 0, 0
    return path, st.st_mtime_ns, st.st_size


class TlsKeys:
    """One side's loaded TLS contexts for a connection's channels (made on first use, or ahead with
    :meth:`preload`; shared with later connections made from the same keys unless ``shared`` is
    False: keys of one session)."""

    def __init__(self, secret: bytes | None, tls: TlsSettings, role: TlsRole, peer_name: str = "", *,
                 shared: bool = True) -> None:
        self.secret, self.tls, self.role, self.peer_name = secret, tls, role, peer_name
        self._own: dict[Keying, _core.TlsConfig] | None = None if shared else {}

    @classmethod
    def for_channels(cls, main: _core.TlsChannel, session: bytes, tls: TlsSettings, role: TlsRole) -> TlsKeys:
        """The keys of a session's other channels when its main channel ran x509: a secret exported
        from main's TLS session (known to its two ends alone), from which each channel derives its
        own PSK as with a shared secret, so it pays no certificate signatures again."""
        secret = main.export_keying_material(CHANNEL_PSK_LABEL, session, 32)
        return cls(secret, tls, role, shared=False)

    def _key(self, keying: Keying) -> tuple[object, ...]:
        common = (keying, self.role, self.tls.ktls, self.tls.record_layer)
        if keying == "psk":
            assert self.secret is not None
            return (*common, hashlib.sha256(self.secret).digest())
        return (*common, self.peer_name, *(_stamp(f) for f in self.tls.files(self.role)))

    def context(self, keying: Keying) -> _core.TlsConfig:
        """The context for ``keying`` (ValueError naming a file that cannot be loaded)."""
        if self._own is not None:
            if keying not in self._own:
                assert self.secret is not None and keying == "psk"
                self._own[keying] = _core.TlsConfig.psk(self.secret, role=self.role, ktls=self.tls.ktls,
                                                        record_layer=self.tls.record_layer)
            return self._own[keying]
        key = self._key(keying)
        with _CONTEXTS_LOCK:
            ctx = _CONTEXTS.get(key)
            if ctx is not None:
                _CONTEXTS.move_to_end(key)
                return ctx
        if keying == "psk":
            assert self.secret is not None
            ctx = _core.TlsConfig.psk(self.secret, role=self.role, ktls=self.tls.ktls,
                                      record_layer=self.tls.record_layer)
        else:
            ctx = self.tls.context(self.role, self.peer_name)
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = ctx
            while len(_CONTEXTS) > _CONTEXTS_KEPT:
                _CONTEXTS.popitem(last=False)
        return ctx

    def preload(self) -> None:
        """Loads the contexts of every keying this side holds keys for, ahead of the handshake
        (a listener does it while it waits); a file that cannot be loaded is reported then."""
        if self.secret is not None and len(self.secret) >= MIN_PSK_SECRET_BYTES:
            self.context("psk")
        if self.tls.x509:
            try:
                self.context("x509")
            except ValueError:
                pass

    def start(self, fd: int, keying: Keying, psk_context: bytes, transcript: bytes, timeout: float) -> _core.TlsChannel:
        """TLS 1.3 on the connected socket ``fd`` after the plaintext handshake: keyed as settled,
        with the PSK derived from ``psk_context`` (both HELLO bodies) and the plaintext handshake's
        ``transcript`` compared inside the tunnel. Raises what the core raises (AuthenticationError,
        ProtocolError, ConnectionLost), with the step named."""
        try:
            ch = _core.TlsChannel(self.context(keying), fd, psk_context if keying == "psk" else b"")
        except ValueError as e:
            raise AuthenticationError(f"TLS: {e}") from None
        ch.handshake(timeout, transcript)
        return ch


def channel_keying(kind: str, keying: Keying, keys: TlsKeys, channel_keys: TlsKeys | None) -> tuple[TlsKeys, Keying]:
    """The keys a channel's TLS handshake runs with: an urgent or page channel of an x509 session
    keys with the secret exported from its main channel (both sides apply the same rule); every
    other channel (main, a resume) as settled."""
    if kind in ("urgent", "pages") and keying == "x509":
        if channel_keys is None:
            raise ProtocolError(f"handshake: a {kind} channel of an x509 session without its main channel's keys")
        return channel_keys, "psk"
    return keys, keying


@dataclass(frozen=True)
class TlsReport:
    """What ran on a connection's channels (the reports' ``tls``)."""

    enabled: bool = False  #: every channel ran TLS 1.3
    keying: str = ""  #: ``psk`` (the shared secret) or ``x509`` (certificates)
    cipher: str = ""  #: the negotiated suite, e.g. ``TLS_AES_128_GCM_SHA256``
    #: who sealed and opened the records: ``userspace`` (livemig's record layer), ``openssl``
    #: (SSL_write / SSL_read), ``ktls`` (the kernel), or ``<send>+<recv>`` when the directions differ
    record_path: str = ""
    ktls: bool = False  #: the kernel took the records of some channel
    ktls_unavailable: str = ""  #: why it did not ('' when it did)
    peer: str = ""  #: the peer certificate's subject, or ``psk:livemig-v1``
    channels: int = 0  #: sockets with a TLS session
    handshake_ms: float = 0.0  #: the TLS handshakes' time on this side, summed over the channels

    @classmethod
    def of(cls, keying: str, channels: list[_core.TlsChannel], unix: bool) -> TlsReport:
        """The report of a connection whose ``channels`` ran TLS (plaintext: none)."""
        if not channels:
            return cls()
        paths = sorted({c.path for c in channels})
        return cls(True, keying, channels[0].cipher, ",".join(paths),
                   any(c.ktls_send or c.ktls_recv for c in channels), kernel_tls_reason(channels[0], unix),
                   channels[0].peer_identity, len(channels), sum(c.handshake_seconds for c in channels) * 1e3)


def kernel_tls_reason(channel: _core.TlsChannel, unix: bool) -> str:
    """Why the kernel (kTLS) did not take a channel's records ('' when it did)."""
    if channel.ktls_send and channel.ktls_recv:
        return ""
    if unix:
        return "kTLS needs TCP: this is a Unix socket"
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            ulps = f.read().split()
    except OSError:
        ulps = []
    if "tls" not in ulps:
        return "the kernel has no tls ULP (built without CONFIG_TLS, or the tls module not loaded)"
    return "the kernel did not take the keys (suite or kernel version)"


__all__ = [
    "CHANNEL_PSK_LABEL",
    "DIR_FILES",
    "MIN_PSK_SECRET_BYTES",
    "TLS_TAIL",
    "Keying",
    "RecordLayer",
    "TlsKeys",
    "TlsOffer",
    "TlsReport",
    "TlsRole",
    "TlsSettings",
    "channel_keying",
    "check_encryption",
    "kernel_tls_reason",
    "keying_code",
    "keying_of",
    "settle",
    "side_offer",
]
