"""Events for programs: what a migration does as it happens, as :class:`MigrationEvent` objects
handed to a callback (``migrate(..., events=cb)``, ``serve(..., events=cb)``), an
:class:`EventStream` to iterate over, or newline-delimited JSON (:class:`EventWriter`, the CLI's
``--events FILE|-``). The schema is versioned (:data:`SCHEMA`) and documented in docs/cli.md;
every figure an event carries is the one the final report holds (RoundStats, MigrationResult)."""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import IO, Any

#: The schema every event names; a change that would make an older reader misread it bumps it.
SCHEMA = "livemig.events/1"

#: Event kinds, in roughly the order a migration emits them.
KINDS = ("start", "phase", "round_begin", "round_end", "switchover", "progress", "faults", "paused",
         "resume_attempt", "resumed", "end")


def _plain(obj: Any) -> Any:
    """``obj`` JSON-ready: dataclasses as dicts, tuples as lists, non-finite floats as None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True)
class MigrationEvent:
    """One event: its ``kind`` (one of KINDS), ``side`` ("source" or "destination"), ``t``
    (seconds since the migration started, monotonic clock) and its fields in ``data``."""

    kind: str
    side: str
    t: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The NDJSON object: ``{"schema", "event", "side", "t", ...data}``."""
        return {"schema": SCHEMA, "event": self.kind, "side": self.side, "t": round(self.t, 6),
                **_plain(self.data)}


EventCallback = Callable[[MigrationEvent], None]


class EventWriter:
    """An event callback writing one JSON object per line to ``out`` (flushed per event, so a
    reader sees each event as it happens)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, ev: MigrationEvent) -> None:
        line = json.dumps(ev.to_json(), allow_nan=False, separators=(",", ":"))
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class EventStream:
    """An event callback that is also an iterator: hand it to ``migrate()``/``serve()`` running in
    another thread and iterate here; iteration ends after the ``end`` event (or at ``close()``).

    ``for ev in stream`` blocks until the next event; ``timeout`` (seconds) bounds each wait
    (queue.Empty then)."""

    _CLOSED = object()

    def __init__(self, timeout: float | None = None) -> None:
        self._q: queue.Queue[object] = queue.Queue()
        self._timeout = timeout
        self._done = False

    def __call__(self, ev: MigrationEvent) -> None:
        self._q.put(ev)
        if ev.kind == "end":
            self._q.put(self._CLOSED)

    def close(self) -> None:
        """Ends the iteration once the events queued so far are read."""
        self._q.put(self._CLOSED)

    def __iter__(self) -> Iterator[MigrationEvent]:
        while not self._done:
            item = self._q.get(timeout=self._timeout)
            if item is self._CLOSED:
                self._done = True
                return
            assert isinstance(item, MigrationEvent)
            yield item


__all__ = ["KINDS", "SCHEMA", "EventCallback", "EventStream", "EventWriter", "MigrationEvent"]
