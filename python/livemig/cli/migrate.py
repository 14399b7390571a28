"""``livemig migrate``: a model guest of ``--size`` bytes (or, ``--attach``, the memory of a process
that attaches at a Unix socket) migrated to ``--to`` (or to a destination process started on
loopback), with a live display, a summary, ``--json`` and ``--plot``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import click

from livemig import display, local, migration, plot, wire
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
    PAGE_SIZE,
    QUEUE_DEFAULT,
    QUEUE_HELP,
    QUEUE_SIZE,
    SIZE,
    NumberType,
    Side,
    keepalive_options,
    make_keepalive,
    split_capabilities,
    tls_options,
    tls_settings,
)
from livemig.cli.signals import SignalsToControl
from livemig.errors import LivemigError
from livemig.guest import WORKLOADS, GuestConfig
from livemig.workload.attached import attach_source
from livemig.workload.base import Workload
from livemig.workload.model import ModelGuest


def _config(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)``, a config the API validates the same way: its ValueError is a usage error."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise usage(str(e)) from None


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
@click.option("--attach", "attach_path", type=click.Path(dir_okay=False), default=None, metavar="SOCKET",
              help="Migrate the process that attaches at this Unix socket (docs/attach.md) instead of a model"
              " guest; needs --to.")
@click.option("--attach-wait", type=NumberType(0.0, positive=True), default=30.0, show_default=True, metavar="S",
              help="Seconds to wait for the process to attach.")
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
@click.option("--encrypt/--no-encrypt", default=None,
              help="TLS 1.3 on every channel (default: whenever the destination is not on loopback, or requires"
              " it); --no-encrypt: never, the guest's memory crosses in clear (warns).")
@tls_options("The name (DNS or IP address) the destination's certificate must carry (default: the host of --to).")
@click.option("--timeout", type=NumberType(0.0, positive=True), default=30.0, show_default=True,
              metavar="S", help="Seconds a silent peer is waited for.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object on stdout.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Draw the rounds, the postcopy timeline and the fault latency to FILE; its suffix"
              " (.png, .svg, .pdf) names the format (needs livemig[plot]).")
@click.option("--events", "events_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              metavar="FILE|-", help="Write the migration's events as JSON lines to FILE ('-': stdout).")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default: when stderr is a terminal).")
@click.option("--postcopy-queue", type=QUEUE_SIZE, default=QUEUE_DEFAULT, show_default=True,
              metavar="SIZE", help=QUEUE_HELP)
@click.option("--reconnect-deadline", type=NumberType(0.0), default=60.0, show_default=True, metavar="S",
              help="Postcopy recovery: seconds a broken connection is paused and resumed (0: fail).")
@click.option("--manual-resume", is_flag=True,
              help="When paused, wait for `livemig resume` instead of reconnecting by itself.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Unix socket where `livemig resume PATH` reaches this migration.")
@keepalive_options
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
    attach_path: str | None,
    attach_wait: float,
    postcopy: bool,
    postcopy_after: int | None,
    max_rounds: int | None,
    hints: bool,
    channels: int,
    downtime_limit: float | None,
    disabled: Sequence[tuple[Side, str]],
    verify: bool,
    secret_file: str | None,
    encrypt: bool | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_dir: str | None,
    tls_peer_name: str | None,
    timeout: float,
    as_json: bool,
    plot_file: str | None,
    events_file: str | None,
    progress: bool | None,
    postcopy_queue: int,
    reconnect_deadline: float,
    manual_resume: bool,
    control_path: str | None,
    keepalive_idle: int,
    keepalive_interval: int,
    keepalive_count: int,
    quiet: bool,
) -> int:
    """Migrate a guest of --size bytes running --workload, precopy unless --postcopy."""
    if manual_resume and control_path is None:
        raise usage("--manual-resume needs --control PATH (where `livemig resume PATH` reaches it)")
    # Every usage error is found here, before a process or a byte of guest memory exists.
    if postcopy_after is not None and not postcopy:
        raise usage("--postcopy-after needs --postcopy (the migration is precopy otherwise)")
    if workload == "increment" and churn > 0:
        raise usage("--churn needs a workload other than increment"
                    " (its oracle needs a fixed set of pages)")
    if workload == "increment" and threads > 1:
        raise usage("the increment workload runs one writer thread"
                     " (its oracle needs address order)",
                     "--threads")
    if attach_path is not None and to is None:
        raise usage("--attach needs --to HOST:PORT (a destination that hosts the process's memory:"
                    " `livemig listen --attach SOCKET`)", "--attach")
    memory = wire.physical_memory_bytes()
    if size > memory:
        raise usage(f"{size} bytes is more than this machine's memory", "--size")
    if to is None and 2 * size > memory:
        raise usage(f"{size} bytes twice (the guest and its copy in the embedded destination) is more than"
                    f" this machine's memory ({memory} bytes); use a smaller size, or --to a destination"
                    " on another host", "--size")
    if control_path is not None and os.path.lexists(control_path):
        raise usage(f"{control_path} exists already (another migration's control socket, or a stale file):"
                    " remove it or choose another path", "--control")
    src_off, dst_off = split_capabilities(disabled)
    if to is not None and any(side == "dst" for side, _ in disabled):
        raise usage("dst:NAME applies only to the embedded destination; with --to, pass"
                     " --disable-capability to `livemig listen` on the destination")
    if plot_file is not None:
        try:
            display.check_plot_path(plot_file)
        except display.PlotUnavailable as e:
            raise usage(str(e)) from None
        except ValueError as e:
            raise usage(str(e), "--plot") from None
        parent = os.path.dirname(os.path.abspath(plot_file))
        if not os.path.isdir(parent):
            raise usage(f"no directory {parent!r} for the plot", "--plot")
    if events_file == "-" and as_json:
        raise usage("--events - and --json both write to stdout: write the events to a file, or take the"
                    " report from the last event (\"end\")")
    keepalive = make_keepalive(keepalive_idle, keepalive_interval, keepalive_count)
    secret = load_secret(secret_file)
    tls = tls_settings(tls_cert, tls_key, tls_ca, tls_dir, tls_peer_name)
    _check_encryption(to, encrypt, secret, tls)

    defaults = migration.MigrationConfig()
    config = _config(migration.MigrationConfig,
        postcopy=postcopy,
        postcopy_after=defaults.postcopy_after if postcopy_after is None else postcopy_after,
        max_rounds=defaults.max_rounds if max_rounds is None else max_rounds,
        downtime_limit_ms=defaults.downtime_limit_ms if downtime_limit is None else downtime_limit,
        hints=hints,
        channels=channels,
        disable_capabilities=src_off,
        secret=secret,
        encrypt=encrypt,
        tls=tls,
        verify=verify,
        timeout=timeout,
        reconnect_deadline_s=reconnect_deadline,
        auto_reconnect=not manual_resume,
        postcopy_queue_bytes=postcopy_queue,
        keepalive=keepalive,
    )
    control = migration.MigrationControl()
    guest = _config(GuestConfig,
        workload=workload,
        page_size=PAGE_SIZE,
        rate=dirty_rate,
        free_fraction=free_fraction,
        churn=churn,
        seed=seed,
        fill=fill,
        threads=threads,
    )
    console = stderr_console()
    signals = SignalsToControl(control)

    dest_stderr = ""
    returned = False  # migrate() returned a result (else it raised before or while running)
    with ExitStack() as stack:
        dest: local.LocalDestination | None = None
        writer = events_output(stack, events_file)
        # The live view from the start: a local destination and a large guest take a while to make.
        reporter = stack.enter_context(display.progress_display(console, progress))
        try:
            if to is None:
                reporter.note("starting the local destination")
                args = ["--no-progress", "--quiet", "--max-size", str(size),
                        "--timeout", f"{timeout:g}", "--postcopy-queue", str(postcopy_queue),
                        "--keepalive-idle", str(keepalive.idle_s), "--keepalive-interval", str(keepalive.interval_s),
                        "--keepalive-count", str(keepalive.count)]
                args += [a for name in sorted(dst_off) for a in ("--disable-capability", name)]
                if secret_file is not None:
                    args += ["--secret-file", secret_file]
                args += _embedded_tls_args(encrypt, tls)
                dest = stack.enter_context(
                    local.local_destination(args, deadline=max(timeout, 20.0))
                )
                address = dest.address
            else:
                address = str(to)
            if control_path is not None:
                stack.enter_context(migration.ControlServer(control_path, control))
            w: Workload
            if attach_path is not None:
                reporter.note(f"waiting for the process at {attach_path}")
                w = attach_source(attach_path, wait=attach_wait, timeout=min(timeout, 10.0))
            else:
                reporter.note(f"making the guest's {display.format_bytes(size)}")
                w = ModelGuest(size, guest)
            stack.callback(w.stop)  # an attached process is detached: it runs on, or stays handed off
            with signals:
                result = migration.migrate(address, w, config, reporter, control,
                                           events=display.fan_out(reporter.event, writer))
            returned = True
        except (LivemigError, OSError) as e:
            result = migration.MigrationResult(
                ok=False, mode="precopy", region_bytes=size, page_size=PAGE_SIZE, error=describe(e)
            )
            if isinstance(e, migration.MigrationFailed):
                result.mode, result.outcome, result.interrupt = e.mode, e.outcome, e.interrupt
        if dest is not None:
            code = dest.wait(timeout if result.ok else 2.0)
            if code != 0 and result.ok:
                result.ok = False
                result.error = f"the local destination exited with code {code}"
            if not result.ok:
                dest_stderr = dest.stderr_text()

    if not quiet and returned:
        # (a run that raised has no table: its error line says it all)
        if result.rounds:
            console.print(display.rounds_table(result))
        console.print(display.summary_table(result))
    if as_json:
        print_json(result.to_json())
    if not result.ok:
        interrupted = result.interrupt is not None and result.interrupt.outcome != "finished" and signals.received
        error(f"{'interrupted' if interrupted else 'migration failed'}: {result.error or 'see the summary'}")
        _relay_destination(dest_stderr)
    if plot_file is not None and returned:  # a run that raised has nothing to draw
        try:
            plot.plot_migration(result, plot_file)
        except (OSError, ValueError) as e:
            error(f"cannot write the plot {plot_file}: {e}")
            return 1
    return _exit_status(result, signals)


def _exit_status(result: migration.MigrationResult, signals: SignalsToControl) -> int:
    """0 completed (also when a signal asked a postcopy to finish and it did); 128 + the signal
    when one cancelled or aborted it; 3 when the outcome is uncertain (the destination may or may
    not run the workload: docs/protocol.md, "The commit point"); 1 for any other failure."""
    if result.ok:
        return 0
    if result.interrupt is not None and result.interrupt.outcome in ("cancelled", "aborted") and signals.received:
        return signals.exit_status
    return 3 if result.outcome == "uncertain" else 1


def _check_encryption(to: wire.Address | None, encrypt: bool | None, secret: bytes | None,
                      tls: wire.TlsSettings) -> None:
    """Usage errors of encryption, found before anything starts; the warning of --no-encrypt."""
    if encrypt is False:
        warn("--no-encrypt: the guest's memory crosses the network in clear: anyone on the path can read it"
             " and change it")
        return
    if encrypt is None and to is not None and not tls.x509 and not wire.is_loopback(to):
        if secret is None:
            raise usage(f"encryption is on by default toward {to}, beyond loopback, and there are no keys: pass"
                        f" --secret-file (or set ${wire.SECRET_ENV}) or certificates (--tls-dir, or --tls-cert,"
                        " --tls-key and --tls-ca), or --no-encrypt to send the guest's memory in clear")
        if len(secret) < wire.MIN_PSK_SECRET_BYTES:
            raise usage(f"the shared secret keys TLS toward {to} (beyond loopback) and must hold at least"
                        f" {wire.MIN_PSK_SECRET_BYTES} bytes; it holds {len(secret)}", "--secret-file")


def _embedded_tls_args(encrypt: bool | None, tls: wire.TlsSettings) -> list[str]:
    """The embedded destination's encryption options: it requires TLS when the source asks for it,
    and holds the same certificates (its own half of a --tls-dir)."""
    args = ["--encrypt"] if encrypt else []
    if tls.directory is not None:
        args += ["--tls-dir", tls.directory]
    elif tls.cert is not None and tls.key is not None and tls.ca is not None:
        args += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    return args


def _relay_destination(text: str) -> None:
    """The embedded destination's own error lines, so a failure there is not hidden."""
    for line in text.splitlines():
        if line.strip():
            sys.stderr.write(f"livemig: destination: {line.removeprefix('livemig: ')}\n")
    sys.stderr.flush()


