"""What the CLI shows: live progress, the summary table (rich, on stderr) and the ``--plot`` figure.

Progress objects implement :class:`livemig.migration.LiveProgress` and take the migration's events
(``event``); the orchestrators call them from the migrating thread and the monitor's thread, never
at once. Every figure shown comes from a Snapshot, an event or the result: none is computed here.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from livemig.migration import (
    DestinationSummary,
    MigrationEvent,
    MigrationResult,
    RoundStats,
    Snapshot,
)

if TYPE_CHECKING:
    from typing_extensions import Self

# ---- formatting ----


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bps: float) -> str:
    """Bytes per second as ``123.4 MiB/s`` (``-`` when unknown)."""
    if not math.isfinite(bps) or bps <= 0:
        return "-"
    return f"{format_bytes(bps)}/s"


def json_ready(obj: Any) -> Any:
    """``obj`` (dataclasses, dicts, lists, tuples, floats) with non-finite floats as None, so
    ``json.dumps(..., allow_nan=False)`` never fails or prints non-JSON like ``Infinity``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json_ready(v) for v in obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- progress ----


def format_duration(seconds: float) -> str:
    """``75.3`` -> ``1:15.3`` (minutes:seconds), ``3723`` -> ``1:02:03.0``."""
    m, sec = divmod(max(seconds, 0.0), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{sec:04.1f}" if h else f"{m}:{sec:04.1f}"


def _eta(s: Snapshot) -> str:
    return "ETA -" if s.round_eta_s is None else f"ETA {format_duration(s.round_eta_s)}"


def snapshot_lines(s: Snapshot) -> tuple[str, str, float | None]:
    """A snapshot in words: (headline, details, fraction done or None), the live view's two lines."""
    elapsed = format_duration(s.t)
    if s.side == "destination":
        here = s.total_pages - s.remaining_pages
        head = f"{s.phase}: {here:,} of {s.total_pages:,} pages here"
        tail = f"{format_rate(s.rate_bps)} over the last second"
        if s.phase == "postcopy" or s.faults:
            tail += f" · {s.faults_per_s:,.0f} faults/s ({s.faults:,} in all)"
        if s.phase == "paused":
            head = f"paused for recovery: {s.paused_cause}"
        done = here / s.total_pages if s.total_pages else None
        return head, f"{tail} · {elapsed}", done
    sent = f"sent {format_bytes(s.bytes_sent)} ({s.pages_sent:,} pages)"
    rate = f"{format_rate(s.rate_bps)} over the last second"
    if s.phase == "precopy" and s.round >= 0:
        done_pages = s.round_pages - s.round_pages_left
        head = f"precopy round {s.round}: {done_pages:,} of {s.round_pages:,} pages · {_eta(s)}"
        dirt = f"tracker: {s.dirty_rate_pps:,.0f} pages/s dirtied" if s.round > 0 else "tracker: first round"
        tail = f"{rate} · {sent} · {dirt} · {s.remaining_pages:,} dirty left · {elapsed}"
        return head, tail, done_pages / s.round_pages if s.round_pages else None
    if s.phase == "postcopy":
        on_dest = s.total_pages - s.remaining_pages
        head = (f"postcopy: {on_dest:,} of {s.total_pages:,} pages sent · {s.remaining_pages:,} still on the"
                f" source · {s.faults_per_s:,.0f} faults/s ({s.faults:,} in all)")
        down = f" · downtime {_ms(s.downtime_ms)}" if s.downtime_ms is not None else ""
        tail = f"{rate} · {sent} · pushed {s.push_pages:,}{down}"
        if s.recoveries:
            tail += f" · {s.recoveries} recover{'y' if s.recoveries == 1 else 'ies'}"
        return head, f"{tail} · {elapsed}", on_dest / s.total_pages if s.total_pages else None
    if s.phase == "paused":
        tries = f"attempt {s.attempts + 1}" if s.attempts else "reconnecting"
        head = f"paused for recovery ({tries}): {s.paused_cause}"
        return head, f"{s.remaining_pages:,} pages still on the source · {sent} · {elapsed}", None
    if s.phase == "switchover":
        head = f"switchover: workload paused, {s.remaining_pages:,} dirty pages left"
        return head, f"{rate} · {sent} · {elapsed}", None
    if s.phase in ("complete", "verify"):
        down = f" · downtime {_ms(s.downtime_ms)}" if s.downtime_ms is not None else ""
        return f"{s.phase}: waiting for the destination's report", f"{sent}{down} · {elapsed}", None
    if s.phase in ("start", "connect"):
        return "connecting to the destination", elapsed, None
    return f"{s.phase}", f"{sent} · {elapsed}", None


def event_line(ev: MigrationEvent) -> str | None:
    """The log line an event deserves (None: the live view shows it well enough)."""
    d = ev.data
    at = format_duration(ev.t)
    if ev.kind == "round_end":
        sent = d["pages_sent"] + d["zero_pages"]
        dirtied = (f"; {d['dirtied_pages']:,} dirtied meanwhile ({d['dirty_rate_pps']:,.0f} pages/s)")
        return (f"{at} round {d['index']}: sent {sent:,} of {d['dirty_pages']:,} dirty pages"
                f" ({format_bytes(d['bytes_sent'])}) in {d['seconds']:.2f} s at {format_rate(d['bandwidth_bps'])}"
                f"{dirtied}; {d['remaining_pages']:,} left")
    if ev.kind == "switchover" and ev.side == "destination":
        return f"{at} switchover: the workload runs here ({d['mode']})"
    if ev.kind == "switchover":
        what = ("the workload runs on the destination; the rest comes by push and on demand"
                if d["mode"] == "postcopy" else "the workload runs on the destination")
        return (f"{at} switchover: downtime {_ms(d['downtime_ms'])}, {d['switchover_pages']:,} pages dirty at"
                f" the final sync; {what}")
    if ev.kind == "paused":
        return f"{at} paused for recovery: {d['cause']}"
    if ev.kind == "resume_attempt":
        return f"{at} resume attempt {d['attempt']} failed: {d['error']}"
    if ev.kind == "resumed":
        again = f", {d['requeued_pages']:,} pages to send again" if d.get("requeued_pages") else ""
        return f"{at} resumed (recovery {d['recoveries']}){again}"
    if ev.kind == "faults":
        return f"{at} {d['faults_per_s']:,.0f} faults/s (over {d['threshold_per_s']:,.0f}/s)"
    return None


class _Live:
    """The live view's renderable: two lines and a bar, swapped whole by the monitor's thread."""

    def __init__(self) -> None:
        self.lines: tuple[str, str, float | None] = ("starting", "", None)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        head, tail, done = self.lines
        grid = Table.grid()
        grid.add_column()
        grid.add_row(Text(head, style="bold", overflow="ellipsis", no_wrap=True))
        if done is not None:
            grid.add_row(ProgressBar(total=1.0, completed=min(max(done, 0.0), 1.0), width=min(options.max_width, 60)))
        if tail:
            grid.add_row(Text(tail, overflow="ellipsis", no_wrap=True))
        yield grid


class RichProgress:
    """The live view on a terminal: what moves now (redrawn with every snapshot, at least 4 times a
    second), with a log line above it for each round, the switchover and each recovery step."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._view = _Live()
        self._live = Live(self._view, console=console, auto_refresh=False, transient=True)

    def phase(self, name: str) -> None:
        if name in ("precopy", "postcopy", "paused"):
            return  # the snapshot says it, and the events log it
        self._view.lines = (name, self._view.lines[1], None)
        self._live.refresh()

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass  # the round_end event carries the whole round

    def note(self, text: str) -> None:
        """What happens before the migration starts (no figures yet)."""
        self._view.lines = (text, "", None)
        self._live.refresh()

    def snapshot(self, s: Snapshot) -> None:
        self._view.lines = snapshot_lines(s)
        self._live.refresh()

    def event(self, ev: MigrationEvent) -> None:
        line = event_line(ev)
        if line is not None:
            self._live.console.print(line, highlight=False, markup=False)

    def notice(self, text: str) -> None:
        self._live.console.print(f"livemig: {text}", highlight=False, markup=False)

    def __enter__(self) -> Self:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.stop()


class LineProgress:
    """Progress as plain lines (for logs): one per phase, round, switchover and recovery step, and
    the live figures at most once a second."""

    def __init__(self, out: IO[str], every_s: float = 1.0) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._every = every_s
        self._last = -math.inf

    def _print(self, text: str) -> None:
        with self._lock:
            self._out.write(f"livemig: {text}\n")
            self._out.flush()

    def phase(self, name: str) -> None:
        self._print(f"phase {name}")

    def note(self, text: str) -> None:
        self._print(text)

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass  # the round_end event carries the whole round

    def snapshot(self, s: Snapshot) -> None:
        if s.t - self._last < self._every:
            return
        self._last = s.t
        head, tail, _ = snapshot_lines(s)
        self._print(f"{head} · {tail}")

    def event(self, ev: MigrationEvent) -> None:
        line = event_line(ev)
        if line is not None:
            self._print(line)

    def notice(self, text: str) -> None:
        self._print(text)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Quiet:
    """No progress; notices still reach the console (they say what an interrupt does)."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def phase(self, name: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def update(self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float) -> None:
        pass

    def notice(self, text: str) -> None:
        self._console.print(f"livemig: {text}", markup=False, highlight=False, soft_wrap=True)

    def event(self, ev: MigrationEvent) -> None:
        pass


ProgressDisplay = RichProgress | LineProgress | _Quiet


@contextmanager
def progress_display(console: Console, enabled: bool | None) -> Iterator[ProgressDisplay]:
    """The progress reporter for ``--progress/--no-progress`` (None: only on a terminal): the live
    view on a terminal, plain lines otherwise, nothing when disabled. Hand it to migrate()/serve()
    as ``progress`` and its ``event`` method as (part of) ``events``."""
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield _Quiet(console)
    elif console.is_terminal:
        with RichProgress(console) as p:
            yield p
    else:
        yield LineProgress(console.file)


def fan_out(*callbacks: Callable[[MigrationEvent], None] | None) -> Callable[[MigrationEvent], None]:
    """One event callback calling each of ``callbacks`` (None ones left out) in turn."""
    chosen = [cb for cb in callbacks if cb is not None]

    def call(ev: MigrationEvent) -> None:
        for cb in chosen:
            cb(ev)

    return call


# ---- summaries ----


def _ms(v: float | None) -> str:
    return f"{v:,.1f} ms" if v is not None and math.isfinite(v) else "-"


def _balloon(b: Any) -> str:
    done = "delivered" if b.done_delivered else "NOT delivered"
    return f"last cmd 0x{b.last_cmd_id:x}, DONE {done}, {b.held_pages_after:,} pages held after"


def _latency(p: Any) -> str:
    """A PostcopyStats' three latency measures, a line each; 'none' when no fault was timed."""
    if not any(p.histogram) and p.blocked_us.count == 0:
        return "none: the guest touched no missing page"
    lines = []
    for name, lat in (("fault to placed", p.fault_latency_us), ("request to placed", p.request_latency_us),
                      ("thread blocked", p.blocked_us)):
        lines.append(f"{name}: p50 {lat.p50:,.1f} / p90 {lat.p90:,.1f} / p99 {lat.p99:,.1f} /"
                     f" p99.9 {lat.p99_9:,.1f} / max {lat.max:,.1f} us;"
                     f" {lat.over_1ms:,} over 1 ms, {lat.over_10ms:,} over 10 ms")
    return "\n".join(lines)


def rounds_table(r: MigrationResult, most: int = 12) -> Table:
    """The precopy rounds, one row each (the first and last few when there are more than ``most``)."""
    t = Table(title="precopy rounds", title_justify="left", show_edge=False, pad_edge=False)
    for name in ("round", "dirty at sync", "sent", "in", "bandwidth", "dirtied meanwhile", "left"):
        t.add_column(name, justify="right")
    rows: list[RoundStats | None] = list(r.rounds)
    if len(rows) > most:
        rows = rows[: most // 2] + [None] + rows[-(most // 2):]
    for x in rows:
        if x is None:
            t.add_row("...", "", "", "", "", "", "")
            continue
        t.add_row(str(x.index), f"{x.dirty_pages:,}", f"{x.pages_sent + x.zero_pages:,} ({format_bytes(x.bytes_sent)})",
                  f"{x.seconds:.2f} s", format_rate(x.bandwidth_bps),
                  f"{x.dirtied_pages:,} ({x.dirty_rate_pps:,.0f}/s)", f"{x.remaining_pages:,}")
    return t


def _workload(kind: str, process: dict[str, Any]) -> str:
    """``attach: hashtable (pid 123)``, or just the kind for a workload in this process."""
    if not process:
        return kind or "?"
    return f"{kind}: {process.get('name') or '?'} (pid {process.get('pid', '?')})"


def summary_table(r: MigrationResult) -> Table:
    """The end-of-migration summary: every figure is a field of ``r`` (the JSON's)."""
    status = "[green]ok[/green]" if r.ok else "[red]FAILED[/red]"
    t = Table(title=f"livemig migrate: {status}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("mode", r.mode)
    t.add_row("workload", _workload(r.workload.kind, r.workload.process))
    pages = r.region_bytes // max(r.page_size, 1)
    t.add_row("region", f"{format_bytes(r.region_bytes)} ({pages:,} pages of {r.page_size} B)")
    t.add_row("total time", _ms(r.total_ms))
    t.add_row("downtime", f"{_ms(r.downtime_ms)} ({r.switchover_pages:,} pages dirty at the final sync)")
    ds = r.downtime_split
    if ds.final_sync_ms or ds.resume_ms:
        t.add_row("downtime steps", f"final sync {ds.final_sync_ms:.2f} ms, last pages {ds.last_pages_ms:.2f} ms,"
                                    f" device state {ds.device_state_ms:.2f} ms, destination resume {ds.resume_ms:.2f} ms"
                                    f" ({r.destination_resume_ms:.2f} ms of it the destination's own)")
    if r.drain is not None:
        t.add_row("drain", f"{r.drain.ms:.2f} ms before the pause (the destination had applied"
                           f" {r.drain.received_pages:,} of {r.drain.sent_pages:,} pages sent)")
    pf = r.prefault
    if pf.threads:
        t.add_row("prefault", f"{pf.threads} threads ({', '.join(f'{n}: {g:.2f} GB/s' for n, g in zip(pf.tried, pf.tried_gbps, strict=True))}),"
                              f" {pf.populated_pages:,} pages in {pf.seconds:.2f} s, {pf.dropped_pages:,} dropped at switchover")
    t.add_row("precopy rounds", str(r.precopy_rounds))
    t.add_row("sent",
              f"{format_bytes(r.bytes_sent)} ({r.pages_sent:,} pages, {r.zero_pages:,} zero)")
    if r.throughput_bps > 0:
        t.add_row("throughput", f"{format_rate(r.throughput_bps)} (all bytes sent over the total time)")
    if r.mode == "postcopy":
        p = r.postcopy
        t.add_row("postcopy", f"{r.postcopy_pages_left:,} pages left at the start; {p.requests:,} requests,"
                  f" {p.local_fills:,} local fills, {p.faults:,} faults")
        if r.push_seconds > 0:
            t.add_row("postcopy push", f"{format_bytes(r.push_bytes)} in {_ms(r.push_seconds * 1e3)}"
                      f" ({format_rate(r.push_bytes / r.push_seconds)})")
        t.add_row("fault latency", _latency(p))
        again = f", {r.requeued_pages:,} pages sent again" if r.recoveries else ""
        t.add_row("recoveries", f"{r.recoveries}{again}")
    elif r.recoveries:
        t.add_row("recoveries", f"{r.recoveries}, {r.requeued_pages:,} pages sent again")
    h = r.hints
    t.add_row("hints", f"{h.rounds} rounds, {h.pages_hinted:,} pages hinted,"
              f" {h.stale_dropped:,} stale dropped")
    b = r.balloon
    t.add_row("balloon", _balloon(b))
    if r.verify is not None:
        v = r.verify
        t.add_row("verify", f"{v.pages_checked:,} pages checked, {v.mismatches:,} mismatches,"
                  f" {v.placed_twice:,} placed twice")
    if r.capabilities:
        t.add_row("capabilities", ", ".join(sorted(r.capabilities)))
    if r.error:
        t.add_row("error", f"[red]{r.error}[/red]")
    return t


def destination_table(s: DestinationSummary) -> Table:
    """The destination's summary of one migration (``livemig listen``)."""
    status = "[green]ok[/green]" if s.ok else "[red]FAILED[/red]"
    t = Table(title=f"livemig listen: {status}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("mode", s.mode)
    t.add_row("workload", _workload(s.workload_kind, s.workload_process))
    t.add_row("region", format_bytes(s.region_bytes))
    if s.mode == "postcopy":
        t.add_row("postcopy",
                  f"{s.postcopy.requests:,} requests, {s.postcopy.local_fills:,} local fills")
        t.add_row("fault latency", _latency(s.postcopy))
        t.add_row("recoveries", str(s.recoveries))
    t.add_row("balloon", _balloon(s.balloon))
    if s.verify is not None:
        v = s.verify
        t.add_row("verify", f"{v.pages_checked:,} pages checked, {v.mismatches:,} mismatches,"
                  f" {v.placed_twice:,} placed twice")
    if s.error:
        t.add_row("error", f"[red]{s.error}[/red]")
    return t


# ---- plot (livemig.plot draws) ----


class PlotUnavailable(RuntimeError):
    """matplotlib (the ``plot`` extra) is not installed."""


def require_matplotlib() -> None:
    """Raises PlotUnavailable unless matplotlib can be imported (checked before migrating)."""
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError as e:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed ({e}); install it with"
            " pip install 'livemig[plot]'"
        ) from None


def plot_formats() -> dict[str, str]:
    """The image formats matplotlib writes here: suffix (no dot) -> description."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return dict(FigureCanvasBase.get_supported_filetypes())


def check_plot_path(path: str) -> str:
    """``path``'s format (its suffix); ValueError naming the choices when it has none matplotlib writes."""
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    formats = plot_formats()
    if suffix not in formats:
        choices = ", ".join(f".{k}" for k in sorted(formats))
        what = f"its suffix .{suffix} is not an image format" if suffix else "it has no suffix to say its format"
        raise ValueError(f"cannot draw to {path!r}: {what}; name it with one of {choices} (e.g. run.png)")
    return suffix
