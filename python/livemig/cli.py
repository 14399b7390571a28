"""The ``livemig`` command line: parse, build configs, call migrate/serve, display.

Mistakes a user can make end as one line on stderr (``livemig: error: ...``): exit code 2 for
usage errors (found before anything starts), 1 for failures. ``--json`` prints exactly one JSON
object on stdout, also when the migration fails.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import click
from rich.console import Console

import livemig
from livemig import display, local, migration, recovery, wire
from livemig.errors import LivemigError, MigrationError
from livemig.guest import GuestConfig

PAGE_SIZE = mmap.PAGESIZE
WORKLOADS = ("increment", "random", "hotset", "idle")
Side = Literal["both", "src", "dst"]
_KNOWN_CAPABILITIES = ", ".join(sorted(wire.ALL_CAPABILITIES))

# ---- parsers (pure functions: ValueError with the message the user sees) ----

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


def is_loopback(address: wire.Address) -> bool:
    """The address is a Unix socket or a TCP host that resolves only to loopback addresses."""
    return wire.is_loopback(address)


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


SIZE = SizeType()
QUEUE_SIZE = QueueSizeType()
_QUEUE_DEFAULT = f"{wire.POSTCOPY_QUEUE_BYTES >> 10}K"
_QUEUE_HELP = ("Postcopy: bytes of the background stream the kernel may queue on the main channel"
               " (0: its autotuned buffers; a long fat link wants more).")
CAPABILITY = CapabilityType()
ADDRESS = AddressType()


# ---- the command group and its error handling ----


class _Group(click.Group):
    """A group whose errors are one ``livemig: error:`` line, never a usage block or traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            _error(e.format_message())
            sys.exit(2)
        except click.ClickException as e:
            _error(e.format_message())
            sys.exit(e.exit_code)
        except click.Abort:
            _error("interrupted")
            sys.exit(130)
        except LivemigError as e:
            _error(describe(e))
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _error(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the message
    sys.stderr.write(f"livemig: error: {line}\n")
    sys.stderr.flush()


def describe(e: BaseException) -> str:
    """An exception as one line, with its cause when the message does not already say it."""
    msg = str(e) or type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg = f"{msg}: {cause}"
    return msg


def _usage(message: str, param: str | None = None) -> click.UsageError:
    if param:
        return click.BadParameter(message, param_hint=f"'{param}'")
    return click.UsageError(message)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(livemig.__version__, prog_name="livemig")
def main() -> None:
    """Live-migrate memory regions between processes and hosts.

    Precopy with kernel dirty tracking, postcopy on userfaultfd, and virtio-balloon free page hints
    that stay correct under postcopy.
    """


def _stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(display.json_ready(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def _load_secret(path: str | None) -> bytes | None:
    try:
        return wire.load_secret(path)
    except (OSError, ValueError) as e:
        what = getattr(e, "strerror", None) or str(e)
        raise _usage(f"cannot use the secret: {what}", "--secret-file") from None


# ---- migrate ----


@main.command()
@click.option("--to", "to", type=ADDRESS, metavar="HOST:PORT",
              help="Destination (`livemig listen`); default: start one on loopback.")
@click.option("--size", type=SIZE, default="256M", show_default=True,
              help="Guest memory: bytes or 256M, 1G, 4096K (a multiple of the page size).")
@click.option("--workload", type=click.Choice(WORKLOADS), default="increment", show_default=True,
              help="What the guest does while migrating.")
@click.option("--dirty-rate", type=NumberType(0.0), default=0.0, metavar="PAGES_PER_S",
              help="Pages/s the workload writes (0: as fast as it can).")
@click.option("--free-fraction", type=NumberType(0.0, 1.0, below_hi=True), default=0.0, metavar="F",
              help="Share of guest memory free, in [0, 1).")
@click.option("--churn", type=NumberType(0.0), default=0.0, metavar="PAGES_PER_S",
              help="Pages allocated, written and freed per second.")
@click.option("--fill", type=click.Choice(("pattern", "zero")), default="pattern",
              show_default=True,
              help="Initial guest memory: non-zero pages, or all zero.")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True, metavar="N",
              help="Guest writer threads (increment: always 1).")
@click.option("--seed", type=int, default=1, show_default=True, help="Guest random seed.")
@click.option("--postcopy", is_flag=True, help="Switch to postcopy (default: precopy only).")
@click.option("--postcopy-after", type=click.IntRange(min=0), default=None, metavar="N",
              help="Precopy rounds before postcopy (needs --postcopy).")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None, metavar="N",
              help="Precopy rounds before switchover is forced.")
@click.option("--hints/--no-hints", default=True, show_default=True, help="Free page hinting.")
@click.option("--channels", type=click.IntRange(1, 1 + wire.MAX_EXTRA_CHANNELS), default=1,
              show_default=True, metavar="N", help="Page channels in precopy.")
@click.option("--downtime-limit", type=NumberType(0.0, positive=True), default=None, metavar="MS",
              help="Switch over once the rest fits this many ms (default 300).")
@click.option("--disable-capability", "disabled", type=CAPABILITY, multiple=True,
              metavar="[src:|dst:]NAME",
              help="Withhold a capability (both sides, or src:/dst: only). Repeatable. NAME: "
              f"{_KNOWN_CAPABILITIES}.")
@click.option("--verify", is_flag=True,
              help="Prove the destination holds the guest's latest memory.")
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help=f"Shared secret for the handshake (default: ${wire.SECRET_ENV}).")
@click.option("--timeout", type=NumberType(0.0, positive=True), default=30.0, show_default=True,
              metavar="S", help="Seconds a silent peer is waited for.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object on stdout.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Draw rounds and fault latency to FILE.png (needs livemig[plot]).")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@click.option("--postcopy-queue", type=QUEUE_SIZE, default=_QUEUE_DEFAULT, show_default=True,
              metavar="SIZE", help=_QUEUE_HELP)
