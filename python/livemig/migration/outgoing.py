"""The source's entry point: :func:`migrate` runs a :class:`SourceRun` step by step and turns how it
ends into a :class:`MigrationResult`, or a :class:`MigrationFailed` that says what became of the
source workload (docs/protocol.md, "The commit point")."""

from __future__ import annotations

import time
from typing import Any, NoReturn

from livemig.errors import LivemigError
from livemig.migration.config import MigrationConfig
from livemig.migration.control import Aborted
from livemig.migration.legacy import legacy_call
from livemig.migration.monitor import Monitor
from livemig.migration.recovery import NeverRan
from livemig.migration.results import (
    InterruptReport,
    MigrationFailed,
    MigrationResult,
    Outcome,
    SourceWorkloadReport,
    workload_check,
)
from livemig.migration.source_figures import hint_stats
from livemig.migration.source_run import SourceRun
from livemig.workload.base import Workload


def migrate(address: str, workload: Workload | int, *args: Any, **kwargs: Any) -> MigrationResult:
    """Migrates ``workload`` to the destination listening at ``address``:
    ``migrate(address, workload, config=MigrationConfig(), progress=None, control=None, events=None)``.

    The workload is started if it does not run. After success the source workload stays paused:
    its memory is stale. Raises :class:`MigrationFailed` (naming the step and cause) when the
    migration fails; its ``outcome`` says what became of the source workload:

    - ``"cancelled"``: the destination's workload never ran; the source's runs on and got DONE;
    - ``"stale"``: the destination's ran; the source's stays paused for good;
    - ``"uncertain"``: the start command went out and the destination could not be asked whether
      it arrived; the source's stays paused and the caller decides which one runs, never both
      (resume it only when the destination's never ran: docs/protocol.md, "The commit point");
    - ``"aborted"``: interrupted twice (``control.cancel()``) after the destination's started.

    ``progress``: a :class:`Progress` (phases, rounds), or a :class:`LiveProgress` that also gets
    the live figures several times a second. ``events``: a callable taking each
    :class:`MigrationEvent` (e.g. an :class:`EventStream` to iterate over, or an
    :class:`EventWriter` for NDJSON); the last is ``end``, with the report or the error.

    Postcopy recovery: a connection that breaks after the destination workload may have started
    pauses the migration; it resumes over a new connection (by itself, or through ``control``: see
    :class:`livemig.migration.MigrationControl`) within ``config.reconnect_deadline_s``.
    ``control.cancel()`` cancels before that point; after it, it finishes the migration (a second
    call within a few seconds aborts).
    """
    if isinstance(workload, int):
        workload, args = legacy_call((workload, *args), kwargs)
    names = ("config", "progress", "control", "events")
    params: dict[str, Any] = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in params:
            raise TypeError(f"migrate() got an unexpected or repeated argument {k!r}")
        params[k] = v
    config: MigrationConfig = params.get("config") or MigrationConfig()
    monitor = Monitor("source", params.get("progress"), params.get("events"), page_size=workload.region.page_size)
    run = SourceRun(workload, config, monitor, params.get("control"))
    step = "connect"
    monitor.start(run.figures.counts, **run.figures.start_fields(address, config, run.result, workload.kind))
    try:
        workload.start()
        run.connect(address)
        step = "precopy"
        run.precopy()
        if config.postcopy:
            run.announce_postcopy()
        else:
            run.drain()
        step = "switchover"
        t_pause = run.switchover()
        if config.postcopy:
            step = "postcopy"
            run.postcopy(t_pause)
        else:
            run.finish_precopy(t_pause)
        step = "complete"
        monitor.phase("complete")
        summary = run.report()
    except Aborted as e:
        interrupt = _abort(run)
        _fail(run, monitor, f"{step}: {e}: {interrupt.lost_pages} pages that only the source held are lost", e,
              "aborted", interrupt)
    except (LivemigError, OSError) as e:
        if isinstance(e, NeverRan):
            run.dest_may_run = False  # it said so: the source's workload is the only one
        _fail(run, monitor, f"{step}: {e}", e, _failure_outcome(run), _interrupt_report(run))
    except BaseException as e:
        monitor.end(False, None, f"{step}: {type(e).__name__}: {e}")
        run.cancel()
        run.close()
        raise
    monitor.close()
    r = run.figures.finish(run.result)
    run.close()
    r.total_ms = (time.perf_counter() - monitor.t0) * 1e3
    r.throughput_bps = r.bytes_sent / (r.total_ms / 1e3) if r.total_ms > 0 else 0.0
    r.hints = hint_stats(workload.balloon, run._hints_before, run.balloon.stats.rounds)
    r.postcopy, r.balloon, r.verify, r.error, r.ok, r.prefault = (
        summary.postcopy, summary.balloon, summary.verify, summary.error, summary.ok, summary.prefault)
    r.mode = summary.mode  # what the destination saw happen
    r.destination_resume_ms = summary.resume_ms
    r.interrupt = _interrupt_report(run)
    r.workload.stats = workload.stats()
    monitor.end(r.ok, r.to_json(), r.error)
    return r


