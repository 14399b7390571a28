"""Precopy with the drain before the pause (capability precopy-drain) and with it withheld,
alternated in one run (which goes first swaps every run), at each size, the light writer, the
prefault on: the downtime and its steps (docs/performance.md, "What is left in the pause").

    python bench/precopy_drain.py --sizes 1G,4G,8G --runs 3

Each migration is a loopback one (the destination in a child process), verified."""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Sequence

from livemig.cli.params import parse_size
from livemig.guest import GuestConfig
from livemig.loopback import migrate_locally
from livemig.migration import DestinationConfig, MigrationConfig

STEPS = ("final_sync_ms", "last_pages_ms", "device_state_ms", "resume_ms")


def one(size: int, drain: bool) -> dict[str, float]:
    """One migration; its downtime, steps, the destination's own resume, the drain and the pages."""
    off = frozenset() if drain else frozenset({"precopy-drain"})
    config = MigrationConfig(hints=False, verify=True, downtime_limit_ms=2.0, timeout=120, disable_capabilities=off)
    guest = GuestConfig(workload="random", rate=2000.0, seed=1)
    r, _ = migrate_locally(guest, config, size=size, dest=DestinationConfig(timeout=120), settle_s=0.5,
                           deadline_s=600)
    gc.collect()  # the guest's memory goes now, not at some later collection
    if not r.ok or r.verify is None or r.verify.mismatches:
        raise SystemExit(f"migration failed: {r.error or r.verify}")
    row = {"downtime_ms": r.downtime_ms, **{k: getattr(r.downtime_split, k) for k in STEPS},
           "destination_resume_ms": r.destination_resume_ms, "drain_ms": r.drain.ms if r.drain else 0.0,
           "switchover_pages": float(r.switchover_pages), "total_ms": r.total_ms}
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="1G,4G", help="region sizes, comma separated (default 1G,4G)")
    p.add_argument("--runs", type=int, default=3, help="runs of each, per size (default 3)")
    a = p.parse_args(argv)
    try:
        sizes = [parse_size(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError as e:
        p.error(str(e))
    if a.runs < 1:
        p.error("--runs must be at least 1")
    rows: dict[tuple[int, bool], list[dict[str, float]]] = {}
    for size in sizes:
        for i in range(a.runs):
            for drain in (True, False) if i % 2 == 0 else (False, True):
                row = one(size, drain)
                rows.setdefault((size, drain), []).append(row)
                print(f"{size >> 20} MiB drain {'on ' if drain else 'off'}",
                      " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    print("medians:")
    for (size, drain), rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{size >> 20} MiB drain {'on ' if drain else 'off'}", " ".join(f"{k}={v:.2f}" for k, v in med.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