@click.option("--reconnect-deadline", type=NumberType(0.0), default=60.0, show_default=True, metavar="S",
              help="Postcopy recovery: seconds a broken connection is paused and resumed (0: fail).")
@click.option("--manual-resume", is_flag=True,
              help="When paused, wait for `livemig resume` instead of reconnecting by itself.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Unix socket where `livemig resume PATH` reaches this migration.")
@click.option("-q", "--quiet", is_flag=True, help="No summary table.")
def migrate(
    to: wire.Address | None,
    size: int,
    workload: str,
    dirty_rate: float,
    free_fraction: float,
    churn: float,
    fill: str,
    threads: int,
    seed: int,
    postcopy: bool,
    postcopy_after: int | None,
    max_rounds: int | None,
    hints: bool,
    channels: int,
    downtime_limit: float | None,
    disabled: Sequence[tuple[Side, str]],
    verify: bool,
    secret_file: str | None,
    timeout: float,
    as_json: bool,
    plot_file: str | None,
    progress: bool | None,
    postcopy_queue: int,
    reconnect_deadline: float,
    manual_resume: bool,
    control_path: str | None,
    quiet: bool,
) -> int:
    """Migrate a guest of --size bytes running --workload, precopy unless --postcopy."""
    if manual_resume and control_path is None:
        raise _usage("--manual-resume needs --control PATH (where `livemig resume PATH` reaches it)")
    # Every usage error is found here, before a process or a byte of guest memory exists.
    if postcopy_after is not None and not postcopy:
        raise _usage("--postcopy-after needs --postcopy (the migration is precopy otherwise)")
    if workload == "increment" and churn > 0:
        raise _usage("--churn needs a workload other than increment"
                     " (its oracle needs a fixed set of pages)")
    if workload == "increment" and threads > 1:
        raise _usage("the increment workload runs one writer thread"
                     " (its oracle needs address order)",
                     "--threads")
    if size > wire.physical_memory_bytes():
        raise _usage(f"{size} bytes is more than this machine's memory", "--size")
    src_off, dst_off = split_capabilities(disabled)
    if to is not None and any(side == "dst" for side, _ in disabled):
        raise _usage("dst:NAME applies only to the embedded destination; with --to, pass"
                     " --disable-capability to `livemig listen` on the destination")
    if plot_file is not None:
        try:
            display.require_matplotlib()
        except display.PlotUnavailable as e:
            raise _usage(str(e)) from None
        parent = os.path.dirname(os.path.abspath(plot_file))
        if not os.path.isdir(parent):
            raise _usage(f"no directory {parent!r} for the plot", "--plot")
    secret = _load_secret(secret_file)

    defaults = migration.MigrationConfig()
    config = migration.MigrationConfig(
        postcopy=postcopy,
        postcopy_after=defaults.postcopy_after if postcopy_after is None else postcopy_after,
        max_rounds=defaults.max_rounds if max_rounds is None else max_rounds,
        downtime_limit_ms=defaults.downtime_limit_ms if downtime_limit is None else downtime_limit,
        hints=hints,
        channels=channels,
        disable_capabilities=src_off,
        secret=secret,
        verify=verify,
        timeout=timeout,
        reconnect_deadline_s=reconnect_deadline,
        auto_reconnect=not manual_resume,
        postcopy_queue_bytes=postcopy_queue,
    )
    control = recovery.MigrationControl()
    guest = GuestConfig(
        workload=workload,  # type: ignore[arg-type]
        page_size=PAGE_SIZE,
        rate=dirty_rate,
        free_fraction=free_fraction,
        churn=churn,
        seed=seed,
        fill=fill,  # type: ignore[arg-type]
        threads=threads,
    )
    mode: migration.Mode = "postcopy" if postcopy else "precopy"
    console = _stderr_console()

    dest_stderr = ""
    returned = False  # migrate() returned a result (else it raised before or while running)
    with ExitStack() as stack:
        dest: local.LocalDestination | None = None
        try:
            if to is None:
                args = ["--no-progress", "--quiet", "--max-size", str(size),
                        "--timeout", f"{timeout:g}", "--postcopy-queue", str(postcopy_queue)]
                args += [a for name in sorted(dst_off) for a in ("--disable-capability", name)]
                if secret_file is not None:
                    args += ["--secret-file", secret_file]
                dest = stack.enter_context(
                    local.local_destination(args, deadline=max(timeout, 20.0))
                )
                address = dest.address
            else:
                address = str(to)
            if control_path is not None:
                stack.enter_context(recovery.ControlServer(control_path, control))
            with display.progress_display(console, progress) as reporter:
                result = migration.migrate(address, size, guest, config, reporter, control)
            returned = True
        except (LivemigError, OSError, ValueError) as e:  # ValueError: a config the guest refused
            result = migration.MigrationResult(
                ok=False, mode=mode, region_bytes=size, page_size=PAGE_SIZE, error=describe(e)
            )
        if dest is not None:
            code = dest.wait(timeout if result.ok else 2.0)
            if code != 0 and result.ok:
                result.ok = False
                result.error = f"the local destination exited with code {code}"
            if not result.ok:
                dest_stderr = dest.stderr_text()

    if not quiet and returned:
        # (a run that raised has no table: its error line says it all)
        console.print(display.summary_table(result))
    if as_json:
        _print_json(result.to_json())
    if not result.ok:
        _error(f"migration failed: {result.error or 'see the summary'}")
        _relay_destination(dest_stderr)
    if plot_file is not None and returned:  # a run that raised has nothing to draw
        try:
            display.plot(result, plot_file)
        except (OSError, ValueError) as e:
            _error(f"cannot write the plot {plot_file}: {e}")
            return 1
    return 0 if result.ok else 1


