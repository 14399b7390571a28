"""The pictures of ``livemig migrate --plot FILE``: what a user needs to judge a migration, drawn
from the fields of its :class:`MigrationResult` (the figures the summary and the JSON show).

- convergence: pages dirty at each round's sync, dirtied while it was sent, and left after it,
  beside the pages that would fit the downtime limit at the round's bandwidth;
- rates: each round's send bandwidth against the rate the workload dirtied pages (both MiB/s),
  with the whole migration's average throughput;
- postcopy timeline: requests (faults that needed the source) per bin, pages pushed so far, pages
  still on the source;
- fault latency: faults per latency bucket (linear counts over log-spaced latency, buckets drawn
  with the bounds the core reports) with the share of faults at or below each bound, p50, p99 and
  max marked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig.display import _ms, check_plot_path, format_bytes, format_rate, require_matplotlib
from livemig.migration import MigrationResult
from livemig.migration.results import LatencyBuckets, LatencySummary, PostcopyStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MIB = float(1 << 20)

PANEL_CONVERGENCE = "convergence: pages per precopy round"
PANEL_RATES = "rates per precopy round: send bandwidth against dirtying"
PANEL_TIMELINE = "postcopy timeline"
PANEL_LATENCY = "postcopy fault latency"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def us_label(us: float) -> str:
    """A latency in words: ``0.5 us``, ``20 us``, ``409 us``, ``1.5 ms``, ``2 s`` (3 digits at most)."""
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} us"


def title(result: MigrationResult) -> str:
    r = result
    return (f"livemig {r.mode}: {format_bytes(r.region_bytes)}, {_plural(r.precopy_rounds, 'precopy round')},"
            f" downtime {_ms(r.downtime_ms)}, total {_ms(r.total_ms)}" + ("" if r.ok else " (FAILED)"))


def panels(result: MigrationResult) -> list[str]:
    """The panels ``plot_migration`` draws for ``result``, top to bottom."""
    out = []
    if result.rounds:
        out += [PANEL_CONVERGENCE, PANEL_RATES]
    if result.mode == "postcopy":
        out += [PANEL_TIMELINE, PANEL_LATENCY]
    return out or [PANEL_CONVERGENCE]


def plot_migration(result: MigrationResult, path: str) -> list[str]:
    """Writes the pictures of ``result`` to ``path`` (its suffix names the format: ValueError when
    it names none); returns the panels' titles."""
    check_plot_path(path)
    require_matplotlib()
    from matplotlib.figure import Figure  # optional dependency

    names = panels(result)
    fig = Figure(figsize=(10, 1.0 + 3.4 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    draw = {PANEL_CONVERGENCE: _convergence, PANEL_RATES: _rates, PANEL_TIMELINE: _timeline,
            PANEL_LATENCY: _latency}
    for ax, name in zip(axes, names):
        draw[name](ax, result)
        ax.set_title(name, loc="left", fontsize=11)
    fig.suptitle(title(result), fontsize=12)
    fig.savefig(path, dpi=90)
    return names


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _convergence(ax: Axes, r: MigrationResult) -> None:
    if not r.rounds:
        _empty(ax, "no precopy round: every page went by the postcopy push or on demand")
        return
    idx = np.array([x.index for x in r.rounds], dtype=float)
    w = 0.27
    ax.bar(idx - w, [x.dirty_pages for x in r.rounds], w, label="dirty at the round's sync (sent by it)",
           color="tab:blue")
    ax.bar(idx, [x.dirtied_pages for x in r.rounds], w, label="dirtied while it was sent", color="tab:orange")
    ax.bar(idx + w, [x.remaining_pages for x in r.rounds], w, label="left after it (next round's work)",
           color="tab:red")
    top = max(max(x.dirty_pages, x.dirtied_pages, x.remaining_pages) for x in r.rounds) * 1.6 or 1.0
    if r.downtime_limit_ms > 0:
        fit = [x.bandwidth_bps * r.downtime_limit_ms / 1e3 / r.page_size for x in r.rounds]
        label = f"pages that fit the {r.downtime_limit_ms:g} ms downtime limit at the round's bandwidth"
        ax.hlines(np.minimum(fit, top * 0.97), idx - 1.5 * w, idx + 1.5 * w, colors="black", linestyles="--",
                  linewidth=1.3, label=label)
        for i, f in zip(idx, fit):
            if f > top * 0.97:  # off the scale: say where it is instead of squashing the bars
                ax.annotate(f"fits {f:,.0f} ^", (i, top * 0.97), ha="center", va="top", fontsize=8)
    ax.set_xticks(idx, [str(int(i)) for i in idx])
    ax.set_xlabel("precopy round")
    ax.set_ylabel("pages")
    ax.set_ylim(0, top)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)


def _rates(ax: Axes, r: MigrationResult) -> None:
    idx = [x.index for x in r.rounds]
    bw = [x.bandwidth_bps / MIB for x in r.rounds]
    dirty = [x.dirty_rate_pps * r.page_size / MIB for x in r.rounds]
    ax.plot(idx, bw, marker="o", color="tab:blue", label="send bandwidth (bytes sent / send time)")
    ax.plot(idx, dirty, marker="s", color="tab:orange", label="dirtying (pages the tracker found written / s)")
    if r.throughput_bps > 0:
        ax.axhline(r.throughput_bps / MIB, color="0.4", linestyle=":",
                   label=f"whole migration: {format_rate(r.throughput_bps)} (bytes sent / total time)")
    ax.set_xticks(idx, [str(i) for i in idx])
    ax.set_xlabel("precopy round (converges while dirtying stays below the bandwidth)")
    ax.set_ylabel("MiB/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _timeline(ax: Axes, r: MigrationResult) -> None:
    tl = r.timeline
    if tl is None or not (tl.requests or tl.push_pages):
        _empty(ax, "no postcopy timeline")
        return
    n = max(len(tl.requests), len(tl.push_pages), len(tl.left_pages))

    def pad(xs: tuple[int, ...], fill: float = 0.0) -> Any:
        a = np.full(n, fill, dtype=float)
        a[: len(xs)] = xs
        return a

    t = np.arange(n) * tl.bin_seconds
    edges = np.arange(n + 1) * tl.bin_seconds  # a bin's figures hold at its end
    req = pad(tl.requests)
    ms = tl.bin_seconds * 1e3
    ax.bar(t, req, width=tl.bin_seconds, align="edge", color="tab:purple", alpha=0.8,
           label=f"requests from the destination per {ms:g} ms (faults on missing pages)")
    ax.set_xlabel(f"seconds since postcopy started ({tl.start_s:.2f} s into the migration)")
    ax.set_ylabel(f"requests per {ms:g} ms")
    ax.set_ylim(bottom=0, top=max(1.0, float(req.max()) * 1.15))
    ax.set_xlim(0, edges[-1])
    right = ax.twinx()
    pushed = np.concatenate([[0.0], np.cumsum(pad(tl.push_pages) + pad(tl.request_pages))])
    right.plot(edges, pushed, color="tab:green", linewidth=1.8,
               label="pages sent since postcopy started (push and requests)")
    if tl.left_pages:
        left = np.concatenate([[float(tl.left_at_start)], pad(tl.left_pages, fill=float(tl.left_pages[-1]))])
        right.plot(edges, left, color="tab:red", linewidth=1.8, label="pages still on the source")
    right.set_ylabel("pages")
    right.set_ylim(bottom=0, top=max(1.0, tl.left_at_start, float(pushed.max())) * 1.05)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=3, frameon=False)  # below the axes: the lines cross the whole panel
    ax.grid(axis="x", alpha=0.3)


def _latency(ax: Axes, r: MigrationResult) -> None:
    p = r.postcopy
    hist = list(p.histogram)
    uppers = list(p.histogram_upper_us)
    if not any(hist) or len(uppers) != len(hist):
        _empty(ax, "no postcopy fault was timed: the workload touched no missing page"
               if not any(hist) else "no bucket bounds in the destination's report")
        return
    last = max(k for k, n in enumerate(hist) if n)
    first = min(k for k, n in enumerate(hist) if n)
    lo_k = max(first - 1, 0)
    hi_k = min(last + 1, len(hist) - 1)
    lowers = [uppers[k - 1] if k > 0 else uppers[0] / 2 for k in range(len(hist))]
    ks = range(lo_k, hi_k + 1)
    ax.bar([lowers[k] for k in ks], [hist[k] for k in ks], width=[uppers[k] - lowers[k] for k in ks],
           align="edge", color="tab:green", edgecolor="white", label="faults per power-of-two bucket (fault to placed)")
    ax.set_xscale("log")
    total = sum(hist)
    right = ax.twinx()
    rows = []
    for (name, lat, fine), colour in zip(_measures(p), ("0.2", "tab:blue", "tab:purple"), strict=True):
        if sum(fine.counts):
            xs = [fine.lower_us[0], *fine.upper_us]
            cdf = [0.0, *(np.cumsum(fine.counts) * 100.0 / sum(fine.counts))]
            right.step(xs, cdf, where="post", color=colour, linewidth=1.2, label=f"{name} (% at or below)")
        rows.append(f"{name:<17} p50 {us_label(lat.p50):>7}  p90 {us_label(lat.p90):>7}  p99 {us_label(lat.p99):>7}"
                    f"  p99.9 {us_label(lat.p99_9):>7}  max {us_label(lat.max):>7}  >1ms {lat.over_1ms:,}"
                    f"  >10ms {lat.over_10ms:,}")
    right.set_ylim(0, 105)
    right.set_ylabel("% at or below")
    ax.text(0.5, -0.2, "\n".join(rows), transform=ax.transAxes, ha="center", va="top", fontsize=7.5,
            family="monospace")  # below the axes and their label: the lines cross the whole panel
    lat = p.fault_latency_us
    for value, name, style in ((lat.p50, "p50", "--"), (lat.p99, "p99", "-."), (lat.max, "max", ":")):
        if value > 0:
            ax.axvline(value, color="tab:red", linestyle=style, linewidth=1.3, label=f"fault {name} {us_label(value)}")
    lo, hi = lowers[lo_k], uppers[hi_k]
    for _, _, fine in _measures(p):
        if sum(fine.counts):
            lo, hi = min(lo, max(fine.lower_us[0], 0.1)), max(hi, fine.upper_us[-1])
    ax.set_xlim(lo, hi)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5)]
    ticks = [x for x in ticks if lo <= x <= hi] or [lo, hi]
    ax.set_xticks(ticks, [us_label(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"latency ({total:,} faults timed; lines from buckets 1/64 wide)")
    ax.set_ylabel("faults")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def _measures(p: PostcopyStats) -> list[tuple[str, LatencySummary, LatencyBuckets]]:
    """The three postcopy latency measures: name, figures, fine buckets."""
    return [("fault to placed", p.fault_latency_us, p.fault_buckets),
            ("request to placed", p.request_latency_us, p.request_buckets),
            ("thread blocked", p.blocked_us, p.blocked_buckets)]


__all__ = ["PANEL_CONVERGENCE", "PANEL_LATENCY", "PANEL_RATES", "PANEL_TIMELINE", "panels", "plot_migration",
           "title", "us_label"]