def _fail(run: SourceRun, monitor: Monitor, message: str, cause: BaseException, outcome: Outcome,
          interrupt: InterruptReport | None) -> NoReturn:
    """Cancels ``run`` after a failure (its workload resumes only when the destination's never
    ran), sends the end event, raises MigrationFailed."""
    monitor.close()
    run.cancel()
    report = _source_report(run)
    run.close()
    monitor.end(False, None, message)
    raise MigrationFailed(message, report, outcome=outcome, mode=run.result.mode, interrupt=interrupt) from cause


def _interrupt_report(run: SourceRun) -> InterruptReport | None:
    """What the user's interrupts did (None: there were none)."""
    n, intent = run.control.cancels, run.control._intended()
    if not n or intent is None:
        return None
    return InterruptReport(requests=n, outcome="cancelled" if intent == "cancel" else "finished")


def _failure_outcome(run: SourceRun) -> Outcome:
    """What a failure leaves: the destination's workload never ran, ran, or may have run."""
    if not run.dest_may_run:
        return "cancelled"
    return "stale" if run.dest_ran else "uncertain"


def _abort(run: SourceRun) -> InterruptReport:
    """After Aborted: stops serving requests, takes what only the source holds (D: never sent, or
    sent and stale since), tells the destination, and says exactly what is lost."""
    link = run.link
    exact = not run.paused and link is not None
    if link is not None and exact:
        try:
            link.session.interrupt()
            link.session.end_urgent()  # no request is served after this: D is final
        except (LivemigError, OSError):
            exact = False
    lost = run.engine.dirty
    n = lost.count()
    all_runs = lost.runs()
    runs = tuple((int(a), int(b)) for a, b in all_runs[:8])
    shown = ", ".join(f"{a}" if b == 1 else f"{a}-{a + b - 1}" for a, b in runs)
    more = len(all_runs) - len(runs)
    text = (f"aborted: {n:,} pages ({n * run.result.page_size / 2**20:.1f} MiB) existed only on the source"
            " and are lost" + (f": pages {shown}" if n else "") + (f" and {more} more runs" if more > 0 else "")
            + ("" if exact else " (and any the destination had not received when the connection broke)")
            + "; the destination's workload is incomplete")
    if link is not None and exact:
        try:  # after what is queued: the destination places every page sent, so it lacks exactly these
            link.main.send_error(f"the source aborted the migration: {n} pages it alone held are lost")
            link.close_gracefully(run.config.timeout)
        except (LivemigError, OSError):
            pass
    run.monitor.notice(text)
    return InterruptReport(requests=run.control.cancels, outcome="aborted", lost_pages=n, lost_runs=runs,
                           exact=exact)


def _source_report(run: SourceRun, settle_s: float = 10.0) -> SourceWorkloadReport:
    """After cancel(): lets a resumed workload see DONE (up to ``settle_s``), then reports (and,
    with ``config.verify``, has it check itself)."""
    running = not run.dest_may_run
    w = run.workload
    port = w.balloon
    deadline = time.monotonic() + (settle_s if run.balloon.device is not None else 0.0)  # no device: no DONE sent
    while running and port is not None and time.monotonic() < deadline:  # DONE was sent
        now = port.status()
        if now.done_seen and now.pages_held == 0:
            break
        time.sleep(0.005)  # the workload's driver runs at its own pace
    s = port.status() if port is not None else None
    check = workload_check(w, run.config.pause_timeout_s if running else None) if run.config.verify else None
    return SourceWorkloadReport(running=running, done_delivered=s.done_seen if s else True,
                                held_pages=s.pages_held if s else 0, check=check)


__all__ = ["migrate"]
