"""The pictures of ``livemig bench --plot``: per group, livemig beside its raw baselines; and the
postcopy fault latency distribution."""

from __future__ import annotations

import math
import os

import numpy as np

from livemig.benchmark.figures import GROUPS
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
            ax.set_ylabel(unit)
            if (
                unit in ("ms", "us")
                and max(vals + bases) / max(min(v for v in vals + bases if v > 0), 1e-9) > 100
            ):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.suptitle(f"livemig bench: {group} (ratio = livemig / baseline)")
        path = os.path.join(directory, f"{group}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    hists = [
        f for f in report.figures if f.group == "faults" and any(f.details.get("histogram", ()))
    ]
    if hists:
        fig = MplFigure(figsize=(9, 5), layout="constrained")
        ax = fig.subplots()
        for f in hists:
            h = list(f.details["histogram"])
            total = sum(h)
            ax.step(range(len(h)), [100.0 * n / total for n in h], where="mid", label=f.name)
            if f.baseline:
                ax.axvline(
                    math.log2(max(f.baseline, 1.0)) + 1, color="gray", linestyle=":", linewidth=1
                )
        ax.set_xticks(
            range(0, 32, 2), [f"<{2**k}" if k else "<1" for k in range(0, 32, 2)], rotation=45
        )
        ax.set_xlim(0, 20)
        ax.set_xlabel("fault service time, us (power-of-two buckets; dotted: the raw baselines)")
        ax.set_ylabel("% of faults")
        ax.legend(fontsize=7)
        fig.suptitle("livemig bench: postcopy fault latency distribution")
        path = os.path.join(directory, "fault-latency.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


__all__ = ["plot"]
