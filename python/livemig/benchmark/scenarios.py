"""The scenarios of ``livemig bench``: data, which the runner's kinds interpret."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from livemig.benchmark.figures import PAGE

#: Bitmap sizes in pages: 1 GiB, 16 GiB, 128 GiB and 1 TiB regions of 4 KiB pages.
BITMAP_PAGES = (1 << 18, 1 << 22, 1 << 25, 1 << 28)


@dataclass(frozen=True)
class Scenario:
    """One measurement: ``kind`` names the runner, ``args`` its arguments."""

    name: str
    group: str
    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


def size_label(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def scenarios(sizes: Sequence[int], quick: bool = False) -> list[Scenario]:
    """The standard scenarios for these region sizes (quick: one workload per mode, smaller
    fault and hint sets; the bitmap figures always go up to 1 TiB)."""
    out: list[Scenario] = [Scenario("baselines", "baselines", "baselines", (("size", min(sizes)),))]
    workloads = ("idle", "random") if quick else ("idle", "random", "hotset")
    for size in sizes:
        s = size_label(size)
        for mode in ("precopy", "postcopy"):
            # "buffer": a user's buffer (the buffer workload) of the same size, nothing writing it,
            # beside the model guest's idle run.
            for w in (*workloads, "buffer"):
                out.append(
                    Scenario(
                        f"{mode}-{w}-{s}",
                        "migration",
                        "migration",
                        (("size", size), ("mode", mode), ("workload", w)),
                    )
                )
    # The destination's prefault on and off (issue 21), idle and with a light writer.
    for size in sizes:
        for writer in (False, True):
            name = f"prefault-{'writer' if writer else 'idle'}-{size_label(size)}"
            out.append(Scenario(name, "prefault", "prefault", (("size", size), ("writer", writer))))
    small = min(sizes)
    s = size_label(small)
    out.append(Scenario(f"zero-pages-{s}", "zero", "zero", (("size", small),)))
    for free in (0.0, 0.5, 0.9):
        out.append(
            Scenario(
                f"hints-{int(free * 100)}pct-free-{s}",
                "hints",
                "hints",
                (("size", small), ("free", free)),
            )
        )
    for access in ("sequential", "random"):
        for urgent in (True, False):
            name = f"faults-{access}-{'urgent' if urgent else 'no-urgent'}-{s}"
            out.append(
                Scenario(
                    name,
                    "faults",
                    "faults",
                    (("size", small), ("access", access), ("urgent", urgent)),
                )
            )
    for n in (1, 2, 4):
        out.append(
            Scenario(
                f"channels-{n}-{s}", "channels", "channels", (("size", small), ("channels", n))
            )
        )
    for size in sizes:
        out.append(Scenario(f"sync-{size_label(size)}", "scaling", "sync", (("size", size),)))
    for size in sizes:  # another process's memory (docs/attach.md) beside the in-process kind
        for kind in ("attach-precopy", "attach-sync", "attach-postcopy"):
            out.append(Scenario(f"{kind}-{size_label(size)}", "attach", kind, (("size", size),)))
    for pages in BITMAP_PAGES:
        out.append(
            Scenario(f"bitmap-{size_label(pages * PAGE)}", "bitmap", "bitmap", (("pages", pages),))
        )
    out += tls_scenarios(min(max(sizes), 1 << 30))
    return out


def tls_scenarios(size: int) -> list[Scenario]:
    """The encryption scenarios for a region of ``size`` bytes (1 GiB in the issue's goals): the
    precopy into fresh and into warm destination memory, a sending channel's cost, fault latency
    and the handshake."""
    s = size_label(size)
    out = [Scenario(f"tls-precopy-idle-{s}{'-warm' if warm else ''}", "tls", "tls_precopy",
                    (("size", size), ("channels", 1), ("warm", warm))) for warm in (False, True)]
    out.append(Scenario("tls-channel-cost", "tls", "tls_channel_cost", (("bytes", 512 << 20),)))
    small = min(size, 256 << 20)
    out.append(Scenario(f"tls-faults-{size_label(small)}", "tls", "tls_faults", (("size", small),)))
    out.append(Scenario("tls-handshake", "tls", "tls_handshake", (("extra", 0),)))
    return out


def needs_postcopy(sc: Scenario) -> bool:
    """The scenario runs a postcopy migration (userfaultfd on the destination)."""
    return sc.kind in ("faults", "tls_faults", "attach-postcopy") or (
        sc.kind == "migration" and sc.arg("mode") == "postcopy")


def select(all_scenarios: Sequence[Scenario], patterns: Sequence[str]) -> list[Scenario]:
    """The scenarios whose name or group matches one of the shell patterns (all when none)."""
    if not patterns:
        return list(all_scenarios)
    return [
        s
        for s in all_scenarios
        if any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.group, p) for p in patterns)
    ]


__all__ = ["BITMAP_PAGES", "Scenario", "needs_postcopy", "scenarios", "select", "size_label", "tls_scenarios"]
