"""Shared pieces of the encryption tests: a throwaway PKI, keys, options, and a listener whose
accept runs in a thread (so a test sees both sides' errors)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig import _core, wire

PAGE = 4096
NPAGES = 256
REGION = NPAGES * PAGE
SECRET = b"tls-test-secret-0123456789"
OTHER_SECRET = b"tls-test-secret-9876543210"


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for ``localhost`` and 127.0.0.1, a client certificate, an
    expired server certificate and a client certificate from another CA (PEM files)."""

    dir: Path

    def file(self, name: str) -> str:
        return str(self.dir / name)

    def settings(self, role: str, cert: str = "", peer_name: str | None = None, **kw: Any) -> wire.TlsSettings:
        """``role``'s certificate (or ``cert``: a prefix such as ``expired`` or ``rogue``)."""
        prefix = cert or role
        return wire.TlsSettings(cert=self.file(f"{prefix}-cert.pem"), key=self.file(f"{prefix}-key.pem"),
                                ca=self.file("ca-cert.pem"), peer_name=peer_name, **kw)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _core._bench.tls_write_test_pki(str(directory), "localhost")
    return Pki(directory)


def opts(**kw: Any) -> wire.WireOptions:
    base: dict[str, Any] = {"page_size": PAGE, "region_bytes": REGION, "timeout": 3.0,
                            "capabilities": wire.Capabilities.default(2)}
    base.update(kw)
    return wire.WireOptions(**base)


@dataclass
class Accepting:
    """``Listener.accept`` in a thread; :meth:`result` gives its Connection or its exception."""

    listener: wire.Listener
    options: wire.WireOptions
    outcome: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            self.outcome.append(self.listener.accept(self.options, wait=10.0))
        except BaseException as e:
            self.outcome.append(e)
        self.seconds = time.monotonic() - t0

    def result(self) -> wire.Connection | BaseException:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the listener's accept did not return"
        out = self.outcome[0]
        assert isinstance(out, (wire.Connection, BaseException))
        return out


def connect_both(src: wire.WireOptions, dst: wire.WireOptions, *, insecure: bool = False,
                 via: Callable[[str], str] | None = None
                 ) -> tuple[wire.Connection | BaseException, wire.Connection | BaseException, float]:
    """Connects a source with ``src`` to a listener with ``dst`` on 127.0.0.1 (through the
    address ``via`` gives for the listener's, e.g. a relay's). Returns the source's connection or
    error, the destination's, and the source's wall time."""
    with wire.Listener("127.0.0.1:0", insecure=insecure, strict=True) as lst:  # its first refusal is the result
        acc = Accepting(lst, dst)
        t0 = time.monotonic()
        try:
            target = str(lst.address) if via is None else via(str(lst.address))
            s: wire.Connection | BaseException = wire.connect(target, src)
        except BaseException as e:
            s = e
        took = time.monotonic() - t0
        d = acc.result()
    return s, d, took


__all__ = ["NPAGES", "OTHER_SECRET", "PAGE", "REGION", "SECRET", "Accepting", "Pki", "connect_both", "make_pki",
           "opts"]
