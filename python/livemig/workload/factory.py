"""The destination's standard factory: hosts every kind this build knows."""

from __future__ import annotations

from livemig.memory import Region
from livemig.workload.attached import AttachFactory
from livemig.workload.base import Workload, WorkloadFactory
from livemig.workload.buffer import BufferFactory
from livemig.workload.model import ModelGuestFactory


class StandardFactory:
    """Hosts the model guest, buffer and attach workloads (and whatever ``extra`` maps kinds to). An
    attached process's memory lands in livemig's own region here and is copied into a process it
    launches (:data:`livemig.workload.attached.LAUNCH_ENV`) at switchover; an :class:`AttachFactory`
    with a socket puts it straight into a waiting process. It makes
    a model guest ahead of the switchover on every connection (cheap: its generation table), so a
    model guest's state lands in warm memory."""

    def __init__(self, extra: dict[str, WorkloadFactory] | None = None) -> None:
        self.model = ModelGuestFactory()
        self.kinds: dict[str, WorkloadFactory] = {"model-guest": self.model, "buffer": BufferFactory(),
                                                  "attach": AttachFactory(), **(extra or {})}

    def memory(self, nbytes: int, page_size: int) -> Region | None:
        return None

    def prepare(self, region: Region) -> None:
        self.model.prepare(region)

    def accepts(self, kind: str, version: int) -> str | None:
        f = self.kinds.get(kind)
        if f is None:
            return f"this destination hosts {', '.join(repr(k) for k in sorted(self.kinds))} workloads, not {kind!r}"
        return f.accepts(kind, version)

    def build(self, kind: str, version: int, region: Region, state: bytes) -> Workload:
        from livemig.errors import WorkloadError

        why = self.accepts(kind, version)
        if why is not None:
            raise WorkloadError(why)
        return self.kinds[kind].build(kind, version, region, state)


__all__ = ["StandardFactory"]