def _relay_destination(text: str) -> None:
    """The embedded destination's own error lines, so a failure there is not hidden."""
    for line in text.splitlines():
        if line.strip():
            sys.stderr.write(f"livemig: destination: {line.removeprefix('livemig: ')}\n")
    sys.stderr.flush()


# ---- resume ----


@main.command()
@click.argument("control_path", metavar="PATH", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=ADDRESS, metavar="HOST:PORT", default=None,
              help="Resume towards this destination address (default: the one it used).")
def resume(control_path: str, to: wire.Address | None) -> int:
    """Resume a paused postcopy migration (`livemig migrate --control PATH`)."""
    try:
        answer = recovery.request_resume(control_path, None if to is None else str(to))
    except OSError as e:
        raise MigrationError(f"no migration at {control_path}: {e.strerror or e}") from None
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
    return 0


# ---- listen ----


@main.command()
@click.argument("address", type=ADDRESS)
@click.option("--once", is_flag=True, help="Serve one migration, then exit.")
@click.option("--announce", is_flag=True, help="Print 'listening on ADDRESS' first on stdout.")
@click.option("--disable-capability", "disabled", type=CAPABILITY, multiple=True, metavar="NAME",
              help=f"Withhold a capability. Repeatable. NAME: {_KNOWN_CAPABILITIES}.")
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help=f"Shared secret sources must prove (default: ${wire.SECRET_ENV}).")
@click.option("--insecure", is_flag=True, help="Allow listening beyond loopback without a secret.")
@click.option("--max-size", type=SIZE, default=None, help="Largest region accepted.")
@click.option("--postcopy-queue", type=QUEUE_SIZE, default=_QUEUE_DEFAULT, show_default=True,
              metavar="SIZE", help=_QUEUE_HELP)
