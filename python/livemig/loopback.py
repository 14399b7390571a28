"""A migration on one machine: the destination in a child process (its workload may block on
faults, so it never shares a process with the caller), the source here, a deadline on everything.
Used by the tests, the benchmarks and anyone scripting an experiment."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable
from typing import Any

from livemig import migration, wire
from livemig.errors import MigrationError
from livemig.guest import GuestConfig
from livemig.workload.base import Workload, WorkloadFactory
from livemig.workload.model import ModelGuest


def _destination(q: Any, config: migration.DestinationConfig, settle_s: float, await_reuse: bool,
                 factory: Callable[[], WorkloadFactory] | None = None) -> None:
    faulthandler.register(signal.SIGUSR1)  # see _stop: a hung destination's stacks go to stderr
    with wire.Listener("127.0.0.1:0") as lst:
        q.put(("address", str(lst.address)))
        try:
            s = migration.serve(lst, config, factory=None if factory is None else factory(), settle_s=settle_s,
                                await_reuse=await_reuse, wait=config.timeout)
            q.put(("summary", s.to_json()))
        except Exception as e:  # noqa: BLE001 (reported to the caller, which raises it)
            q.put(("error", f"{type(e).__name__}: {e}"))


def stop_destination(proc: Any) -> None:
    """Kills a destination child still running, after asking it for its threads' stacks (on its
    stderr: the trace a hang leaves)."""
    if not proc.is_alive():
        return
    os.kill(proc.pid, signal.SIGUSR1)
    proc.join(2)  # a bounded wait for the dump
    proc.kill()
    proc.join()


def migrate_locally(
    workload: Workload | GuestConfig,
    config: migration.MigrationConfig,
    *,
    size: int = 16 << 20,
    dest: migration.DestinationConfig | None = None,
    settle_s: float = 3.0,
    await_reuse: bool = False,
    deadline_s: float = 60.0,
    factory: Callable[[], WorkloadFactory] | None = None,
    events: migration.EventCallback | None = None,
    progress: migration.Progress | None = None,
    before: Callable[[str], None] | None = None,
) -> tuple[migration.MigrationResult, dict[str, Any]]:
    """Migrates ``workload`` (a GuestConfig: a fresh model guest of ``size`` bytes) to a
    destination in a spawned process, killed at the deadline; returns the source's result and the
    destination's own summary (as JSON). ``settle_s``/``await_reuse`` are :func:`livemig.serve`'s;
    ``factory`` (a picklable callable, run in the child) makes its workload factory; ``events`` and
    ``progress``: :func:`livemig.migrate`'s; ``before`` is called with the destination's address
    once it listens, before the migration starts (to start a process that attaches to it, say)."""
    w = ModelGuest(size, workload) if isinstance(workload, GuestConfig) else workload
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    dest = dest or migration.DestinationConfig(timeout=20)
    proc = ctx.Process(target=_destination, args=(q, dest, settle_s, await_reuse, factory))
    proc.start()
    try:
        _, address = q.get(timeout=deadline_s)
        if before is not None:
            before(address)
        try:
            result = migration.migrate(address, w, config, progress, events=events)
        finally:
            if w is not workload:  # made here: stopped here
                w.stop()
        kind, summary = q.get(timeout=deadline_s)
        if kind != "summary":
            raise MigrationError(f"destination: {summary}")
        proc.join(deadline_s)
        return result, summary
    except queue.Empty:
        raise MigrationError(f"the destination did not answer within {deadline_s} s") from None
    finally:
        stop_destination(proc)
        q.close()
        q.join_thread()
