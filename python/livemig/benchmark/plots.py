"""The pictures of ``livemig bench --plot``: per group, livemig beside its raw baselines; and the
postcopy fault latency distribution."""

from __future__ import annotations

import math
import os

import numpy as np

from livemig.benchmark.figures import GROUPS, Figure
from livemig.benchmark.report import Report, _fmt


def plot(report: Report, directory: str) -> list[str]:
    """One PNG per group with engine figures (value and baseline bars, ratio on top) in
    ``directory``; returns the paths. Needs matplotlib."""
    from matplotlib.figure import Figure as MplFigure  # optional dependency

    os.makedirs(directory, exist_ok=True)
    paths = []
    for group in GROUPS[1:]:
        figs = [
            f
            for f in report.figures
            if f.group == group and f.value is not None and f.baseline is not None
        ]
        if not figs:
            continue
        units = sorted({f.unit for f in figs})
        fig = MplFigure(figsize=(10, 3 + 2.5 * len(units)), layout="constrained")
        axes = fig.subplots(len(units), 1, squeeze=False)[:, 0]
        for ax, unit in zip(axes, units):
            sel = [f for f in figs if f.unit == unit]
            xs = np.arange(len(sel))
            vals = [f.value or 0.0 for f in sel]
            bases = [f.baseline or 0.0 for f in sel]
            yerr = np.array(
                [
                    [v - (f.spread or (v, v))[0] for v, f in zip(vals, sel)],
                    [(f.spread or (v, v))[1] - v for v, f in zip(vals, sel)],
                ]
            )
            ax.bar(
                xs - 0.2, vals, 0.4, yerr=np.clip(yerr, 0, None), label="livemig", color="tab:blue"
            )
            ax.bar(xs + 0.2, bases, 0.4, label="raw baseline", color="tab:gray")
            for x, f in zip(xs, sel):
                colour = "black" if f.met is None else ("tab:green" if f.met else "tab:red")
                ax.annotate(
                    f"x{_fmt(f.ratio)}",
                    (x, max(f.value or 0, f.baseline or 0)),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=colour,
                )
            ax.set_xticks(xs, [f.name for f in sel], rotation=30, ha="right", fontsize=7)
            better = {f.better for f in sel}
            ax.set_ylabel(f"{unit} ({better.pop()} is better)" if len(better) == 1 else unit)
            if (
                unit in ("ms", "us")
                and max(vals + bases) / max(min(v for v in vals + bases if v > 0), 1e-9) > 100
            ):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.suptitle(f"livemig bench: {group} (median of the runs, min-max bars; x ratio = livemig / baseline:"
                     " green goal met, red not met, black no goal)")
        path = os.path.join(directory, f"{group}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    hists = [
        f for f in report.figures if f.group == "faults" and any(f.details.get("histogram", ()))
    ]
    if hists:
        paths.append(_fault_latency(hists, directory))
    return paths


def _fault_latency(hists: list[Figure], directory: str) -> str:
    """Each faults scenario's latency distribution as the share of faults at or below each bucket
    bound (bounds from the core, so a new bucket layout draws right), over log-spaced latency;
    the scenario's p50 and its raw floor marked."""
    from matplotlib.figure import Figure as MplFigure  # optional dependency

    from livemig import _core
    from livemig.plot import us_label

    core_bounds = [float(x) for x in _core.DestRegion.latency_bucket_upper_us()]
    fig = MplFigure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    lo, hi = math.inf, 0.0
    for i, f in enumerate(hists):
        h = [int(n) for n in f.details["histogram"]]
        upper = [float(x) for x in f.details.get("histogram_upper_us") or core_bounds][: len(h)]
        total = sum(h)
        used = [k for k, n in enumerate(h) if n]
        first, last = used[0], used[-1]
        xs = [upper[k - 1] if k else upper[0] / 2 for k in range(first, last + 1)] + [upper[last]]
        cdf = [0.0] + [100.0 * sum(h[: k + 1]) / total for k in range(first, last + 1)]
        colour = f"C{i}"
        ax.step(xs, cdf, where="post", color=colour, linewidth=1.6, label=f"{f.name} ({total:,} faults)")
        if f.value:
            ax.axvline(f.value, color=colour, linestyle="--", linewidth=1)
        if f.baseline:
            ax.axvline(f.baseline, color=colour, linestyle=":", linewidth=1)
        lo, hi = min(lo, xs[0]), max(hi, xs[-1])
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [x for x in (m * 10.0**e for e in decades for m in (1, 2, 5)) if lo <= x <= hi]
    ax.set_xticks(ticks, [us_label(x) for x in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 101)
    ax.set_xlabel("fault latency, fault to page placed (dashed: p50; dotted: the raw floor, ping-pong + UFFDIO_COPY)")
    ax.set_ylabel("% of faults at or below")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("livemig bench: postcopy fault latency distribution")
    path = os.path.join(directory, "fault-latency.png")
    fig.savefig(path, dpi=100)
    return path


__all__ = ["plot"]
