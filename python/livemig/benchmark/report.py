"""The report of ``livemig bench``: its figures, the machine they were measured on, the table on a
terminal and the progress display while it runs."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from livemig.benchmark.figures import PAGE, SKIPPED, Figure

StepFn = Callable[[str], None]


@dataclass
class Report:
    """What ``livemig bench`` measured; ``to_json()`` is its ``--json`` object."""

    figures: list[Figure]
    settings: dict[str, Any]
    machine: dict[str, Any]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "machine": self.machine,
            "seconds": self.seconds,
            "figures": [asdict(f) for f in self.figures],
        }


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPUs, memory, kernel, and who else was using the CPUs."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "loadavg_at_start": list(os.getloadavg()),
        "page_size": PAGE,
        "python": platform.python_version(),
    }

def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def table(report: Report) -> Any:
    """The report as a rich Table (figures in group order; a failed scenario shows its error)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=escape("livemig bench: engine vs raw baselines, same run (median [min-max])"),
        title_justify="left",
    )
    for col, just in (
        ("figure", "left"),
        ("value", "right"),
        ("baseline", "left"),
        ("ratio", "right"),
        ("goal", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    group = None
    for f in report.figures:
        if f.group != group:
            group = f.group
            t.add_section()
        if f.error is not None:
            skipped = f.error.startswith(SKIPPED)
            status = "[yellow]skipped[/yellow]" if skipped else "[red]failed[/red]"
            t.add_row(escape(f.name), status, escape(f.error.removeprefix(SKIPPED)), "", "")
            continue
        lo, hi = f.spread or (None, None)
        value = escape(f"{_fmt(f.value)} {f.unit} [{_fmt(lo)}-{_fmt(hi)}]")
        if f.is_baseline:
            t.add_row(escape(f.name), value, escape(str(f.details.get("how", ""))), "", "")
            continue
        base = escape(f"{_fmt(f.baseline)} {f.unit} {f.baseline_name}")
        goal = ""
        if f.goal_ratio is not None:
            mark = "[green]met[/green]" if f.met else "[red]not met[/red]"
            goal = f"{'>=' if f.better == 'higher' else '<='} {f.goal_ratio:g}: {mark}"
        t.add_row(escape(f.name), value, base, _fmt(f.ratio), goal)
    return t


#: the postcopy latency measures a faults scenario reports: details key prefix, name
LATENCY_MEASURES = (("fault", "fault read to placed"), ("request", "request sent to placed"),
                    ("blocked", "thread blocked"))


def latency_table(report: Report) -> Any | None:
    """The faults scenarios' three postcopy latency measures (every run's histogram merged, buckets
    1/64 wide): p50 / p90 / p99 / p99.9 / max in us and the samples over 1 ms and 10 ms; None
    when no faults scenario ran."""
    from rich.markup import escape
    from rich.table import Table

    figs = [f for f in report.figures if f.group == "faults" and f.error is None and "fault_max_us" in f.details]
    if not figs:
        return None
    t = Table(title=escape("postcopy latency, all runs of a scenario merged (us)"), title_justify="left")
    for col in ("scenario", "measure", "samples", "p50", "p90", "p99", "p99.9", "max", "> 1 ms", "> 10 ms"):
        t.add_column(col, justify="left" if col in ("scenario", "measure") else "right")
    for f in figs:
        t.add_section()
        for key, name in LATENCY_MEASURES:
            d = f.details
            counts = (d.get(f"{key}_buckets") or {}).get("counts", ())
            t.add_row(escape(f.name.removesuffix(" fault p50")), name, f"{sum(counts):,}",
                      *(_fmt(d.get(f"{key}_{q}_us")) for q in ("p50", "p90", "p99", "p99_9", "max")),
                      f"{d.get(f'{key}_over_1ms', 0):,}", f"{d.get(f'{key}_over_10ms', 0):,}")
    return t


@contextmanager
def progress(console: Any, enabled: bool | None, total: int) -> Iterator[StepFn]:
    """A step function for :class:`Bench`: a rich bar over the scenarios on a terminal, one plain
    line per scenario otherwise (``enabled`` None: only on a terminal), or nothing."""
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield lambda _name: None
    elif console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            TextColumn("[bold]{task.fields[name]:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        task = bar.add_task("bench", total=total, name="")
        started = [False]

        def step(name: str) -> None:
            bar.update(task, name=name, advance=1 if started[0] else 0)
            started[0] = True

        with bar:
            yield step
    else:
        count = [0]

        def line(name: str) -> None:
            count[0] += 1
            console.file.write(f"livemig: bench {name} ({count[0]}/{total})\n")
            console.file.flush()

        yield line


__all__ = ["Report", "StepFn", "machine_info", "progress", "table"]
