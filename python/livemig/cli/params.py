"""The command line's parsers and parameter types: pure functions raising ValueError with the
message the user sees, and click types around them. The API's configs run the same checks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import click

from livemig import wire
from livemig.memory import system_page_size

PAGE_SIZE = system_page_size()
Side = Literal["both", "src", "dst"]
_KNOWN_CAPABILITIES = ", ".join(sorted(wire.ALL_CAPABILITIES))


_SIZE_RE = re.compile(r"(?P<num>[0-9]+) *(?:(?P<unit>[KMGT])(?:I?B)?)?", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, page_size: int = PAGE_SIZE) -> int:
    """Bytes in ``text``: a number with an optional binary unit (``256M``, ``1G``, ``4096K``,
    ``65536``; ``KiB``/``KB`` spellings too). It must be a positive multiple of ``page_size``."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"{text!r} is not a size: use a number of bytes or a unit, like 256M, 1G, 4096K"
        )
    n = int(m["num"]) * _UNITS[(m["unit"] or "").upper()]
    if n <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    if n % page_size:
        raise ValueError(
            f"{text!r} ({n} bytes) is not a multiple of the page size ({page_size} bytes)"
        )
    return n


def parse_capability_spec(spec: str) -> tuple[Side, str]:
    """``NAME`` (both sides), ``src:NAME`` or ``dst:NAME``; NAME one of wire.ALL_CAPABILITIES."""
    side: Side = "both"
    name = spec
    if ":" in spec:
        prefix, _, name = spec.partition(":")
        if prefix not in ("src", "dst"):
            raise ValueError(f"{spec!r}: unknown side {prefix!r}; use NAME, src:NAME or dst:NAME")
        side = "src" if prefix == "src" else "dst"
    if name not in wire.ALL_CAPABILITIES:
        raise ValueError(
            f"{spec!r}: unknown capability {name!r}; known: {_KNOWN_CAPABILITIES}"
        )
    return side, name


def split_capabilities(specs: Iterable[tuple[Side, str]]) -> tuple[frozenset[str], frozenset[str]]:
    """The capabilities the source and the destination withhold, from parsed specs."""
    src: set[str] = set()
    dst: set[str] = set()
    for side, name in specs:
        if side in ("both", "src"):
            src.add(name)
        if side in ("both", "dst"):
            dst.add(name)
    return frozenset(src), frozenset(dst)


# ---- click parameter types ----


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class CapabilityType(click.ParamType):
    name = "NAME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[Side, str]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_capability_spec(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class AddressType(click.ParamType):
    name = "ADDRESS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> wire.Address:
        if isinstance(value, wire.Address):
            return value
        try:
            return wire.parse_address(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class NumberType(click.ParamType):
    """A finite float within [lo, hi] (``hi`` None: unbounded); ``positive``: above lo."""

    name = "NUMBER"

    def __init__(self, lo: float = 0.0, hi: float | None = None, positive: bool = False,
                 below_hi: bool = False) -> None:
        self.lo, self.hi, self.positive, self.below_hi = lo, hi, positive, below_hi

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and x <= self.lo:
            self.fail(f"{value} must be greater than {self.lo:g}", param, ctx)
        if self.hi is None:
            if x < self.lo:
                self.fail(f"{value} must be at least {self.lo:g}", param, ctx)
        elif self.below_hi and not self.lo <= x < self.hi:
            self.fail(f"{value} must be at least {self.lo:g} and below {self.hi:g}", param, ctx)
        elif not self.lo <= x <= self.hi:
            self.fail(f"{value} must be between {self.lo:g} and {self.hi:g}", param, ctx)
        return x


class QueueSizeType(SizeType):
    """A postcopy queue bound: a size of at least wire.MIN_POSTCOPY_QUEUE_BYTES, or 0 for none."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        n = 0 if str(value).strip() == "0" else super().convert(value, param, ctx)
        try:
            return wire.check_queue_bytes(n)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def tls_options(peer_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The certificate options both commands take (x509 keying; ``peer_help`` says whose name
    --tls-peer-name checks)."""
    opts = [
        click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="This side's certificate (chain), PEM: TLS keyed with certificates (needs --tls-key, --tls-ca)."),
        click.option("--tls-key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="The certificate's private key, PEM."),
        click.option("--tls-ca", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="CA certificates (PEM) the peer's certificate must chain to."),
        click.option("--tls-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Certificates laid out like QEMU's tls-creds-x509: ca-cert.pem, server-cert.pem,"
                     " server-key.pem, client-cert.pem, client-key.pem."),
        click.option("--tls-peer-name", default=None, metavar="NAME", help=peer_help),
    ]

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def tls_settings(cert: str | None, key: str | None, ca: str | None, directory: str | None,
                 peer_name: str | None) -> wire.TlsSettings:
    """The certificate options as settings; a mistake is a usage error (exit code 2)."""
    try:
        return wire.TlsSettings(cert=cert, key=key, ca=ca, directory=directory, peer_name=peer_name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def keepalive_options(f: Any) -> Any:
    """``--keepalive-idle/-interval/-count``: TCP keepalive on every channel (wire.Keepalive)."""
    d = wire.DEFAULT_KEEPALIVE
    for name, default, what in reversed((
        ("--keepalive-idle", d.idle_s, "Seconds a channel is idle before TCP keepalive probes it (0: off)."),
        ("--keepalive-interval", d.interval_s, "Seconds between keepalive probes."),
        ("--keepalive-count", d.count, "Unanswered probes that end the connection (so recovery starts)."),
    )):
        f = click.option(name, type=int, default=default, show_default=True, metavar="N", help=what)(f)
    return f


def make_keepalive(idle: int, interval: int, count: int) -> wire.Keepalive:
    """The options above as a wire.Keepalive; click.BadParameter naming the option when out of range."""
    try:
        return wire.Keepalive(idle_s=idle, interval_s=interval, count=count)
    except (TypeError, ValueError) as e:
        opt = str(e).split(" must ")[0].replace("keepalive ", "--keepalive-")
        raise click.BadParameter(str(e), param_hint=f"'{opt}'") from None


SIZE = SizeType()
QUEUE_SIZE = QueueSizeType()
QUEUE_DEFAULT = f"{wire.POSTCOPY_QUEUE_BYTES >> 10}K"
QUEUE_HELP = ("Postcopy: bytes of the background stream the kernel may queue on the main channel"
               " (0: its autotuned buffers; a long fat link wants more).")
CAPABILITY = CapabilityType()
ADDRESS = AddressType()



__all__ = [
    "ADDRESS",
    "CAPABILITY",
    "PAGE_SIZE",
    "QUEUE_DEFAULT",
    "QUEUE_HELP",
    "QUEUE_SIZE",
    "SIZE",
    "NumberType",
    "Side",
    "keepalive_options",
    "make_keepalive",
    "parse_capability_spec",
    "parse_size",
    "split_capabilities",
    "tls_options",
    "tls_settings",
]
