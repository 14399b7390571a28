"""``livemig listen ADDRESS``: accepts migrations and runs what arrives (the model guest, or a
buffer workload) with the standard factory; with ``--attach SOCKET``, an attached process's memory
goes straight into a destination process that attaches at SOCKET (or that ``--attach-exec`` starts)."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace

import click

from livemig import display, local, migration, wire
from livemig.cli.base import (
    describe,
    error,
    events_output,
    load_secret,
    main,
    print_json,
    stderr_console,
    usage,
    warn,
)
from livemig.cli.params import (
    _KNOWN_CAPABILITIES,
    ADDRESS,
    CAPABILITY,
    QUEUE_DEFAULT,
    QUEUE_HELP,
    QUEUE_SIZE,
    SIZE,
    NumberType,
    Side,
    keepalive_options,
    make_keepalive,
    tls_options,
    tls_settings,
)
from livemig.errors import LivemigError, MigrationError, WorkloadError
from livemig.workload.attached import AttachFactory


@main.command()
@click.argument("address", type=ADDRESS)
@click.option("--once", is_flag=True,
              help="Serve one migration (or fail on the first refused connection), then exit.")
@click.option("--announce", is_flag=True, help="Print 'listening on ADDRESS' first on stdout.")
@click.option("--disable-capability", "disabled", type=CAPABILITY, multiple=True, metavar="NAME",
              help=f"Withhold a capability. Repeatable. NAME: {_KNOWN_CAPABILITIES}.")
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help=f"Shared secret sources must prove (default: ${wire.SECRET_ENV}).")
@click.option("--insecure", is_flag=True,
              help="Allow listening beyond loopback without keys, and sources beyond loopback without encryption"
              " (warns).")
@click.option("--encrypt", is_flag=True,
              help="Require TLS 1.3 from every source, on loopback too (default: from sources beyond loopback).")
@tls_options("The name (DNS or IP address) a source's certificate must carry (default: any its CA signed).")
@click.option("--max-size", type=SIZE, default=None, help="Largest region accepted.")
@click.option("--postcopy-queue", type=QUEUE_SIZE, default=QUEUE_DEFAULT, show_default=True,
              metavar="SIZE", help=QUEUE_HELP)
@click.option("--resume-deadline", type=NumberType(0.0), default=60.0, show_default=True, metavar="S",
              help="Postcopy recovery: seconds a broken connection waits for the source to resume (0: fail).")
@click.option("--timeout", type=NumberType(0.0, positive=True), default=30.0, show_default=True,
              metavar="S", help="Seconds a silent peer is waited for.")
@click.option("--prefault/--no-prefault", default=True, show_default=True,
              help="Populate the region ahead of the precopy receivers from several threads.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each migration's summary as JSON on stdout.")
@click.option("--events", "events_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              metavar="FILE|-", help="Write each migration's events as JSON lines to FILE ('-': stdout).")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@keepalive_options
@click.option("--handshake-deadline", type=NumberType(0.0, positive=True), default=wire.DEFAULT_GATE.handshake_s,
              show_default=True, metavar="S",
              help="Seconds a connection has to authenticate (the --timeout if shorter).")
@click.option("--refusal-log-interval", type=NumberType(0.0), default=wire.DEFAULT_GATE.log_interval_s,
              show_default=True, metavar="S",
              help="Refused connections after the first are summed up in one line per interval (0: one line each).")
@click.option("--attach", "attach_path", type=click.Path(dir_okay=False), default=None, metavar="SOCKET",
              help="Put incoming memory into the destination process that attaches at this Unix socket"
              " (docs/attach.md); it runs once its memory is here.")
@click.option("--attach-exec", default=None, metavar="COMMAND",
              help="Start the destination process for each migration ({socket}, {size}, {role} and"
              " {hashtable}, the example program, are filled in).")
@click.option("--attach-wait", type=NumberType(0.0, positive=True), default=30.0, show_default=True, metavar="S",
              help="Seconds to wait for the destination process to attach.")
@click.option("-q", "--quiet", is_flag=True, help="No summary table.")
def listen(
    address: wire.Address,
    once: bool,
    announce: bool,
    disabled: Sequence[tuple[Side, str]],
    secret_file: str | None,
    insecure: bool,
    encrypt: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_dir: str | None,
    tls_peer_name: str | None,
    max_size: int | None,
    postcopy_queue: int,
    resume_deadline: float,
    timeout: float,
    prefault: bool,
    as_json: bool,
    events_file: str | None,
    progress: bool | None,
    keepalive_idle: int,
    keepalive_interval: int,
    keepalive_count: int,
    handshake_deadline: float,
    refusal_log_interval: float,
    attach_path: str | None,
    attach_exec: str | None,
    attach_wait: float,
    quiet: bool,
) -> int:
    """Accept migrations on ADDRESS (host:port, [v6]:port or unix:/path; port 0: any free one)."""
    if any(side == "src" for side, _ in disabled):
        raise usage("src:NAME makes no sense on the destination; use NAME or dst:NAME",
                     "--disable-capability")
    keepalive = make_keepalive(keepalive_idle, keepalive_interval, keepalive_count)
    secret = load_secret(secret_file)
    if address.family == "tcp":
        try:
            socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise usage(f"cannot resolve {address.host!r}: {e.strerror or e}", "ADDRESS") from None
    tls = tls_settings(tls_cert, tls_key, tls_ca, tls_dir, tls_peer_name)
    if secret is None and not tls.x509 and not insecure and not wire.is_loopback(address):
        raise usage(
            f"refusing to listen on {address} beyond loopback without a shared secret or certificates: pass"
            f" --secret-file (or set ${wire.SECRET_ENV}) or --tls-dir (or --tls-cert, --tls-key and --tls-ca),"
            " or --insecure to accept anyone"
        )
    if (secret is not None and len(secret) < wire.MIN_PSK_SECRET_BYTES and not tls.x509 and not insecure
            and not wire.is_loopback(address)):
        raise usage(f"the shared secret keys TLS for sources beyond loopback and must hold at least"
                    f" {wire.MIN_PSK_SECRET_BYTES} bytes; it holds {len(secret)}", "--secret-file")
    if insecure:
        warn(f"--insecure: any source that reaches {address} may migrate memory into this host, unauthenticated"
             " and in clear unless it asks for encryption itself")
    config = _dest_config(
        disable_capabilities=frozenset(name for _, name in disabled),
        secret=secret,
        encrypt=True if encrypt else None,
        tls=tls,
        max_region_bytes=max_size or 0,
        timeout=timeout,
        resume_deadline_s=resume_deadline,
        postcopy_queue_bytes=postcopy_queue,
        prefault=prefault,
        keepalive=keepalive,
    )
    if events_file == "-" and as_json:
        raise usage("--events - and --json both write to stdout: write the events to a file")
    if attach_exec is not None and attach_path is None:
        raise usage("--attach-exec needs --attach SOCKET (where the started process attaches)")
    factory: AttachFactory | None = None
    if attach_path is not None:
        try:
            factory = AttachFactory(attach_path, launch_command=attach_exec, wait=attach_wait,
                                    timeout=min(timeout, 10.0), end_launched=False)
        except WorkloadError as e:
            raise usage(str(e), "--attach") from None
    try:
        try:
            limits = replace(wire.DEFAULT_GATE, handshake_s=handshake_deadline, log_interval_s=refusal_log_interval)
            # --once serves one known source: its refusal ends the listener too, as its one error line
            listener = wire.Listener(address, insecure=insecure, limits=limits, log=None if once else _log_refusal,
                                     strict=once)
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise MigrationError(f"cannot listen on {address}: {why}") from None
        console = stderr_console()
        failed = False
        with listener, ExitStack() as stack:
            writer = events_output(stack, events_file)
            if announce:
                sys.stdout.write(f"{local.ANNOUNCE_PREFIX}{listener.address}\n")
                sys.stdout.flush()
            else:  # the port it got (port 0) is news to whoever started it
                sys.stderr.write(f"livemig: listening on {listener.address}\n")
                sys.stderr.flush()
            while True:
                returned = False
                try:
                    with display.progress_display(console, progress) as reporter:
                        summary = migration.serve(listener, config, reporter, factory=factory,
                                                  events=display.fan_out(reporter.event, writer))
                    returned = True
                except (LivemigError, OSError) as e:
                    summary = migration.DestinationSummary(
                        ok=False, mode="precopy", region_bytes=0, error=describe(e)
                    )
                if not quiet and returned:
                    console.print(display.destination_table(summary))
                if as_json:
                    print_json(summary.to_json())
                if not summary.ok:
                    failed = True
                    error(f"migration failed: {summary.error or 'see the summary'}")
                if once:
                    break
    finally:
        if factory is not None:
            factory.close()
    return 1 if failed else 0




def _log_refusal(text: str) -> None:
    """A refused connection (or a summary of many), on stderr."""
    sys.stderr.write(f"livemig: {text}\n")
    sys.stderr.flush()


def _dest_config(**kwargs: object) -> migration.DestinationConfig:
    try:
        return migration.DestinationConfig(**kwargs)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise usage(str(e)) from None
