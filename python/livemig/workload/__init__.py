"""Workloads: what a migration moves (docs/design.md, "Workloads").

- :class:`Workload`, :class:`WorkloadFactory`: the seam. The orchestrator needs exactly these.
- :class:`ModelGuest`: livemig's own guest model (``--workload`` on the command line).
- :class:`BufferWorkload`: memory a user owns in this process (an mmap, a numpy array over one)
  that the user's threads keep writing; :class:`PauseGate` helps them pause.
- :class:`AttachedWorkload`, :class:`AttachFactory`: another process's memory (docs/attach.md).
- :class:`StandardFactory`: what a destination hosts unless told otherwise.
"""

from __future__ import annotations

from livemig.workload.attached import AttachedWorkload, AttachFactory, attach_source
from livemig.workload.base import (
    BalloonGuestStatus,
    BalloonPort,
    CheckResult,
    Workload,
    WorkloadFactory,
)
from livemig.workload.buffer import BufferFactory, BufferWorkload, PauseGate
from livemig.workload.factory import StandardFactory
from livemig.workload.model import GuestImage, ModelGuest, ModelGuestFactory

__all__ = [
    "AttachFactory",
    "AttachedWorkload",
    "BalloonGuestStatus",
    "BalloonPort",
    "BufferFactory",
    "BufferWorkload",
    "CheckResult",
    "GuestImage",
    "ModelGuest",
    "ModelGuestFactory",
    "PauseGate",
    "StandardFactory",
    "Workload",
    "WorkloadFactory",
    "attach_source",
]
