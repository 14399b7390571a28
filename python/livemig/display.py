"""What the CLI shows: live progress, the summary table (rich, on stderr) and the ``--plot`` figure.

Progress objects implement :class:`livemig.migration.Progress`; the orchestrators may call them
from any thread (rich's Progress locks internally; the line printer locks itself).
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table

from livemig.migration import DestinationSummary, MigrationResult, Progress

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


class RichProgress:
    """A live progress bar (phase, round, remaining pages, bandwidth) on a terminal."""

    def __init__(self, console: Console) -> None:
        self._bar = RichProgressBar(
            TextColumn("[bold]{task.fields[phase]:<10}"),
            BarColumn(),
            TextColumn("round {task.fields[round]:>3}"),
            TextColumn("{task.fields[remaining]:>10} pages left"),
            TextColumn("{task.fields[bandwidth]:>14}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID = self._bar.add_task(
            "migration", total=None, phase="start", round=0, remaining="-", bandwidth="-"
        )

    def phase(self, name: str) -> None:
        self._bar.update(self._task, phase=name)

    def update(
        self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float
    ) -> None:
        self._bar.update(
            self._task,
            total=max(total_pages, 1),
            completed=max(total_pages - remaining_pages, 0),
            round=round,
            remaining=f"{remaining_pages:,}",
            bandwidth=format_rate(bandwidth_bps),
        )

    def __enter__(self) -> Self:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()


class LineProgress:
    """Progress as plain lines (for logs): one per phase, and at most one per round or second."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._phase = "start"
        self._round = -1
        self._last = 0.0

    def _print(self, text: str) -> None:
        self._out.write(f"livemig: {text}\n")
        self._out.flush()

    def phase(self, name: str) -> None:
        with self._lock:
            self._phase = name
            self._print(f"phase {name}")

    def update(
        self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float
    ) -> None:
        with self._lock:
            now = time.monotonic()
            if round == self._round and now - self._last < 1.0:
                return
            self._round, self._last = round, now
            self._print(
                f"{self._phase} round {round}: {remaining_pages:,} of {total_pages:,} pages left,"
                f" {format_rate(bandwidth_bps)}"
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Quiet:
    def phase(self, name: str) -> None:
        pass

    def update(
        self, *, round: int, remaining_pages: int, total_pages: int, bandwidth_bps: float
    ) -> None:
        pass


@contextmanager
def progress_display(console: Console, enabled: bool | None) -> Iterator[Progress]:
    """The progress reporter for ``--progress/--no-progress`` (None: only on a terminal): a live
    rich display on a terminal, plain lines otherwise, nothing when disabled."""
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield _Quiet()
    elif console.is_terminal:
        with RichProgress(console) as p:
            yield p
    else:
        yield LineProgress(console.file)


# ---- summaries ----


def _ms(v: float) -> str:
    return f"{v:,.1f} ms" if math.isfinite(v) else "-"


def _balloon(b: Any) -> str:
    done = "delivered" if b.done_delivered else "NOT delivered"
    return f"last cmd 0x{b.last_cmd_id:x}, DONE {done}, {b.held_pages_after:,} pages held after"


def _latency(p: Any) -> str:
    """A PostcopyStats' fault latency; 'none' when no fault was timed (not 'p50 0 us')."""
    if not any(p.histogram):
        return "none: the guest touched no missing page"
    lat = p.fault_latency_us
    return f"p50 {lat.p50:,.0f} us, p99 {lat.p99:,.0f} us, max {lat.max:,.0f} us"


def summary_table(r: MigrationResult) -> Table:
    """The end-of-migration summary."""
    status = "[green]ok[/green]" if r.ok else "[red]FAILED[/red]"
    t = Table(title=f"livemig migrate: {status}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("mode", r.mode)
    pages = r.region_bytes // max(r.page_size, 1)
    t.add_row("region", f"{format_bytes(r.region_bytes)} ({pages:,} pages of {r.page_size} B)")
    t.add_row("total time", _ms(r.total_ms))
    t.add_row("downtime", _ms(r.downtime_ms))
    t.add_row("precopy rounds", str(r.precopy_rounds))
    t.add_row("sent",
              f"{format_bytes(r.bytes_sent)} ({r.pages_sent:,} pages, {r.zero_pages:,} zero)")
    if r.total_ms > 0 and r.bytes_sent:
        t.add_row("throughput", format_rate(r.bytes_sent / (r.total_ms / 1000.0)))
    if r.mode == "postcopy":
        p = r.postcopy
        t.add_row("postcopy", f"{p.requests:,} requests, {p.local_fills:,} local fills")
        if r.push_seconds > 0:
            t.add_row("postcopy push", f"{format_bytes(r.push_bytes)} in {_ms(r.push_seconds * 1e3)}"
                      f" ({format_rate(r.push_bytes / r.push_seconds)})")
        t.add_row("fault latency", _latency(p))
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
    t.add_row("region", format_bytes(s.region_bytes))
    if s.mode == "postcopy":
        t.add_row("postcopy",
                  f"{s.postcopy.requests:,} requests, {s.postcopy.local_fills:,} local fills")
        t.add_row("fault latency", _latency(s.postcopy))
    t.add_row("balloon", _balloon(s.balloon))
    if s.verify is not None:
        v = s.verify
        t.add_row("verify", f"{v.pages_checked:,} pages checked, {v.mismatches:,} mismatches,"
                  f" {v.placed_twice:,} placed twice")
    if s.error:
        t.add_row("error", f"[red]{s.error}[/red]")
    return t


# ---- plot ----


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


def plot(result: MigrationResult, path: str) -> None:
    """Writes ``path`` (format from its suffix): bandwidth and remaining pages per precopy round,
    and the postcopy fault latency histogram (bucket i: latencies up to 2**i microseconds)."""
    require_matplotlib()
    from matplotlib.figure import Figure  # optional dependency

    fig = Figure(figsize=(8, 9), layout="constrained")
    ax_bw, ax_rem, ax_lat = fig.subplots(3, 1)
    rounds = [s.index for s in result.rounds]
    if rounds:
        ax_bw.bar(rounds, [s.bandwidth_bps / 2**20 if math.isfinite(s.bandwidth_bps) else 0.0
                           for s in result.rounds], color="tab:blue")
        remaining = [s.remaining_pages for s in result.rounds]
        ax_rem.plot(rounds, remaining, marker="o", color="tab:orange")
        for ax in (ax_bw, ax_rem):
            ax.set_xticks(rounds)
    else:
        for ax in (ax_bw, ax_rem):
            ax.text(0.5, 0.5, "no precopy rounds", ha="center", va="center", transform=ax.transAxes)
    ax_bw.set_title("bandwidth per precopy round")
    ax_bw.set_xlabel("round")
    ax_bw.set_ylabel("MiB/s")
    ax_rem.set_title("remaining pages after each round")
    ax_rem.set_xlabel("round")
    ax_rem.set_ylabel("pages")

    hist = list(result.postcopy.histogram)
    while hist and hist[-1] == 0:
        hist.pop()
    if any(hist):
        xs = list(range(len(hist)))
        ax_lat.bar(xs, hist, color="tab:green")
        ax_lat.set_xticks(xs, [_bucket_label(i) for i in xs], rotation=45)
        ax_lat.set_yscale("log")
    else:
        ax_lat.text(0.5, 0.5, "no postcopy faults", ha="center", va="center",
                    transform=ax_lat.transAxes)
    ax_lat.set_title("postcopy fault latency")
    ax_lat.set_xlabel("latency up to (microseconds)")
    ax_lat.set_ylabel("faults")
    fig.suptitle(f"livemig {result.mode}: {format_bytes(result.region_bytes)},"
                 f" {result.precopy_rounds} rounds, downtime {_ms(result.downtime_ms)}")
    fig.savefig(path)


def _bucket_label(i: int) -> str:
    us = 2**i
    if us >= 1_000_000:
        return f"{us // 1_000_000}s" if us % 1_000_000 == 0 else f"{us / 1e6:.1f}s"
    if us >= 1000:
        return f"{us / 1000:g}ms"
    return f"{us}"
