"""``livemig bench``: livemig measured on this machine, every figure beside a raw baseline."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import click

from livemig import display, wire
from livemig.cli.base import error, main, print_json, stderr_console, usage
from livemig.cli.params import parse_size

_RESERVE = 2 << 30  #: memory a bench run needs beside two copies of its largest region


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as e:
        raise usage(str(e), "--sizes") from None
    if not sizes:
        raise usage("give at least one size, like 256M,1G", "--sizes")
    # A migration holds the source's and the destination's memory, a raw baseline its two buffers
    # (one after the other, never together), plus tables, sockets and Python: 2 GiB kept for those.
    if 2 * sizes[-1] + _RESERVE > wire.physical_memory_bytes():
        raise usage(f"{sizes[-1]} bytes needs twice that in memory and 2 GiB more,"
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
        raise usage(f"no scenario matches {', '.join(patterns)};"
                     f" groups: {', '.join(benchmark.GROUPS)} (see --list)", "--scenario")
    if list_only:
        for sc in chosen:
            click.echo(f"{sc.group:<10} {sc.name}")
        return 0
    if plot_dir is not None:
        try:
            display.require_matplotlib()
        except display.PlotUnavailable as e:
            raise usage(str(e)) from None
    if json_file not in (None, "-"):
        parent = os.path.dirname(os.path.abspath(json_file))
        if not os.path.isdir(parent):
            raise usage(f"no directory {parent!r} for the JSON file", "--json")
    runs = repeat or 3
    settings = {"command": " ".join(["livemig", *sys.argv[1:]]), "quick": quick,
                "sizes": region_sizes, "repeat": runs, "scenarios": [sc.name for sc in chosen]}
    console = stderr_console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a log or a pipe: room for the table
    with benchmark.progress(console, progress, len(chosen)) as step:
        runner = benchmark.Bench(repeat=runs, micro=3 if quick else 5, step=step)
        report = runner.run(chosen, settings)
    if not quiet:
        console.print(benchmark.table(report))
        latencies = benchmark.latency_table(report)
        if latencies is not None:
            console.print(latencies)
    if json_file == "-":
        print_json(report.to_json())
    elif json_file is not None:
        with open(json_file, "w", encoding="utf-8") as f:
            json.dump(display.json_ready(report.to_json()), f, allow_nan=False, indent=1)
            f.write("\n")
    if plot_dir is not None:
        try:
            benchmark.plot(report, plot_dir)
        except (OSError, ValueError) as e:
            error(f"cannot write the plots to {plot_dir}: {e}")
            return 1
    failed = [f.name for f in report.figures
              if f.error is not None and not f.error.startswith(benchmark.SKIPPED)]
    if failed:
        error(f"{len(failed)} scenario(s) failed: {', '.join(failed)}")
        return 1
    return 0


