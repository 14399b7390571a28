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
    hists = [f for f in report.figures if f.group == "faults" and any(f.details.get("histogram", ()))]
    if hists:
        paths.append(_fault_latency(hists, directory))
    return paths


#: the three postcopy latency measures: details key prefix and panel title
MEASURES = (("fault", "fault read to page placed"), ("request", "request sent to page placed"),
            ("blocked", "faulting thread blocked (fault read to wake)"))


def _fault_latency(hists: list[Figure], directory: str) -> str:
    """One panel per latency measure: each faults scenario's distribution as the share of samples
    at or below each log-linear bucket's upper bound (the bounds travel with the counts), over
    log-spaced latency; p50 dashed, the raw floor (ping-pong + UFFDIO_COPY) dotted."""
    from matplotlib.figure import Figure as MplFigure  # optional dependency

    from livemig.plot import us_label

    fig = MplFigure(figsize=(10, 12), layout="constrained")
    axes = fig.subplots(len(MEASURES), 1)
    for ax, (key, title) in zip(axes, MEASURES):
        lo, hi = math.inf, 0.0
        for i, f in enumerate(hists):
            fine = f.details.get(f"{key}_buckets") or {}
            counts = [int(n) for n in fine.get("counts", ())]
            if not sum(counts):
                continue
            upper = [float(x) for x in fine["upper_us"]]
            total = sum(counts)
            xs = [float(fine["lower_us"][0])] + upper
            cdf = [0.0] + list(np.cumsum(counts) * 100.0 / total)
            colour = f"C{i}"
            ax.step(xs, cdf, where="post", color=colour, linewidth=1.6, label=f"{f.name.removesuffix(' fault p50')} ({total:,} samples)")
            p50 = f.details.get(f"{key}_p50_us")
            if isinstance(p50, (int, float)) and p50 > 0:
                ax.axvline(p50, color=colour, linestyle="--", linewidth=1)
            if f.baseline:
                ax.axvline(f.baseline, color=colour, linestyle=":", linewidth=1)
            lo, hi = min(lo, max(xs[0], 0.1)), max(hi, xs[-1])
        if hi > 0:
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            ticks = [x for x in (m * 10.0**e for e in decades for m in (1, 2, 5)) if lo <= x <= hi]
            ax.set_xticks(ticks, [us_label(x) for x in ticks])
            ax.minorticks_off()
            ax.legend(fontsize=7, loc="lower right")
        ax.set_ylim(0, 101)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("% at or below")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("latency (dashed: p50; dotted: the raw floor, ping-pong + UFFDIO_COPY)")
    fig.suptitle("livemig bench: postcopy latency distributions")
    path = os.path.join(directory, "fault-latency.png")
    fig.savefig(path, dpi=100)
    return path


__all__ = ["plot"]
