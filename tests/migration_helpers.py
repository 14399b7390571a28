"""Run a migration with the destination in a child process (it may block on faults) and a
deadline on everything."""

from __future__ import annotations

import multiprocessing as mp
import queue
from dataclasses import asdict
from typing import Any

from livemig import migration, wire
from livemig.guest import GuestConfig


def _destination(q: Any, config: migration.DestinationConfig, settle_s: float) -> None:
    with wire.Listener("127.0.0.1:0") as lst:
        q.put(("address", str(lst.address)))
        try:
            s = migration.serve(lst, config, settle_s=settle_s)
            q.put(("summary", asdict(s)))
        except Exception as e:  # reported to the test, which asserts on it
            q.put(("error", f"{type(e).__name__}: {e}"))


def run_migration(
    guest: GuestConfig,
    config: migration.MigrationConfig,
    *,
    size: int = 16 << 20,
    dest: migration.DestinationConfig | None = None,
    settle_s: float = 3.0,
    deadline_s: float = 60.0,
) -> tuple[migration.MigrationResult, dict[str, Any]]:
    """Migrates a fresh guest of ``size`` bytes; returns the source's result and the
    destination's own summary. The destination runs in a spawned process, killed at the deadline."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_destination, args=(q, dest or migration.DestinationConfig(timeout=20), settle_s))
    proc.start()
    try:
        kind, address = q.get(timeout=deadline_s)
        assert kind == "address"
        result = migration.migrate(address, size, guest, config)
        kind, summary = q.get(timeout=deadline_s)
        assert kind == "summary", summary
        proc.join(deadline_s)
        return result, summary
    except queue.Empty:
        raise AssertionError(f"the destination did not answer within {deadline_s} s") from None
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        q.close()
        q.join_thread()
