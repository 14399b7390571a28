"""Soak: one guest migrated back and forth between two long-lived processes for minutes, precopy
and postcopy in turn, hints on, the guest writing as fast as it can; every migration is verified
(the increment oracle, or the generation table for the random workload), and neither process may
grow in memory or file descriptors once warmed up.

The soak test is deselected by default (``-m "not soak"`` in pyproject's addopts; a short
back-and-forth runs in the default run); run it with
``python -m pytest -m soak tests/test_soak.py -s``. ``LIVEMIG_SOAK_SECONDS`` sets how long
(default 180). Each worker process serves or migrates on command; the guest that arrives is kept
(``serve(keep=...)``, as a :class:`GuestImage`) and is the one sent back
(``ModelGuest.from_image``). Every
``FRESH_EVERY`` migrations a fresh guest starts with the other workload.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from livemig import migration, wire
from livemig.guest import Guest, GuestConfig
from livemig.workload.model import GuestImage, ModelGuest

SECONDS = float(os.environ.get("LIVEMIG_SOAK_SECONDS", "180"))
SIZE = 32 << 20
SECRET = b"soak"
FRESH_EVERY = 16
WARMUP = 8  # migrations before the memory and fd baseline is taken
RSS_SLACK = 24 << 20  # growth past the warm-up maximum that still counts as noise (a region: 32 MiB)
FD_SLACK = 2
WORKLOADS: list[dict[str, Any]] = [
    {"workload": "increment", "free_fraction": 0.25},
    {"workload": "random", "free_fraction": 0.25, "churn": 2000.0},
]

def _worker(name: str, commands: Any, answers: Any) -> None:
    """Listens on loopback; on ("serve",) takes one migration and keeps its guest, on ("migrate",
    address, postcopy, fresh workload or None) sends the kept guest (or a fresh one) there."""
    image: GuestImage | None = None
    with wire.Listener("127.0.0.1:0") as listener:
        answers.put(("ready", name, str(listener.address)))
        while (cmd := commands.get())[0] != "stop":
            try:
                if cmd[0] == "serve":
                    kept: list[GuestImage] = []
                    config = migration.DestinationConfig(secret=SECRET, timeout=20.0)
                    s = migration.serve(listener, config, wait=60.0,
                                        keep=lambda w, into=kept: into.append(w.image()))  # type: ignore[attr-defined]
                    image = kept[0] if kept else None
                    # The guest's own counters travel with it: they prove the same guest came back.
                    written = Guest.from_state(image.memory, image.state).stats().pages_written if image else -1
                    answers.put(("served", name, {**s.to_json(), "pages_written": written}))
                else:
                    _, address, postcopy, fresh = cmd
                    if fresh is not None:
                        image = None
                    guest = GuestConfig(**(fresh or {}))
                    cfg = migration.MigrationConfig(postcopy=postcopy, hints=True, secret=SECRET, verify=True,
                                                    timeout=20.0)
                    w = ModelGuest.from_image(image) if image is not None else ModelGuest(SIZE, guest)
                    try:
                        r = migration.migrate(address, w, cfg)
                    finally:
                        w.stop()
                    image = None  # it runs on the other side now
                    answers.put(("migrated", name, r.to_json()))
            except Exception as e:  # reported to the test, which fails on it
                answers.put(("error", name, f"{type(e).__name__}: {e}"))


def _rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


def _back_and_forth(seconds: float, at_least: int) -> tuple[int, dict[str, int], dict[str, Samples]]:
    """Migrations between two worker processes, alternating direction, for ``seconds`` and at
    least ``at_least`` times; each one checked. Returns the count, totals and the workers' samples."""
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    names = ("A", "B")
    commands = {n: ctx.Queue() for n in names}
    procs = {n: ctx.Process(target=_worker, args=(n, commands[n], answers)) for n in names}
    for p in procs.values():
        p.start()
    samples = {n: Samples() for n in names}
    counts = {"precopy": 0, "postcopy": 0, "requests": 0, "hinted": 0}
    written = -1
    i = 0
    try:
        address = {}
        for _ in names:
            kind, n, addr = answers.get(timeout=60)
            assert kind == "ready"
            address[n] = addr
        end = time.monotonic() + seconds
        while time.monotonic() < end or i < at_least:
            src, dst = names[i % 2], names[1 - i % 2]
            postcopy = i % 4 in (1, 2)  # each direction sees both modes
            fresh = WORKLOADS[(i // FRESH_EVERY) % 2] if i % FRESH_EVERY == 0 else None
            commands[dst].put(("serve",))
            commands[src].put(("migrate", address[dst], postcopy, fresh))
            got: dict[str, Any] = {}
            for _ in range(2):
                kind, n, what = answers.get(timeout=120)
                assert kind != "error", f"migration {i} ({src} -> {dst}, postcopy={postcopy}): {n}: {what}"
                got[kind] = what
            r, s = got["migrated"], got["served"]
            assert r["ok"] and s["ok"], (i, r, s)
            assert r["verify"]["mismatches"] == 0 and r["verify"]["pages_checked"] > 0, (i, r["verify"])
            assert s["postcopy"]["outstanding_requests"] == 0, (i, postcopy, s["postcopy"], r["postcopy"])
            assert s["balloon"]["done_delivered"] and s["balloon"]["held_pages_after"] == 0, (i, s["balloon"])
            if fresh is None:  # the guest that left came back and went on writing
                assert s["pages_written"] > written, (i, written, s["pages_written"])
            written = s["pages_written"]
            counts["postcopy" if postcopy else "precopy"] += 1
            counts["requests"] += r["postcopy"]["requests"]
            counts["hinted"] += r["hints"]["pages_hinted"]
            for name in names:
                rss, fds = _rss_and_fds(procs[name].pid or 0)
                samples[name].rss.append(rss)
                samples[name].fds.append(fds)
            i += 1
    finally:
        for n in names:
            commands[n].put(("stop",))
        for p in procs.values():
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join()
        answers.close()
        answers.join_thread()
        for q in commands.values():
            q.close()
            q.join_thread()
    return i, counts, samples


@pytest.mark.timeout(60)
def test_a_guest_goes_back_and_forth_and_stays_itself() -> None:
    """The short version, in the default run: there and back twice, precopy and postcopy."""
    n, counts, _ = _back_and_forth(0.0, 4)
    assert n == 4 and counts["precopy"] == 2 and counts["postcopy"] == 2 and counts["hinted"] > 0


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 180)
def test_back_and_forth_under_load_stays_correct_and_does_not_leak() -> None:
    n, counts, samples = _back_and_forth(SECONDS, 2 * WARMUP)
    for name, smp in samples.items():
        rss, fds = smp.rss, smp.fds
        base_rss, base_fds = max(rss[:WARMUP]), max(fds[:WARMUP])
        print(f"\nsoak {name}: {n} migrations in {SECONDS:.0f} s ({counts}); RSS MiB warm-up max"
              f" {base_rss / 2**20:.1f}, later max {max(rss[WARMUP:]) / 2**20:.1f}, last"
              f" {rss[-1] / 2**20:.1f}; fds warm-up max {base_fds}, later max {max(fds[WARMUP:])}")
        trend = [f"{rss[WARMUP + k * (len(rss) - WARMUP - 1) // 8] / 2**20:.2f}" for k in range(9)]
        print(f"soak {name}: RSS MiB from warm-up to the end, in eighths: {' '.join(trend)}")
        assert max(rss[WARMUP:]) <= base_rss + RSS_SLACK, (name, rss)
        assert max(fds[WARMUP:]) <= base_fds + FD_SLACK, (name, fds)
    assert counts["precopy"] and counts["postcopy"] and counts["hinted"]