@click.option("--resume-deadline", type=NumberType(0.0), default=60.0, show_default=True, metavar="S",
              help="Postcopy recovery: seconds a broken connection waits for the source to resume (0: fail).")
@click.option("--timeout", type=NumberType(0.0, positive=True), default=30.0, show_default=True,
              metavar="S", help="Seconds a silent peer is waited for.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each migration's summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@click.option("-q", "--quiet", is_flag=True, help="No summary table.")
def listen(
    address: wire.Address,
    once: bool,
    announce: bool,
    disabled: Sequence[tuple[Side, str]],
    secret_file: str | None,
    insecure: bool,
    max_size: int | None,
    postcopy_queue: int,
    resume_deadline: float,
    timeout: float,
    as_json: bool,
    progress: bool | None,
    quiet: bool,
) -> int:
    """Accept migrations on ADDRESS (host:port, [v6]:port or unix:/path; port 0: any free one)."""
    if any(side == "src" for side, _ in disabled):
        raise _usage("src:NAME makes no sense on the destination; use NAME or dst:NAME",
                     "--disable-capability")
    secret = _load_secret(secret_file)
    if address.family == "tcp":
        try:
            socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise _usage(f"cannot resolve {address.host!r}: {e.strerror or e}", "ADDRESS") from None
    if secret is None and not insecure and not is_loopback(address):
        raise _usage(
            f"refusing to listen on {address} beyond loopback without a shared secret: pass"
            f" --secret-file (or set ${wire.SECRET_ENV}), or --insecure to accept anyone"
        )
    config = migration.DestinationConfig(
        disable_capabilities=frozenset(name for _, name in disabled),
        secret=secret,
        max_region_bytes=max_size or 0,
        timeout=timeout,
        resume_deadline_s=resume_deadline,
        postcopy_queue_bytes=postcopy_queue,
    )
    try:
        listener = wire.Listener(address, insecure=insecure)
    except OSError as e:
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise MigrationError(f"cannot listen on {address}: {why}") from None
    console = _stderr_console()
    failed = False
    with listener:
        if announce:
            sys.stdout.write(f"{local.ANNOUNCE_PREFIX}{listener.address}\n")
            sys.stdout.flush()
        while True:
            returned = False
            try:
                with display.progress_display(console, progress) as reporter:
                    summary = migration.serve(listener, config, reporter)
                returned = True
            except (LivemigError, OSError, ValueError) as e:
                summary = migration.DestinationSummary(
                    ok=False, mode="precopy", region_bytes=0, error=describe(e)
                )
            if not quiet and returned:
                console.print(display.destination_table(summary))
            if as_json:
                _print_json(summary)
            if not summary.ok:
                failed = True
                _error(f"migration failed: {summary.error or 'see the summary'}")
            if once:
                break
    return 1 if failed else 0


# ---- bench ----


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as e:
        raise _usage(str(e), "--sizes") from None
    if not sizes:
        raise _usage("give at least one size, like 256M,1G", "--sizes")
    # A migration holds the source, the destination and a raw baseline's two buffers at once.
    if 4 * sizes[-1] > wire.physical_memory_bytes():
        raise _usage(f"{sizes[-1]} bytes needs four times that in memory,"
                     " more than this machine has", "--sizes")
    return sizes


@main.command()
@click.option("--quick", is_flag=True, help="256M only, fewer runs: under two minutes.")
@click.option("--sizes", default=None, metavar="SIZE[,SIZE...]",
              help="Region sizes for the migrations and syncs (default 256M,1G,4G; --quick: 256M).")
@click.option("--repeat", type=click.IntRange(1, 100), default=None, metavar="N",
              help="Runs of each migration (default 3).")
@click.option("--scenario", "patterns", multiple=True, metavar="PATTERN",
              help="Only scenarios whose name or group matches (shell pattern). Repeatable.")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@click.option("--json", "json_file", default=None, metavar="FILE",
              help="Write every figure as JSON to FILE ('-': stdout).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write PNG charts to DIR (needs livemig[plot]).")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@click.option("-q", "--quiet", is_flag=True, help="No table.")
def bench(quick: bool, sizes: str | None, repeat: int | None, patterns: Sequence[str],
          list_only: bool, json_file: str | None, plot_dir: str | None, progress: bool | None,
          quiet: bool) -> int:
    """Measure livemig on this machine, every figure beside a raw baseline from the same run."""
    from livemig import benchmark  # numpy-heavy; only this command needs it

    default_sizes = [256 << 20] if quick else [256 << 20, 1 << 30, 4 << 30]
    region_sizes = _parse_sizes(sizes) if sizes else default_sizes
    chosen = benchmark.select(benchmark.scenarios(region_sizes, quick), patterns)
    if not chosen:
        raise _usage(f"no scenario matches {', '.join(patterns)};"
                     f" groups: {', '.join(benchmark.GROUPS)} (see --list)", "--scenario")
    if list_only:
        for sc in chosen:
            click.echo(f"{sc.group:<10} {sc.name}")
        return 0
    if plot_dir is not None:
        try:
            display.require_matplotlib()
        except display.PlotUnavailable as e:
            raise _usage(str(e)) from None
    if json_file not in (None, "-"):
        parent = os.path.dirname(os.path.abspath(json_file))
        if not os.path.isdir(parent):
            raise _usage(f"no directory {parent!r} for the JSON file", "--json")
    runs = repeat or 3
    settings = {"command": " ".join(["livemig", *sys.argv[1:]]), "quick": quick,
                "sizes": region_sizes, "repeat": runs, "scenarios": [sc.name for sc in chosen]}
    console = _stderr_console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log or a pipe: room for the table
    with benchmark.progress(console, progress, len(chosen)) as step:
        runner = benchmark.Bench(repeat=runs, micro=3 if quick else 5, step=step)
        report = runner.run(chosen, settings)
    if not quiet:
        console.print(benchmark.table(report))
    if json_file == "-":
        _print_json(report.to_json())
    elif json_file is not None:
        with open(json_file, "w", encoding="utf-8") as f:
            json.dump(display.json_ready(report.to_json()), f, allow_nan=False, indent=1)
            f.write("\n")
    if plot_dir is not None:
        try:
            benchmark.plot(report, plot_dir)
        except (OSError, ValueError) as e:
            _error(f"cannot write the plots to {plot_dir}: {e}")
            return 1
    failed = [f.name for f in report.figures
              if f.error is not None and not f.error.startswith(benchmark.SKIPPED)]
    if failed:
        _error(f"{len(failed)} scenario(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
